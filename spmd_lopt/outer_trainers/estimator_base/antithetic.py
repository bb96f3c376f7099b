"""The base of the antithetic truncated ES estimators (PES, NRES): shared construction
and options, and the estimate from one antithetic pair of unrolls (``pes_weights``,
``AntitheticTruncatedEstimator._combine``).
"""

from __future__ import annotations

from typing import Optional

import chex
import jax
import jax.numpy as jnp

from spmd_lopt.outer_trainers import common
from spmd_lopt.outer_trainers import reference_forms
from spmd_lopt.outer_trainers.estimator_base import arguments
from spmd_lopt.outer_trainers.estimator_base import per_task
from spmd_lopt.outer_trainers.estimator_base.interface import GradientEstimator


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
    self.truncated_step = arguments.build_truncated_step(
        truncated_step, task_family, learned_opt, trunc_sched, num_tasks,
        random_initial_iteration_offset, who)
    self.trunc_length = arguments.positive_int(who, "trunc_length", trunc_length)
    arguments.check_steps_per_jit(who, steps_per_jit)
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
    est = per_task.finish_estimate(grads, losses, self.clip_nan_loss_to_value, None, p_out)
    return est, jnp.any(p_out.is_reset, axis=0)
