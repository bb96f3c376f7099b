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

from typing import Any

import flax
import jax
import jax.numpy as jnp

from spmd_lopt.outer_trainers import common
from spmd_lopt.outer_trainers import estimator_base


@flax.struct.dataclass
class PESWorkerState:
  """pos_state/neg_state: task-batched unroll states; accumulator: theta-shaped leaves with
  a leading task axis."""
  pos_state: Any
  neg_state: Any
  accumulator: Any


class TruncatedPES(estimator_base.AntitheticTruncatedEstimator):
  """Antithetic truncated PES (see module docstring for the estimator).

  Construct it the reference way, ``TruncatedPES(truncated_step=..., trunc_length=50)``,
  or from parts: ``TruncatedPES(task_family=..., learned_opt=..., trunc_sched=...,
  num_tasks=..., trunc_length=..., random_initial_iteration_offset=..., std=...)``.

  ``steps_per_jit`` is accepted for compatibility and has no effect: the whole truncation
  always runs as one ``lax.scan`` inside the fused step. ``stack_antithetic_samples=True``
  runs the positive and negative unrolls as one scan over ``2 * tasks`` (one batched
  program); ``False`` runs two scans.
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
      both_theta, both_ids, both_data = common.stack_antithetic(
          pos_theta, neg_theta, task_ids, data, data_axis=1)
      both, out = run(both_theta, common.concat_tasks(state.pos_state, state.neg_state),
                      both_ids, both_data)
      pos_state, neg_state = common.unstack_antithetic(both, axis=0)
      p_out, n_out = common.unstack_antithetic(out, axis=1)
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
    est, restarted = self._combine(p_out, n_out, acc, eps)
    next_acc = common.select_per_task(restarted, eps, acc)
    return est.replace(state=PESWorkerState(pos_state=pos_state, neg_state=neg_state,
                                            accumulator=next_acc))
