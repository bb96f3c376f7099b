"""Reverse-mode meta-gradients: truncated backprop through time, and full backprop.

``TruncatedGrad``: each task keeps one inner state across calls. Per call it runs
``unroll_length`` inner steps from that state and differentiates the masked-mean meta-loss
of those steps with respect to theta, treating the incoming state as a constant
(truncated BPTT: biased, since the history's dependence on theta is cut, but low
variance)::

    L_i  = sum_t m_t l_{i,t}(theta; s_i) / sum_t m_t        (t over this unroll's steps)
    g_i  = dL_i / dtheta,   grad = mean_i g_i

``FullGrad``: the same derivative over a whole trajectory started fresh each call (no
truncation bias); the length comes from a truncation schedule as in ``FullES``.

Per-task gradients (needed to sanitize one diverged task without losing the others) come
from differentiating ``sum_i L_i`` with respect to theta broadcast to ``[n, ...]``: row
``i`` of that gradient is ``dL_i/dtheta``.

Memory: reverse mode keeps every step's residuals. ``use_remat=True`` checkpoints each
chunk of ``steps_per_jit`` steps (``jax.checkpoint``): only the chunk-boundary states are
stored and a chunk's steps are recomputed during the backward pass (about one extra
forward pass of compute). Chunking never changes the numbers: step ``t`` uses the key
``fold_in(key, t)`` either way, the same as ``truncated_step.unroll``.
"""

from __future__ import annotations

from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp

from spmd_lopt.outer_trainers import common
from spmd_lopt.outer_trainers import estimator_base
from spmd_lopt.outer_trainers import full_es
from spmd_lopt.outer_trainers import truncated_pes
from spmd_lopt.outer_trainers import truncated_step as truncated_step_lib


@flax.struct.dataclass
class TruncatedGradWorkerState:
  """inner_state: the task-batched truncated-step state, persisting across calls."""
  inner_state: Any


def _check_step(who, truncated_step):
  if not isinstance(truncated_step, truncated_step_lib.VectorizedTruncatedStep):
    raise TypeError(f"{who}: truncated_step must be a VectorizedTruncatedStep, got "
                    f"{type(truncated_step).__name__}.")


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


def _finish(grads, losses, clip_nan_loss_to_value, state, out):
  grads, losses, nonfinite = estimator_base.sanitize_per_task(grads, losses,
                                                              clip_nan_loss_to_value)
  info = estimator_base.UnrollInfo(loss=out.loss, iteration=out.iteration,
                                   task_param=out.task_param, is_done=out.is_done)
  return estimator_base.LocalEstimate(
      grad=jax.tree.map(lambda g: jnp.mean(g, axis=0), grads), loss=jnp.mean(losses),
      nonfinite=nonfinite, state=state, unroll_info=info)


class TruncatedGrad(estimator_base.GradientEstimator):
  """Truncated backprop through ``unroll_length`` inner steps (module docstring).

  ``steps_per_jit`` (clamped to ``unroll_length``, must divide it) is the remat chunk;
  ``use_remat`` turns checkpointing on.
  """

  def __init__(self, truncated_step, unroll_length: int = 20,
               steps_per_jit: Optional[int] = 10, use_remat: bool = False,
               clip_nan_loss_to_value: float = 20.0):
    _check_step("TruncatedGrad", truncated_step)
    if steps_per_jit is not None and steps_per_jit > unroll_length:
      steps_per_jit = unroll_length
    self.steps_per_jit = truncated_pes.check_lengths("TruncatedGrad", unroll_length,
                                                     steps_per_jit)
    self.truncated_step = truncated_step
    self.unroll_length = int(unroll_length)
    self.use_remat = bool(use_remat)
    self.clip_nan_loss_to_value = float(clip_nan_loss_to_value)

  def init_local(self, theta, outer_state, key, task_ids):
    return TruncatedGradWorkerState(self.truncated_step.init_step_state(
        theta, outer_state, key, task_ids=task_ids))

  def estimate_local(self, theta, state, key, task_ids, outer_state):
    def loss_fn(theta_vec):
      new_state, out = common.unroll_in_chunks(
          self.truncated_step, theta_vec, state.inner_state, key, self.unroll_length,
          outer_state, task_ids, theta_is_vector=True, steps_per_chunk=self.steps_per_jit,
          remat=self.use_remat)
      return common.masked_mean_over_steps(out.loss, out.mask), (new_state, out)

    grads, losses, (new_state, out) = per_task_grads(loss_fn, theta, task_ids)
    return _finish(grads, losses, self.clip_nan_loss_to_value,
                   TruncatedGradWorkerState(new_state), out)


class FullGrad(estimator_base.GradientEstimator):
  """Backprop through whole fresh unrolls (length from ``truncation_schedule``, as in
  ``FullES``; the truncated step must use ``NeverEndingTruncationSchedule``). For short
  problems: memory grows with the length (``use_remat`` keeps it to one state per chunk).
  ``loss_type`` is one of "avg", "min", "last" (see ``full_es``).
  """

  def __init__(self, truncated_step, truncation_schedule, use_remat: bool = True,
               steps_per_jit: Optional[int] = 10, loss_type: str = "avg",
               clip_nan_loss_to_value: float = 20.0):
    _check_step("FullGrad", truncated_step)
    common.check_never_ending("FullGrad", truncated_step)
    if loss_type not in ("avg", "min", "last"):
      raise ValueError("FullGrad: loss_type must be 'avg', 'min' or 'last', got "
                       f"{loss_type!r}.")
    self.truncated_step = truncated_step
    self.truncation_schedule = truncation_schedule
    self.max_length, self.steps_per_jit = common.whole_unroll_lengths(
        "FullGrad", truncation_schedule, steps_per_jit)
    self.use_remat = bool(use_remat)
    self.loss_type = loss_type
    self.clip_nan_loss_to_value = float(clip_nan_loss_to_value)

  def init_local(self, theta, outer_state, key, task_ids):
    del theta, outer_state, key, task_ids
    return full_es.FullUnrollWorkerState()

  def estimate_local(self, theta, state, key, task_ids, outer_state):
    del state
    k_len, k_init, k_unroll = jax.random.split(key, 3)
    num_active = common.sample_num_active(self.truncation_schedule, k_len, outer_state,
                                          self.steps_per_jit, self.max_length)
    step = self.truncated_step

    def loss_fn(theta_vec):
      # The initial state depends on theta only through the optimizer's init; it is part
      # of the unrolled function, so it is differentiated too.
      init = step.init_step_state(theta_vec, outer_state, k_init, theta_is_vector=True,
                                  task_ids=task_ids)
      _, out = common.unroll_in_chunks(
          step, theta_vec, init, k_unroll, self.max_length, outer_state, task_ids,
          theta_is_vector=True, steps_per_chunk=self.steps_per_jit, remat=self.use_remat,
          num_active=num_active)
      return full_es.reduce_unroll_loss(out.loss, out.mask, num_active,
                                        self.loss_type), out

    grads, losses, out = per_task_grads(loss_fn, theta, task_ids)
    return _finish(grads, losses, self.clip_nan_loss_to_value,
                   full_es.FullUnrollWorkerState(), out)
