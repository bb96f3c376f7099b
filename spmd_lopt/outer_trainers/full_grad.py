"""Full backprop through whole fresh unrolls (the reference's ``FullGrad``).

Every call starts each task from a fresh inner problem (new task, new params, the inner
optimizer told the drawn length as ``num_steps``), unrolls it for a length drawn from
``truncation_schedule`` (one length per call, shared by all tasks) and differentiates the
per-task meta-loss with respect to theta, including theta's effect on the initial state::

    L_i  = loss_type-reduction of l_{i,t}(theta), t < length
    g_i  = dL_i / dtheta,   grad = mean_i g_i          (no truncation bias)

For short problems: memory grows with the length; ``use_remat`` keeps it to one state per
``chunk_length`` steps plus one chunk's activations. The scan is static (``max_length``
steps); steps past the drawn length are skipped, so a drawn length costs exactly itself.
The truncated step must use ``NeverEndingTruncationSchedule`` (as for ``FullES``).
Host-fed data (families with host iterators): ``data`` leaves ``[max_length, n, ...]``.
"""

from __future__ import annotations

from typing import Optional

import jax

from spmd_lopt.outer_trainers import common
from spmd_lopt.outer_trainers import estimator_base
from spmd_lopt.outer_trainers import full_es


class FullGrad(estimator_base.WholeUnrollEstimator):
  """Backprop through whole fresh unrolls (module docstring).

  Args:
    truncated_step: built with ``NeverEndingTruncationSchedule``.
    truncation_schedule: the unroll length per call (finite ``max_length``).
    use_remat: checkpoint each chunk. chunk_length: steps per chunk (remat and skipping of
      steps past the drawn length; clamped to ``max_length``, need not divide it).
    loss_type: "avg", "min" or "last" (see ``full_es``). steps_per_jit: accepted for
      reference compatibility, no effect.
  """

  def __init__(self, truncated_step, truncation_schedule, use_remat: bool = True,
               steps_per_jit: Optional[int] = 10, loss_type: str = "avg",
               clip_nan_loss_to_value: float = 20.0, chunk_length: int = 10):
    super().__init__(truncated_step, truncation_schedule, steps_per_jit, chunk_length,
                     clip_nan_loss_to_value)
    if loss_type not in ("avg", "min", "last"):
      raise ValueError("FullGrad: loss_type must be 'avg', 'min' or 'last', got "
                       f"{loss_type!r}.")
    self.use_remat = bool(use_remat)
    self.loss_type = loss_type

  def estimate_local(self, theta, state, key, task_ids, outer_state, data=None):
    del state
    k_len, k_init, k_unroll = jax.random.split(key, 3)
    length = self.sample_length(k_len, outer_state)
    step = self.truncated_step

    def loss_fn(theta_vec):
      # The initial state depends on theta through the optimizer's init; it is part of
      # the unrolled function, so it is differentiated too.
      init = step.init_step_state(theta_vec, outer_state, k_init, theta_is_vector=True,
                                  task_ids=task_ids, num_steps_override=length)
      _, out = common.unroll_in_chunks(
          step, theta_vec, init, k_unroll, self.max_length, outer_state, task_ids,
          theta_is_vector=True, steps_per_chunk=self.chunk_length, remat=self.use_remat,
          num_active=length, data=data)
      return full_es.reduce_unroll_loss(out.loss, out.mask, length, self.loss_type), out

    grads, losses, out = estimator_base.per_task_grads(loss_fn, theta, task_ids)
    return estimator_base.finish_estimate(grads, losses, self.clip_nan_loss_to_value,
                                          estimator_base.FullUnrollWorkerState(), out)
