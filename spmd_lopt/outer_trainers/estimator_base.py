"""Data types shared by gradient estimators and learners, and the ``GradientEstimator``
interface.

An estimator holds a slice of the task population and, per call, returns an estimate of
``d meta_loss / d theta`` averaged over its tasks. It is written once, for a *local* slice
of tasks given by their global indices, and runs in two settings:

- sharded: inside the learner's ``shard_map`` each device calls ``estimate_local`` on its
  slice; the learner averages the results over devices with ``pmean``;
- host API (the reference's ``compute_gradient_estimate``): ``estimate_local`` on all
  tasks at once, under ``jit``.

Because every random draw of task ``i`` is keyed by ``fold_in(key, i)``, both settings,
and any device count, give the same numbers up to float summation order.

One interface for every estimator::

    init_local(theta, outer_state, key, task_ids) -> state
    estimate_local(theta, state, key, task_ids, outer_state, data=None) -> LocalEstimate

``data`` is ``None`` (tasks draw their batches on device) or host-fed batches for the
slice, leaves ``[unroll_length, len(task_ids), ...]`` (what ``get_host_data`` draws from
a family whose ``datasets`` are the reference's host iterators).

This module also holds what the estimators share: construction of the truncated step
(``build_truncated_step``), validation, NaN handling (``sanitize_per_task``), per-task
reverse-mode gradients (``per_task_grads``), the whole-unroll length helpers and the
antithetic truncated ES base (``AntitheticTruncatedEstimator``, PES and NRES).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import chex
import flax
import jax
import jax.numpy as jnp

from spmd_lopt.outer_trainers import common
from spmd_lopt.outer_trainers import lopt_truncated_step
from spmd_lopt.outer_trainers import reference_forms
from spmd_lopt.outer_trainers import truncated_step as truncated_step_lib
from spmd_lopt.outer_trainers import truncation_schedule as ts
from spmd_lopt.tasks import base as tasks_base
from spmd_lopt.tasks import datasets_base

MetaParams = Any


@flax.struct.dataclass
class OuterState:
  """What the inner loop may know of the outer loop: the outer iteration (int32)."""
  outer_iteration: jax.Array


@flax.struct.dataclass
class WorkerWeights:
  theta: MetaParams
  theta_model_state: Any
  outer_state: OuterState


@flax.struct.dataclass
class UnrollInfo:
  loss: jax.Array
  iteration: jax.Array
  task_param: Any
  is_done: jax.Array


@flax.struct.dataclass
class GradientEstimatorOut:
  mean_loss: jax.Array
  grad: MetaParams
  unroll_state: Any
  unroll_info: Optional[UnrollInfo]


@flax.struct.dataclass
class LocalEstimate:
  """One estimator's result on a slice of ``n`` tasks.

  grad: mean over the slice of the per-task estimates (theta-shaped). loss: mean over the
  slice of the per-task meta-losses (scalar). nonfinite: number of *tasks* whose loss or
  gradient had a non-finite value (int32). nonfinite_entries: number of non-finite
  entries replaced (loss plus gradient entries; one diverged task can give thousands).
  state: the slice's next state. unroll_info: per-step outputs ``[steps, n]``, for the
  host API and debugging.
  """
  grad: MetaParams
  loss: jax.Array
  nonfinite: jax.Array
  state: Any
  unroll_info: Any
  nonfinite_entries: jax.Array = 0


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


def positive_int(who: str, name: str, value) -> int:
  if isinstance(value, bool) or int(value) != value or value <= 0:
    raise ValueError(f"{who}: {name} must be a positive integer, got {value!r}.")
  return int(value)


def check_steps_per_jit(who: str, steps_per_jit) -> None:
  """``steps_per_jit`` is the reference's host-loop chunk; here every unroll is one program,
  so it is accepted (any positive integer, or None) and has no effect."""
  if steps_per_jit is not None:
    positive_int(who, "steps_per_jit", steps_per_jit)


def check_step(who: str, truncated_step) -> None:
  if not isinstance(truncated_step, truncated_step_lib.VectorizedTruncatedStep):
    raise TypeError(f"{who}: truncated_step must be a VectorizedTruncatedStep, got "
                    f"{type(truncated_step).__name__}.")


def build_truncated_step(truncated_step, task_family, learned_opt, trunc_sched, num_tasks,
                         random_initial_iteration_offset, who: str):
  """Accept either a ready truncated step or the pieces to build one (keyword
  construction), and fail clearly on a mix or a gap."""
  if isinstance(truncated_step, tasks_base.TaskFamily):
    task_family, truncated_step = truncated_step, None
  if truncated_step is not None:
    check_step(who, truncated_step)
    return truncated_step
  missing = [n for n, v in [("task_family", task_family), ("learned_opt", learned_opt),
                            ("trunc_sched", trunc_sched), ("num_tasks", num_tasks)]
             if v is None]
  if missing:
    raise ValueError(f"{who}: pass truncated_step=..., or all of task_family, "
                     f"learned_opt, trunc_sched, num_tasks (missing: {missing}).")
  return lopt_truncated_step.VectorizedLOptTruncatedStep(
      task_family, learned_opt, trunc_sched, num_tasks,
      random_initial_iteration_offset=random_initial_iteration_offset)


def has_host_datasets(truncated_step) -> bool:
  """Whether the step's tasks read the reference's host iterators (``datasets`` is a
  ``datasets_base.Datasets``): their batches must be drawn on the host (``get_batch``)."""
  family = getattr(truncated_step, "task_family", None)
  return isinstance(getattr(family, "datasets", None), datasets_base.Datasets)


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


# --- whole-unroll estimators (FullES, FullGrad) ----------------------------------------


@flax.struct.dataclass
class FullUnrollWorkerState:
  """Whole-unroll estimators keep nothing between calls (each starts fresh tasks)."""


def check_never_ending(who: str, truncated_step) -> None:
  """Whole-unroll estimators own the unroll length; the inner trajectories must not end
  (and reset) inside it, or the "whole unroll" would silently span two tasks."""
  sched = getattr(truncated_step, "trunc_sched", None)
  if not isinstance(sched, ts.NeverEndingTruncationSchedule):
    raise ValueError(
        f"{who} unrolls whole trajectories whose length comes from its own "
        "truncation_schedule; the truncated step must be built with "
        "NeverEndingTruncationSchedule() so no trajectory resets inside an unroll (got "
        f"{type(sched).__name__}).")


def whole_unroll_lengths(who: str, truncation_schedule, chunk_length) -> tuple[int, int]:
  """``(max_length, chunk_length)`` for an estimator unrolling whole trajectories with
  lengths drawn from ``truncation_schedule``.

  The scan is static (one compiled program for every drawn length): ``ceil(max_length /
  chunk_length)`` chunks; steps at or past the drawn length are skipped at run time (see
  ``common.unroll_in_chunks``), so the chunk need not divide anything.
  """
  if isinstance(truncation_schedule, ts.NeverEndingTruncationSchedule):
    raise ValueError(f"{who}: truncation_schedule gives the unroll length and must be "
                     "finite (e.g. ConstantTruncationSchedule), not NeverEnding.")
  try:
    max_length = int(truncation_schedule.max_length)
  except (NotImplementedError, TypeError, ValueError) as e:
    raise ValueError(f"{who}: truncation_schedule must have a finite max_length "
                     f"({type(truncation_schedule).__name__}: {e}).") from None
  if chunk_length is None:
    return max_length, max_length
  return max_length, min(positive_int(who, "chunk_length", chunk_length), max_length)


def sample_length(truncation_schedule, key, outer_state, max_length: int) -> jax.Array:
  """One unroll length for this call (shared by all tasks, as in the reference), drawn
  from the replicated key so every device agrees, clipped to ``[1, max_length]`` and
  never rounded: int32 scalar."""
  length = truncation_schedule.init(key, outer_state).length
  return jnp.clip(length, 1, max_length).astype(jnp.int32)


class GradientEstimator:
  """Base class. Subclasses implement ``init_local`` and ``estimate_local``."""

  truncated_step: Any
  clip_nan_loss_to_value: float = 20.0

  @property
  def num_tasks(self) -> int:
    return self.truncated_step.num_tasks

  def task_name(self) -> str:
    step = getattr(self, "truncated_step", None)
    return step.task_name() if step is not None else "unnamed_task"

  def cfg_name(self) -> str:
    step = getattr(self, "truncated_step", None)
    return step.cfg_name() if step is not None else "unnamed_cfg"

  # --- the sharded core -------------------------------------------------------------

  def init_local(self, theta, outer_state: OuterState, key, task_ids) -> Any:
    raise NotImplementedError

  def estimate_local(self, theta, state, key, task_ids, outer_state: OuterState,
                     data=None) -> LocalEstimate:
    """``data``: ``None`` (tasks draw batches on device) or host-fed batches for the slice,
    leaves ``[unroll_length, len(task_ids), ...]`` (see ``get_host_data``)."""
    raise NotImplementedError

  # --- the reference's host API -----------------------------------------------------

  def init_worker_state(self, worker_weights: WorkerWeights, key):
    """Fresh state for all ``num_tasks`` tasks (unsharded)."""
    if not hasattr(self, "_jit_init"):
      self._jit_init = jax.jit(
          lambda th, os, k: self.init_local(th, os, k, jnp.arange(self.num_tasks)))
    return self._jit_init(worker_weights.theta, worker_weights.outer_state, key)

  def host_data_steps(self) -> int:
    """Inner steps per call, hence batches per task of host-fed data."""
    raise NotImplementedError

  def get_host_data(self):
    """One call's host-fed batches for a task family with host iterators (the reference's
    data model), drawn on the host: ``truncated_step.get_batch(host_data_steps())``."""
    return self.truncated_step.get_batch(self.host_data_steps())

  def compute_gradient_estimate(self, worker_weights: WorkerWeights, key, state,
                                with_summary: bool = False, datas_list=None
                                ) -> tuple[GradientEstimatorOut, Mapping[str, jax.Array]]:
    """One estimate over all tasks: ``(GradientEstimatorOut, metrics)``.

    ``datas_list``: optional host-fed batches, leaves ``[unroll_length, num_tasks, ...]``.
    Without it, tasks whose family has host iterators get theirs from ``get_host_data``
    (as the reference draws them inside this call); other tasks sample on device.
    """
    del with_summary  # summaries come back as metrics
    if datas_list is None and has_host_datasets(getattr(self, "truncated_step", None)):
      datas_list = self.get_host_data()
    if not hasattr(self, "_jit_estimate"):
      def estimate(th, s, k, os, data):
        return self.estimate_local(th, s, k, jnp.arange(self.num_tasks), os, data=data)
      self._jit_estimate = jax.jit(estimate)
    est = self._jit_estimate(worker_weights.theta, state, key, worker_weights.outer_state,
                             datas_list)
    out = GradientEstimatorOut(mean_loss=est.loss, grad=est.grad, unroll_state=est.state,
                               unroll_info=est.unroll_info)
    return out, {"nonfinite": est.nonfinite, "nonfinite_entries": est.nonfinite_entries}


# --- antithetic truncated ES (PES, NRES) ----------------------------------------------


class WholeUnrollEstimator(GradientEstimator):
  """The shared part of FullES and FullGrad: each call unrolls fresh tasks for a length
  drawn from ``self.truncation_schedule`` (at most ``self.max_length``), so nothing is
  kept between calls."""

  truncation_schedule: Any
  max_length: int

  def init_local(self, theta, outer_state, key, task_ids):
    del theta, outer_state, key, task_ids
    return FullUnrollWorkerState()

  def host_data_steps(self) -> int:
    return self.max_length

  def sample_length(self, key, outer_state):
    """This call's unroll length (int32 scalar in ``[1, max_length]``)."""
    return sample_length(self.truncation_schedule, key, outer_state, self.max_length)


