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


def broadcast_per_task(theta, n: int):
  """``theta`` repeated for ``n`` tasks: leaves ``[n, *theta.shape]``. Differentiating a
  sum of per-task losses with respect to this gives per-task gradients ``dL_i/dtheta``."""
  return jax.tree.map(lambda t: jnp.broadcast_to(t[None], (n,) + t.shape), theta)


def unroll_in_chunks(step, theta, state, key, num_steps: int, outer_state, task_ids, *,
                     theta_is_vector: bool = False, steps_per_chunk: int | None = None,
                     remat: bool = False, num_active=None):
  """``num_steps`` inner steps as a scan over chunks of ``steps_per_chunk`` steps.

  Step ``t`` uses ``fold_in(key, t)``, exactly as ``step.unroll`` does, so the chunking
  never changes the numbers (only memory and program structure). Outputs are
  ``[num_steps, tasks]``.

  remat: ``jax.checkpoint`` each chunk, so reverse mode stores one state per chunk and
    recomputes the chunk's steps on the way back (memory ``O(num_steps / chunk)`` states
    plus one chunk's activations, instead of ``O(num_steps)``).
  num_active: optional traced int32, a multiple of ``steps_per_chunk``: chunks starting at
    or after it are skipped with ``lax.cond`` (their outputs are zeros with mask 0), so a
    sampled unroll length costs its own length while every shape stays static. It must be
    the same on every device (derive it from the replicated key), which keeps the
    ``cond`` a real branch under ``shard_map``.
  """
  spc = int(steps_per_chunk or num_steps)
  if num_steps % spc:
    raise ValueError(f"num_steps ({num_steps}) must be a multiple of steps_per_chunk "
                     f"({spc}).")
  num_chunks = num_steps // spc
  # A state made inside shard_map (whole-unroll estimators init fresh tasks there) has
  # constant leaves that are not "varying" over the task axis while the step's outputs
  # may be; scan needs equal carry types.
  state = vary_like(state, task_ids)

  def run_chunk(theta, state, chunk):
    def body(s, j):
      s, out = step.unroll_step(theta, s, jax.random.fold_in(key, chunk * spc + j),
                                outer_state=outer_state, theta_is_vector=theta_is_vector,
                                task_ids=task_ids)
      # Constant leaves (e.g. is_done under NeverEndingTruncationSchedule) must stay
      # "varying" too, for the scan carry and the cond branches to type-check.
      return vary_like((s, out), task_ids)
    return jax.lax.scan(body, state, jnp.arange(spc))

  if remat:
    run_chunk = jax.checkpoint(run_chunk)

  def chunk_body(state, chunk):
    if num_active is None:
      return run_chunk(theta, state, chunk)

    def skip():
      _, out_shape = jax.eval_shape(run_chunk, theta, state, chunk)
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out_shape)
      return state, vary_like(zeros, task_ids)

    return jax.lax.cond(chunk * spc < num_active, lambda: run_chunk(theta, state, chunk),
                        skip)

  state, outs = jax.lax.scan(chunk_body, state, jnp.arange(num_chunks))
  outs = jax.tree.map(lambda x: x.reshape((num_steps,) + x.shape[2:]), outs)
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


def check_never_ending(who: str, truncated_step) -> None:
  """Whole-unroll estimators own the unroll length; the inner trajectories must not end
  (and reset) inside it, or the "whole unroll" would silently span two tasks."""
  from spmd_lopt.outer_trainers import truncation_schedule as ts  # avoid an import cycle
  sched = getattr(truncated_step, "trunc_sched", None)
  if not isinstance(sched, ts.NeverEndingTruncationSchedule):
    raise ValueError(
        f"{who} unrolls whole trajectories whose length comes from its own "
        "truncation_schedule; the truncated step must be built with "
        "NeverEndingTruncationSchedule() so no trajectory resets inside an unroll (got "
        f"{type(sched).__name__}).")


def whole_unroll_lengths(who: str, truncation_schedule, steps_per_jit) -> tuple[int, int]:
  """``(static_num_steps, steps_per_chunk)`` for an estimator unrolling whole
  trajectories with lengths drawn from ``truncation_schedule``.

  The scan always has ``static_num_steps = truncation_schedule.max_length`` steps (static,
  one compiled program for every sampled length); chunks past the sampled length are
  skipped at run time (see ``unroll_in_chunks``).
  """
  from spmd_lopt.outer_trainers import truncation_schedule as ts
  if isinstance(truncation_schedule, ts.NeverEndingTruncationSchedule):
    raise ValueError(f"{who}: truncation_schedule gives the unroll length and must be "
                     "finite (e.g. ConstantTruncationSchedule), not NeverEnding.")
  max_length = int(truncation_schedule.max_length)
  if steps_per_jit is None:
    spc = max_length
  elif int(steps_per_jit) != steps_per_jit or steps_per_jit <= 0:
    raise ValueError(f"{who}: steps_per_jit must be a positive integer, got "
                     f"{steps_per_jit!r}.")
  else:
    spc = min(int(steps_per_jit), max_length)
  if max_length % spc:
    raise ValueError(f"{who}: the schedule's max_length ({max_length}) must be a multiple "
                     f"of steps_per_jit ({spc}).")
  return max_length, spc


def sample_num_active(truncation_schedule, key, outer_state, steps_per_chunk: int,
                      max_length: int) -> jax.Array:
  """One unroll length for this call (shared by all tasks, as in the reference), rounded
  up to a whole number of chunks and capped at ``max_length``: int32 scalar."""
  length = truncation_schedule.init(key, outer_state).length
  chunks = (length + steps_per_chunk - 1) // steps_per_chunk
  return jnp.clip(chunks * steps_per_chunk, steps_per_chunk, max_length).astype(jnp.int32)


def select_per_task(pred: jax.Array, a, b):
  """``a_i if pred_i else b_i`` for every task ``i`` of two task-batched pytrees;
  ``pred`` has shape ``[n]``."""
  def sel(x, y):
    if x.size == 0:
      # Nothing to select, and jnp.where on empty arrays drops the shard_map varying type
      # that ``b`` carries (e.g. the empty factored moments of 1-D parameters).
      return y
    return jnp.where(pred.reshape(pred.shape + (1,) * (x.ndim - 1)), x, y)
  return jax.tree.map(sel, a, b)
