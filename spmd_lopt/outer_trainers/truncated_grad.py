"""Truncated backprop through time (the reference's ``TruncatedGrad``).

Each task keeps one inner state across calls. Per call it runs ``unroll_length`` inner
steps from that state and differentiates the masked-mean meta-loss of those steps with
respect to theta, treating the incoming state as a constant (biased, since the history's
dependence on theta is cut, but low variance)::

    L_i  = sum_t m_t l_{i,t}(theta; s_i) / sum_t m_t        (t over this unroll's steps)
    g_i  = dL_i / dtheta,   grad = mean_i g_i

Per-task gradients (needed to sanitize one diverged task without losing the others) come
from ``estimator_base.per_task_grads``.

Memory: reverse mode keeps every step's residuals. ``use_remat=True`` checkpoints each
chunk of ``remat_chunk`` steps (``jax.checkpoint``): only the chunk-boundary states are
stored and a chunk's steps are recomputed during the backward pass (about one extra
forward pass of compute). Chunking never changes the numbers: step ``t`` uses the key
``fold_in(key, t)`` either way, the same as ``truncated_step.unroll``.
"""

from __future__ import annotations

from typing import Any, Optional

import flax

from spmd_lopt.outer_trainers import common
from spmd_lopt.outer_trainers import estimator_base
from spmd_lopt.outer_trainers import reference_forms
from spmd_lopt.outer_trainers import lopt_truncated_step


@flax.struct.dataclass
class TruncatedGradWorkerState:
  """inner_state: the task-batched truncated-step state, persisting across calls."""
  inner_state: Any


def _reference_form(task_family, learned_opt, trunc_sched, num_tasks,
                    unroll_length: int = 20, steps_per_jit: Optional[int] = 10,
                    train_and_meta: bool = False, loss_type: str = "avg",
                    random_initial_iteration_offset: int = 0,
                    meta_loss_split: Optional[str] = None, use_remat: bool = False) -> dict:
  """The reference's older ``TruncatedGrad(task_family, learned_opt, trunc_sched,
  num_tasks, ...)`` as keyword arguments of today's constructor."""
  if loss_type != "avg":
    raise ValueError(f"TruncatedGrad: loss_type must be 'avg' (the masked mean over the "
                     f"unroll), got {loss_type!r}.")
  split = reference_forms.reference_meta_loss_split("TruncatedGrad", train_and_meta,
                                                   meta_loss_split)
  step = lopt_truncated_step.VectorizedLOptTruncatedStep(
      task_family, learned_opt, trunc_sched, num_tasks, meta_loss_split=split,
      random_initial_iteration_offset=random_initial_iteration_offset)
  return dict(truncated_step=step, unroll_length=unroll_length,
              steps_per_jit=steps_per_jit, use_remat=use_remat)


class TruncatedGrad(estimator_base.GradientEstimator):
  """Truncated backprop through ``unroll_length`` inner steps (module docstring).

  remat_chunk: steps per ``jax.checkpoint`` chunk when ``use_remat`` (clamped to
  ``unroll_length``; need not divide it). steps_per_jit: accepted for reference
  compatibility, no effect (the unroll is one program).

  Also takes the reference's older form ``(task_family, learned_opt, trunc_sched,
  num_tasks, unroll_length=20, steps_per_jit=10, train_and_meta=False, loss_type="avg",
  random_initial_iteration_offset=0)``.
  """

  @reference_forms.reference_form(_reference_form)
  def __init__(self, truncated_step, unroll_length: int = 20,
               steps_per_jit: Optional[int] = 10, use_remat: bool = False,
               clip_nan_loss_to_value: float = 20.0, remat_chunk: int = 10):
    estimator_base.check_step("TruncatedGrad", truncated_step)
    self.unroll_length = estimator_base.positive_int("TruncatedGrad", "unroll_length",
                                                     unroll_length)
    estimator_base.check_steps_per_jit("TruncatedGrad", steps_per_jit)
    self.steps_per_jit = steps_per_jit
    self.remat_chunk = min(
        estimator_base.positive_int("TruncatedGrad", "remat_chunk", remat_chunk),
        self.unroll_length)
    self.truncated_step = truncated_step
    self.use_remat = bool(use_remat)
    self.clip_nan_loss_to_value = float(clip_nan_loss_to_value)

  def host_data_steps(self) -> int:
    return self.unroll_length

  def init_local(self, theta, outer_state, key, task_ids):
    return TruncatedGradWorkerState(self.truncated_step.init_step_state(
        theta, outer_state, key, task_ids=task_ids))

  def estimate_local(self, theta, state, key, task_ids, outer_state, data=None):
    def loss_fn(theta_vec):
      new_state, out = common.unroll_in_chunks(
          self.truncated_step, theta_vec, state.inner_state, key, self.unroll_length,
          outer_state, task_ids, theta_is_vector=True,
          steps_per_chunk=self.remat_chunk if self.use_remat else None,
          remat=self.use_remat, data=data)
      return common.masked_mean_over_steps(out.loss, out.mask), (new_state, out)

    grads, losses, (new_state, out) = estimator_base.per_task_grads(loss_fn, theta,
                                                                    task_ids)
    return estimator_base.finish_estimate(grads, losses, self.clip_nan_loss_to_value,
                                          TruncatedGradWorkerState(new_state), out)