def pes_weights(delta: jax.Array, mask: jax.Array, is_reset: jax.Array):
  """Split each task's antithetic loss difference between the two perturbations.

  delta, mask, is_reset: ``[T, n]`` (``L+ - L-``, 1 on unmasked steps, 1 on reset steps).
  Returns ``(w_old, w_new)``, each ``[n]``: the masked mean over steps of ``delta`` on the
  steps before the first reset (they multiply the accumulated perturbation) and from the
  first reset on (they multiply the current perturbation alone).
  """
  chex.assert_equal_shape([delta, mask, is_reset])
  in_new_trajectory = jnp.cumsum(is_reset.astype(jnp.int32), axis=0) > 0
  w_old = common.masked_mean_over_steps(jnp.where(in_new_trajectory, 0.0, delta), mask)
  w_new = common.masked_mean_over_steps(jnp.where(in_new_trajectory, delta, 0.0), mask)
  return w_old, w_new


class AntitheticTruncatedEstimator(GradientEstimator):
  """Construction and options shared by the antithetic truncated ES estimators (PES and
  NRES): the truncated step (given, or built from parts), ``trunc_length``, ``std``,
  ``steps_per_jit`` (accepted for reference compatibility; each truncation is one scan),
  ``stack_antithetic_samples``, ``sign_delta_loss_scalar`` and
  ``clip_nan_loss_to_value``.

  Also takes the reference's older form ``(task_family, learned_opt, trunc_sched,
  num_tasks, trunc_length=10, random_initial_iteration_offset=0, std=0.01,
  steps_per_jit=10, train_and_meta=False, stack_antithetic_samples=False, ...)``
  (``train_and_meta=True`` is ``meta_loss_split="outer_valid"``).
  """

  @reference_forms.reference_form(reference_forms.antithetic_form)
  def __init__(self, truncated_step=None, trunc_length: int = 10, std: float = 0.01,
               steps_per_jit: Optional[int] = 10, stack_antithetic_samples: bool = True,
               sign_delta_loss_scalar: Optional[float] = None,
               clip_nan_loss_to_value: float = 20.0, *, task_family=None,
               learned_opt=None, trunc_sched=None, num_tasks=None,
               random_initial_iteration_offset: int = 0):
    who = type(self).__name__
    self.truncated_step = build_truncated_step(
        truncated_step, task_family, learned_opt, trunc_sched, num_tasks,
        random_initial_iteration_offset, who)
    self.trunc_length = positive_int(who, "trunc_length", trunc_length)
    check_steps_per_jit(who, steps_per_jit)
    self.steps_per_jit = steps_per_jit
    if not std > 0:
      raise ValueError(f"{who}: std must be positive, got {std!r}.")
    self.std = float(std)
    self.stack_antithetic_samples = bool(stack_antithetic_samples)
    self.sign_delta_loss_scalar = sign_delta_loss_scalar
    self.clip_nan_loss_to_value = float(clip_nan_loss_to_value)

  def host_data_steps(self) -> int:
    return self.trunc_length

  def _combine(self, p_out, n_out, old, new):
    """The estimate from one antithetic unroll, shared by PES and NRES.

    p_out/n_out: per-step outputs ``[T, n]``; old/new: per-task perturbations (leaves
    ``[n, *theta.shape]``) that the steps before / from the first reset step depend on.
    ``g_i = (w_old_i * old_i + w_new_i * new_i) / (2 std^2)`` with the weights of
    ``pes_weights``. Returns ``(estimate, restarted)``: the ``LocalEstimate`` without its
    state, and ``[n]`` flags of the tasks that reset inside the unroll.
    """
    mask = p_out.mask
    w_old, w_new = pes_weights(p_out.loss - n_out.loss, mask, p_out.is_reset)
    if self.sign_delta_loss_scalar is not None:
      w_old = jnp.sign(w_old) * self.sign_delta_loss_scalar
      w_new = jnp.sign(w_new) * self.sign_delta_loss_scalar
    scale = 1.0 / (2.0 * self.std ** 2)
    grads = jax.tree.map(jnp.add, common.scale_per_task(w_old * scale, old),
                         common.scale_per_task(w_new * scale, new))
    losses = common.masked_mean_over_steps(0.5 * (p_out.loss + n_out.loss), mask)
    est = finish_estimate(grads, losses, self.clip_nan_loss_to_value, None, p_out)
    return est, jnp.any(p_out.is_reset, axis=0)
