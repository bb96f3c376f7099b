"""Noise-Reuse Evolution Strategies (Li et al., NeurIPS 2023), antithetic, online.

Each task's trajectory draws one perturbation ``e_i ~ N(0, std^2 I)`` when it starts and
keeps it for all its truncations: its ``+`` and ``-`` copies are always unrolled with
``theta + e_i`` and ``theta - e_i``. Because the whole history of the trajectory saw the
same ``e_i``, the current truncation's losses alone give an unbiased (smoothed) estimate of
the gradient of those losses through the whole history, with no accumulator::

    g_i  = [ sum_{t < r} m_t D_t * e_i  +  sum_{t >= r} m_t D_t * e'_i ] / (2 std^2 M)
    grad = mean_i g_i

with ``D_t = L+_t - L-_t``, ``M = sum_t m_t``, ``r`` the first reset step of the unroll
(``T`` if none) and ``e'_i`` the fresh perturbation of the trajectory that starts at the
reset. This is PES with the accumulated noise ``xi_i`` replaced by the trajectory's own
noise: PES's ``xi_i`` is a sum of one draw per truncation so far (``E|xi|^2`` grows
linearly with the number of truncations), NRES's ``e_i`` is one draw, hence lower variance
when a trajectory spans several truncations (Li et al. 2023; ``tests/test_estimators``).

Boundary handling is PES's (``truncated_pes``): the step on which a trajectory ends belongs
to the old trajectory (its loss is computed from the old params, unrolled with ``e_i``);
the new trajectory begins at the reset step, so the split is at the first reset step
(``cumsum(is_reset) > 0``). For the new trajectory to see only ``e'_i``, theta switches
from ``theta +- e_i`` to ``theta +- e'_i`` at that step: the unroll is a scan over single
inner steps whose per-task theta is chosen from a carried "started a new trajectory" flag.
After the call, a task that restarted keeps ``e'_i`` (its new trajectory's noise).

State per task: the ``+``/``-`` inner states and the current trajectory's noise.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp

from spmd_lopt.outer_trainers import common
from spmd_lopt.outer_trainers import estimator_base


@flax.struct.dataclass
class NRESWorkerState:
  """pos_state/neg_state: task-batched unroll states; noise: the current trajectory's
  perturbation, theta-shaped leaves with a leading task axis."""
  pos_state: Any
  neg_state: Any
  noise: Any


class TruncatedNRES(estimator_base.AntitheticTruncatedEstimator):
  """Antithetic noise-reuse ES (module docstring). Same construction and options as
  ``TruncatedPES``: ``trunc_length``, ``std``, ``steps_per_jit`` (accepted, no effect: the
  truncation is one scan), ``stack_antithetic_samples``, ``sign_delta_loss_scalar``."""

  def init_local(self, theta, outer_state, key, task_ids):
    # Two independent streams: the inner states must not share randomness with the noise.
    k_state, k_noise = jax.random.split(key)
    state = self.truncated_step.init_step_state(theta, outer_state, k_state,
                                                task_ids=task_ids)
    noise = common.per_task_noise(k_noise, task_ids, theta, self.std)
    return NRESWorkerState(pos_state=state, neg_state=state, noise=noise)

  def _unroll(self, theta, e_old, e_new, state: NRESWorkerState, key, task_ids,
              outer_state, data=None):
    """``trunc_length`` steps; step ``t`` uses ``fold_in(key, t)`` (as ``unroll``) and, per
    task, ``theta +- e_old`` until the task's first reset step, ``theta +- e_new`` from it
    on. ``data``: ``None`` or host-fed batches ``[T, n, ...]``. Returns ``(pos_state,
    neg_state, p_out, n_out)``, outputs ``[T, n]``."""
    step = self.truncated_step
    stacked = self.stack_antithetic_samples

    def thetas(started):
      e = common.select_per_task(started, e_new, e_old)
      return common.add_per_task(theta, e, +1.0), common.add_per_task(theta, e, -1.0)

    def one_step(st, th, ids, k, batch):
      return step.unroll_step(th, st, k, data=batch, outer_state=outer_state,
                              theta_is_vector=True, task_ids=ids)

    def body(carry, xs):
      t, batch = xs
      pos, neg, started = carry
      # pos.is_done marks the tasks this step resets: their new trajectory starts now.
      started = started | pos.is_done
      th_p, th_n = thetas(started)
      k = jax.random.fold_in(key, t)
      if stacked:
        both_th, both_ids, both_batch = common.stack_antithetic(th_p, th_n, task_ids, batch)
        both, out = one_step(common.concat_tasks(pos, neg), both_th, both_ids, k,
                             both_batch)
        pos, neg = common.unstack_antithetic(both)
        p_out, n_out = common.unstack_antithetic(out)
      else:
        pos, p_out = one_step(pos, th_p, task_ids, k, batch)
        neg, n_out = one_step(neg, th_n, task_ids, k, batch)
      return (pos, neg, started), (p_out, n_out)

    # zeros_like of a state leaf (not jnp.zeros): under shard_map the carry must have the
    # same "varying over the task axis" type as the flags it is OR-ed with.
    init = (state.pos_state, state.neg_state, jnp.zeros_like(state.pos_state.is_done))
    (pos, neg, _), (p_out, n_out) = jax.lax.scan(
        body, init, (jnp.arange(self.trunc_length), data))
    return pos, neg, p_out, n_out

  def estimate_local(self, theta, state, key, task_ids, outer_state, data=None):
    k_noise, k_unroll = jax.random.split(key)
    e_old = state.noise
    e_new = common.per_task_noise(k_noise, task_ids, theta, self.std)
    pos_state, neg_state, p_out, n_out = self._unroll(
        theta, e_old, e_new, state, k_unroll, task_ids, outer_state, data)

    est, restarted = self._combine(p_out, n_out, e_old, e_new)
    next_noise = common.select_per_task(restarted, e_new, e_old)
    return est.replace(state=NRESWorkerState(pos_state=pos_state, neg_state=neg_state,
                                             noise=next_noise))
