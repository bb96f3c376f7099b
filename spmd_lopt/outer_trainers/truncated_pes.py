"""Truncated Persistent Evolution Strategies (Vicol et al., 2021), antithetic.

Each task ``i`` keeps two inner states (unrolled with ``theta + eps`` and ``theta - eps``)
and an accumulator ``xi_i``: the sum of the perturbations its current trajectory has seen.
Per call, with fresh ``eps_i ~ N(0, std^2 I)``, both states are unrolled ``trunc_length``
steps giving per-step meta-losses ``L+_t, L-_t`` and masks ``m_t`` (0 on reset steps).
With ``D_t = L+_t - L-_t`` and ``M = sum_t m_t``::

    xi_i'  = xi_i + eps_i
    g_i    = [ sum_{t < r} m_t D_t * xi_i'  +  sum_{t >= r} m_t D_t * eps_i ] / (2 std^2 M)
    grad   = mean_i g_i

where ``r`` is the first *reset* step of the unroll (``T`` if none). After the call the
accumulator is ``eps_i`` if a reset happened in the unroll (the new trajectory has seen only
this perturbation) and ``xi_i'`` otherwise.

Which perturbation gets the loss of the step on which a trajectory ends: the *old* one.
That step's loss is computed from the old trajectory's parameters, which depend on every
perturbation of the old trajectory; the new trajectory starts on the next step (the reset
step, whose loss is masked). The reference instead splits at the ``is_done`` step itself
(``cumsum(is_done) > 0``), crediting the ending step's loss to ``eps`` alone and dropping
the older perturbations from its estimate, and, when a trajectory ends on the last step of
an unroll, starts the next unroll's accumulator at ``eps`` although the new trajectory has
seen none of it. Splitting at the reset step (``cumsum(is_reset) > 0``, outputs of the
truncated step) fixes both; ``tests/test_pes.py`` checks the estimate against the exact
gradient across a trajectory boundary.

``sign_delta_loss_scalar = c`` replaces each task's two weighted loss differences by
``c * sign(.)`` (robust to heavy-tailed losses, as in the reference).
"""

from __future__ import annotations

from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp

from spmd_lopt.outer_trainers import common
from spmd_lopt.outer_trainers import estimator_base
from spmd_lopt.outer_trainers import lopt_truncated_step
from spmd_lopt.outer_trainers import truncated_step as truncated_step_lib
from spmd_lopt.tasks import base as tasks_base


@flax.struct.dataclass
class PESWorkerState:
  """pos_state/neg_state: task-batched unroll states; accumulator: theta-shaped leaves with
  a leading task axis."""
  pos_state: Any
  neg_state: Any
  accumulator: Any


def build_truncated_step(truncated_step, task_family, learned_opt, trunc_sched, num_tasks,
                         random_initial_iteration_offset, who: str):
  """Accept either a ready truncated step or the pieces to build one (issue-style
  keyword construction), and fail clearly on a mix or a gap."""
  if isinstance(truncated_step, tasks_base.TaskFamily):
    task_family, truncated_step = truncated_step, None
  if truncated_step is not None:
    if not isinstance(truncated_step, truncated_step_lib.VectorizedTruncatedStep):
      raise TypeError(f"{who}: truncated_step must be a VectorizedTruncatedStep, got "
                      f"{type(truncated_step).__name__}.")
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


def check_lengths(who: str, trunc_length: int, steps_per_jit: Optional[int]) -> int:
  if int(trunc_length) != trunc_length or trunc_length <= 0:
    raise ValueError(f"{who}: trunc_length must be a positive integer, got "
                     f"{trunc_length!r}.")
  if steps_per_jit is None:
    return int(trunc_length)
  if int(steps_per_jit) != steps_per_jit or steps_per_jit <= 0:
    raise ValueError(f"{who}: steps_per_jit must be a positive integer, got "
                     f"{steps_per_jit!r}.")
  if trunc_length % steps_per_jit:
    raise ValueError(f"{who}: trunc_length ({trunc_length}) must be a multiple of "
                     f"steps_per_jit ({steps_per_jit}).")
  return int(steps_per_jit)


def pes_weights(delta: jax.Array, mask: jax.Array, is_reset: jax.Array):
  """Split each task's antithetic loss difference between the two perturbations.

  delta, mask, is_reset: ``[T, n]`` (``L+ - L-``, 1 on unmasked steps, 1 on reset steps).
  Returns ``(w_old, w_new)``, each ``[n]``: the masked mean over steps of ``delta`` on the
  steps before the first reset (they multiply the accumulated perturbation) and from the
  first reset on (they multiply the current perturbation alone).
  """
  in_new_trajectory = jnp.cumsum(is_reset.astype(jnp.int32), axis=0) > 0
  w_old = common.masked_mean_over_steps(jnp.where(in_new_trajectory, 0.0, delta), mask)
  w_new = common.masked_mean_over_steps(jnp.where(in_new_trajectory, delta, 0.0), mask)
  return w_old, w_new


