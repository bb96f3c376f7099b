"""Small pure helpers shared by the gradient estimators."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def tree_normal_like(key: jax.Array, tree, std: float):
  """``N(0, std^2)`` noise with the structure, shapes and dtypes of ``tree``."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, max(len(leaves), 1))
  noise = [std * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
  return jax.tree.unflatten(treedef, noise)


def per_task_noise(key: jax.Array, task_ids: jax.Array, theta, std: float):
  """One perturbation per task, keyed by global task index: leaves ``[n, *theta.shape]``."""
  return jax.vmap(lambda i: tree_normal_like(jax.random.fold_in(key, i), theta, std))(task_ids)


def add_per_task(theta, eps, sign: float = 1.0):
  """``theta + sign * eps_i`` for every task ``i``: leaves ``[n, *theta.shape]``."""
  return jax.tree.map(lambda t, e: t[None] + sign * e, theta, eps)


def scale_per_task(weights: jax.Array, tree):
  """``weights_i * tree_i`` with ``weights`` of shape ``[n]``."""
  return jax.tree.map(lambda x: weights.reshape((-1,) + (1,) * (x.ndim - 1)) * x, tree)


def concat_tasks(a, b):
  """Concatenate two task-batched pytrees along the task axis."""
  return jax.tree.map(lambda x, y: jnp.concatenate([x, y], axis=0), a, b)


def split_tasks(tree, n: int):
  """Inverse of ``concat_tasks`` for two halves of ``n`` tasks each."""
  return jax.tree.map(lambda x: x[:n], tree), jax.tree.map(lambda x: x[n:], tree)


def masked_mean_over_steps(values: jax.Array, mask: jax.Array) -> jax.Array:
  """``sum_t m_t v_t / max(sum_t m_t, 1)`` over axis 0: ``[T, n] -> [n]``."""
  mask = mask.astype(values.dtype)
  return jnp.sum(values * mask, axis=0) / jnp.maximum(jnp.sum(mask, axis=0), 1.0)
