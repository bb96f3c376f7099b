"""From per-task values to one slice's estimate: per-task reverse-mode gradients
(``per_task_grads``), NaN handling (``sanitize_per_task``) and the average over the slice
(``finish_estimate``). Every estimator ends in ``finish_estimate``.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from spmd_lopt.outer_trainers import common
from spmd_lopt.outer_trainers.estimator_base.interface import LocalEstimate, MetaParams
from spmd_lopt.outer_trainers.estimator_base.interface import UnrollInfo


def sanitize_per_task(grads: MetaParams, losses: jax.Array, clip_nan_loss_to_value: float):
  """Replace non-finite per-task values so one diverged task cannot poison theta.

  grads: leaves ``[n, ...]``; losses: ``[n]``. Non-finite gradient entries become 0, a
  non-finite loss becomes ``clip_nan_loss_to_value``. Returns ``(grads, losses, tasks,
  entries)``: the cleaned values, the number of tasks with any non-finite value and the
  number of replaced entries (int32 scalars).
  """
  chex.assert_rank(losses, 1)
  chex.assert_tree_shape_prefix(grads, losses.shape)
  bad_loss = ~jnp.isfinite(losses)
  bad_task = bad_loss
  entries = jnp.sum(bad_loss).astype(jnp.int32)
  for g in jax.tree.leaves(grads):
    bad = ~jnp.isfinite(g).reshape(g.shape[0], -1)
    entries = entries + jnp.sum(bad).astype(jnp.int32)
    bad_task = bad_task | jnp.any(bad, axis=1)
  grads = jax.tree.map(lambda g: jnp.where(jnp.isfinite(g), g, 0.0), grads)
  losses = jnp.where(jnp.isfinite(losses), losses, clip_nan_loss_to_value)
  return grads, losses, jnp.sum(bad_task).astype(jnp.int32), entries


def finish_estimate(grads, losses, clip_nan_loss_to_value: float, state, out
                    ) -> "LocalEstimate":
  """Per-task grads ``[n, ...]`` and losses ``[n]`` -> the slice's ``LocalEstimate``
  (sanitized, averaged over the slice), with ``out`` (``[T, n]`` step outputs) as
  ``unroll_info``."""
  grads, losses, tasks, entries = sanitize_per_task(grads, losses, clip_nan_loss_to_value)
  info = UnrollInfo(loss=out.loss, iteration=out.iteration, task_param=out.task_param,
                    is_done=out.is_done)
  return LocalEstimate(grad=jax.tree.map(lambda g: jnp.mean(g, axis=0), grads),
                       loss=jnp.mean(losses), nonfinite=tasks, nonfinite_entries=entries,
                       state=state, unroll_info=info)


def per_task_grads(loss_fn, theta, task_ids):
  """``loss_fn(theta_vec) -> (losses [n], aux)``; returns ``(grads [n, ...], losses,
  aux)`` with ``grads[i] = d losses[i] / d theta``.

  Under ``shard_map`` theta is replicated (not "varying"); differentiating through its
  implicit cast to varying would ``psum`` the per-task gradients over devices. Casting the
  broadcast copy to varying *before* differentiating keeps each device's gradients local
  (the learner's ``pmean`` does the cross-device average).
  """
  theta_vec = common.vary_like(common.broadcast_per_task(theta, task_ids.shape[0]),
                               task_ids)

  def total(tv):
    losses, aux = loss_fn(tv)
    return jnp.sum(losses), (losses, aux)

  (_, (losses, aux)), grads = jax.value_and_grad(total, has_aux=True)(theta_vec)
  return grads, losses, aux
