"""Small pure helpers shared by the gradient estimators."""

from __future__ import annotations

import einops
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


def masked_mean_over_steps(values: jax.Array, mask: jax.Array) -> jax.Array:
  """``sum_t m_t v_t / max(sum_t m_t, 1)`` over axis 0: ``[T, n] -> [n]``."""
  mask = mask.astype(values.dtype)
  return jnp.sum(values * mask, axis=0) / jnp.maximum(jnp.sum(mask, axis=0), 1.0)


def broadcast_per_task(theta, n: int):
  """``theta`` repeated for ``n`` tasks: leaves ``[n, *theta.shape]``. Differentiating a
  sum of per-task losses with respect to this gives per-task gradients ``dL_i/dtheta``."""
  return jax.tree.map(lambda t: jnp.broadcast_to(t[None], (n,) + t.shape), theta)


def stack_antithetic(pos, neg, task_ids, data=None, data_axis: int = 0):
  """One batch of ``2n`` tasks from the ``+`` and ``-`` halves: ``(state, ids, data)``.
  Both halves get the same ids (hence the same per-task keys) and the same batches, so
  the antithetic difference carries neither task nor data noise. ``data`` leaves have the
  task axis at ``data_axis``."""
  both_data = None if data is None else jax.tree.map(
      lambda d: jnp.concatenate([d, d], axis=data_axis), data)
  return concat_tasks(pos, neg), jnp.concatenate([task_ids, task_ids]), both_data


def unstack_antithetic(out, axis: int = 0):
  """Inverse of ``stack_antithetic`` on outputs whose task axis (``2n`` long) is 0 (states)
  or 1 (per-step outputs ``[T, 2n]``): ``-> (pos, neg)``."""
  pattern = {0: "(two n) ... -> two n ...", 1: "t (two n) ... -> two t n ..."}[axis]
  halves = jax.tree.map(lambda x: einops.rearrange(x, pattern, two=2), out)
  return jax.tree.map(lambda h: h[0], halves), jax.tree.map(lambda h: h[1], halves)


def unroll_in_chunks(step, theta, state, key, num_steps: int, outer_state, task_ids, *,
                     theta_is_vector: bool = False, steps_per_chunk: int | None = None,
                     remat: bool = False, num_active=None, data=None):
  """``num_steps`` inner steps as a scan over ``ceil(num_steps / steps_per_chunk)`` chunks.

  Step ``t`` uses ``fold_in(key, t)``, exactly as ``step.unroll`` does, so the chunking
  never changes the numbers (only memory and program structure). Outputs are
  ``[num_steps, tasks]``.

  remat: ``jax.checkpoint`` each chunk, so reverse mode stores one state per chunk and
    recomputes the chunk's steps on the way back (memory ``O(num_steps / chunk)`` states
    plus one chunk's activations, instead of ``O(num_steps)``).
  num_active: optional traced int32 in ``[1, num_steps]``: steps ``t >= num_active`` are
    skipped (state unchanged, outputs zero with mask 0): whole chunks with a ``lax.cond``
    around the chunk, the tail of the last active chunk step by step. A drawn unroll
    length thus costs its own length, exactly, while every shape stays static. It must
    be the same on every device (derive it from the replicated key), which keeps the
    ``cond`` a real branch under ``shard_map``.
  data: ``None`` or host-fed batches, leaves ``[num_steps, tasks, ...]``.
  """
  spc = min(int(steps_per_chunk or num_steps), num_steps)
  num_chunks = -(-num_steps // spc)
  padded = num_chunks * spc
  limit = num_active
  if limit is None and padded != num_steps:
    limit = num_steps  # the padding steps of the last chunk are skipped
  if data is not None:
    data = jax.tree.map(lambda d: jnp.pad(d, [(0, padded - num_steps)] +
                                          [(0, 0)] * (d.ndim - 1)).reshape(
                                              (num_chunks, spc) + d.shape[1:]), data)
  # A state made inside shard_map (whole-unroll estimators init fresh tasks there) has
  # constant leaves that are not "varying" over the task axis while the step's outputs
  # may be; scan needs equal carry types.
  state = vary_like(state, task_ids)

  def one_step(theta, s, t, batch):
    s, out = step.unroll_step(theta, s, jax.random.fold_in(key, t), data=batch,
                              outer_state=outer_state, theta_is_vector=theta_is_vector,
                              task_ids=task_ids)
    # Constant leaves (e.g. is_done under NeverEndingTruncationSchedule) must stay
    # "varying" too, for the scan carry and the cond branches to type-check.
    return vary_like((s, out), task_ids)

  def skipped(theta, s, t, batch):
    _, out_shape = jax.eval_shape(one_step, theta, s, t, batch)
    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), out_shape)
    return s, vary_like(zeros, task_ids)

  def run_chunk(theta, state, chunk, chunk_data):
    def body(s, xs):
      j, batch = xs
      t = chunk * spc + j
      if limit is None:
        return one_step(theta, s, t, batch)
      return jax.lax.cond(t < limit, one_step, skipped, theta, s, t, batch)
    return jax.lax.scan(body, state, (jnp.arange(spc), chunk_data))

  if remat:
    run_chunk = jax.checkpoint(run_chunk)

  def chunk_body(state, xs):
    chunk, chunk_data = xs
    if limit is None:
      return run_chunk(theta, state, chunk, chunk_data)

    def skip():
      _, out_shape = jax.eval_shape(run_chunk, theta, state, chunk, chunk_data)
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out_shape)
      return state, vary_like(zeros, task_ids)

    return jax.lax.cond(chunk * spc < limit,
                        lambda: run_chunk(theta, state, chunk, chunk_data), skip)

  state, outs = jax.lax.scan(chunk_body, state, (jnp.arange(num_chunks), data))
  outs = jax.tree.map(lambda x: x.reshape((padded,) + x.shape[2:])[:num_steps], outs)
  return state, outs


def _varying_axes(x) -> frozenset:
  """The manual mesh axes ``x`` varies over (jax 0.10: ``manual_axis_type.varying``;
  earlier releases: ``.vma``)."""
  aval = jax.typeof(x)
  mat = getattr(aval, "manual_axis_type", None)
  if mat is not None:
    return frozenset(mat.varying)
  return frozenset(getattr(aval, "vma", ()))


def vary_like(tree, ref):
  """Mark every leaf of ``tree`` as varying over the manual mesh axes ``ref`` varies over
  (``lax.pcast``; a no-op outside ``shard_map``, where nothing varies)."""
  axes = tuple(sorted(_varying_axes(ref)))

  def cast(x):
    missing = tuple(a for a in axes if a not in _varying_axes(x))
    return jax.lax.pcast(x, missing, to="varying") if missing else x

  return jax.tree.map(cast, tree)


def select_per_task(pred: jax.Array, a, b):
  """``a_i if pred_i else b_i`` for every task ``i`` of two task-batched pytrees;
  ``pred`` has shape ``[n]``."""
  def sel(x, y):
    if x.size == 0:
      # Nothing to select, and jnp.where on empty arrays drops the shard_map varying type
      # that ``b`` carries (e.g. Celo2's empty factored moments of 1-D parameters).
      return y
    return jnp.where(pred.reshape(pred.shape + (1,) * (x.ndim - 1)), x, y)
  return jax.tree.map(sel, a, b)