class AntitheticTruncatedEstimator(estimator_base.GradientEstimator):
  """Construction and options shared by the antithetic truncated ES estimators (PES and
  NRES): the truncated step (given, or built from parts), ``trunc_length``, ``std``,
  ``steps_per_jit`` (validated only), ``stack_antithetic_samples``,
  ``sign_delta_loss_scalar`` and ``clip_nan_loss_to_value``."""

  def __init__(self, truncated_step=None, trunc_length: int = 10, std: float = 0.01,
               steps_per_jit: Optional[int] = 10, stack_antithetic_samples: bool = True,
               sign_delta_loss_scalar: Optional[float] = None,
               clip_nan_loss_to_value: float = 20.0, *, task_family=None,
               learned_opt=None, trunc_sched=None, num_tasks=None,
               random_initial_iteration_offset: int = 0):
    self.truncated_step = build_truncated_step(
        truncated_step, task_family, learned_opt, trunc_sched, num_tasks,
        random_initial_iteration_offset, type(self).__name__)
    if steps_per_jit is not None and steps_per_jit > trunc_length:
      steps_per_jit = trunc_length
    self.steps_per_jit = check_lengths(type(self).__name__, trunc_length,
                                       steps_per_jit)
    if not std > 0:
      raise ValueError(f"{type(self).__name__}: std must be positive, got {std!r}.")
    self.trunc_length = int(trunc_length)
    self.std = float(std)
    self.stack_antithetic_samples = bool(stack_antithetic_samples)
    self.sign_delta_loss_scalar = sign_delta_loss_scalar
    self.clip_nan_loss_to_value = float(clip_nan_loss_to_value)

  def _combine(self, p_out, n_out, old, new):
    """The estimate from one antithetic unroll, shared by PES and NRES.

    p_out/n_out: per-step outputs ``[T, n]``; old/new: per-task perturbations (leaves
    ``[n, *theta.shape]``) that the steps before / from the first reset step depend on.
    ``g_i = (w_old_i * old_i + w_new_i * new_i) / (2 std^2)`` with the weights of
    ``pes_weights``. Returns ``(grad, loss, nonfinite, unroll_info, restarted)``: grad
    and loss are means over the slice after ``sanitize_per_task``; restarted ``[n]`` says
    which tasks reset inside the unroll.
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
    grads, losses, nonfinite = estimator_base.sanitize_per_task(
        grads, losses, self.clip_nan_loss_to_value)
    info = estimator_base.UnrollInfo(loss=p_out.loss, iteration=p_out.iteration,
                                     task_param=p_out.task_param, is_done=p_out.is_done)
    return (jax.tree.map(lambda g: jnp.mean(g, axis=0), grads), jnp.mean(losses),
            nonfinite, info, jnp.any(p_out.is_reset, axis=0))


class TruncatedPES(AntitheticTruncatedEstimator):
  """Antithetic truncated PES (see module docstring for the estimator).

  Construct it the reference way, ``TruncatedPES(truncated_step=..., trunc_length=50)``,
  or from parts: ``TruncatedPES(task_family=..., learned_opt=..., trunc_sched=...,
  num_tasks=..., trunc_length=..., random_initial_iteration_offset=..., std=...)``.

  ``steps_per_jit`` is validated (it must divide ``trunc_length``) for compatibility; the
  whole truncation always runs as one ``lax.scan`` inside the fused step, so it does not
  change the program. ``stack_antithetic_samples=True`` runs the positive and negative
  unrolls as one scan over ``2 * tasks`` (one batched program); ``False`` runs two scans.
  """

  def init_local(self, theta, outer_state, key, task_ids):
    state = self.truncated_step.init_step_state(theta, outer_state, key,
                                                task_ids=task_ids)
    acc = jax.tree.map(lambda t: jnp.zeros((task_ids.shape[0],) + t.shape, t.dtype), theta)
    return PESWorkerState(pos_state=state, neg_state=state, accumulator=acc)

  def _antithetic_unroll(self, theta, eps, state: PESWorkerState, key, task_ids,
                         outer_state, data=None):
    step = self.truncated_step
    pos_theta = common.add_per_task(theta, eps, +1.0)
    neg_theta = common.add_per_task(theta, eps, -1.0)
    run = lambda th, st, ids, d: step.unroll(th, st, key, self.trunc_length, outer_state,
                                             theta_is_vector=True, task_ids=ids, data=d)
    if self.stack_antithetic_samples:
      n = task_ids.shape[0]
      # Both halves see the same batches: the antithetic difference must not carry data noise.
      both_data = jax.tree.map(lambda d: jnp.concatenate([d, d], axis=1), data)
      both, out = run(common.concat_tasks(pos_theta, neg_theta),
                      common.concat_tasks(state.pos_state, state.neg_state),
                      jnp.concatenate([task_ids, task_ids]), both_data)
      pos_state, neg_state = common.split_tasks(both, n)
      p_out = jax.tree.map(lambda x: x[:, :n], out)
      n_out = jax.tree.map(lambda x: x[:, n:], out)
    else:
      pos_state, p_out = run(pos_theta, state.pos_state, task_ids, data)
      neg_state, n_out = run(neg_theta, state.neg_state, task_ids, data)
    return pos_state, neg_state, p_out, n_out

  def estimate_local(self, theta, state, key, task_ids, outer_state, data=None):
    k_noise, k_unroll = jax.random.split(key)
    eps = common.per_task_noise(k_noise, task_ids, theta, self.std)
    pos_state, neg_state, p_out, n_out = self._antithetic_unroll(
        theta, eps, state, k_unroll, task_ids, outer_state, data)

    acc = jax.tree.map(jnp.add, state.accumulator, eps)
    grad, loss, nonfinite, info, restarted = self._combine(p_out, n_out, acc, eps)
    next_acc = common.select_per_task(restarted, eps, acc)
    return estimator_base.LocalEstimate(
        grad=grad, loss=loss, nonfinite=nonfinite,
        state=PESWorkerState(pos_state=pos_state, neg_state=neg_state, accumulator=next_acc),
        unroll_info=info)
