"""PES is right: its split of credit at a trajectory boundary, and its estimate against
the exact gradient of the unrolled meta-loss, within and across a truncation boundary."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spmd_lopt.learned_optimizers import mlp_lopt
from spmd_lopt.outer_trainers import common
from spmd_lopt.outer_trainers import estimator_base
from spmd_lopt.outer_trainers import lopt_truncated_step
from spmd_lopt.outer_trainers import truncated_pes
from spmd_lopt.outer_trainers import truncation_schedule
from spmd_lopt.tasks import quadratics

from helpers import cosine


def test_the_ending_step_is_credited_to_the_old_trajectory():
  # Trajectory ends on step 1 (is_done there), step 2 is the (masked) reset, step 3 is the
  # first step of the new trajectory.
  delta = jnp.asarray([[1.0], [2.0], [4.0], [8.0]])
  mask = jnp.asarray([[1], [1], [0], [1]])
  is_reset = jnp.asarray([[0], [0], [1], [0]])
  w_old, w_new = estimator_base.pes_weights(delta, mask, is_reset)
  np.testing.assert_allclose(w_old, [(1.0 + 2.0) / 3])
  np.testing.assert_allclose(w_new, [8.0 / 3])


def test_reset_on_first_step_credits_everything_to_the_new_trajectory():
  delta = jnp.asarray([[1.0], [2.0], [4.0]])
  mask = jnp.asarray([[0], [1], [1]])
  is_reset = jnp.asarray([[1], [0], [0]])
  w_old, w_new = estimator_base.pes_weights(delta, mask, is_reset)
  np.testing.assert_allclose(w_old, [0.0])
  np.testing.assert_allclose(w_new, [3.0])


def _setup(num_tasks, length, trunc_length, std):
  lopt = mlp_lopt.MLPLOpt(hidden_size=8, hidden_layers=1, step_mult=0.03, exp_mult=0.1)
  sched = truncation_schedule.ConstantTruncationSchedule(length)
  step = lopt_truncated_step.VectorizedLOptTruncatedStep(
      quadratics.FixedDimQuadraticFamily(4), lopt, sched, num_tasks=num_tasks)
  est = truncated_pes.TruncatedPES(truncated_step=step, trunc_length=trunc_length, std=std)
  return lopt, step, est


def test_trajectory_ending_on_the_last_step_keeps_its_accumulator():
  # length 4 = trunc_length: every task ends on the unroll's last step; the reset happens
  # on the first step of the next unroll, so this unroll's perturbations stay accumulated.
  lopt, step, est = _setup(num_tasks=4, length=4, trunc_length=4, std=0.01)
  theta = lopt.init(jax.random.key(0))
  ids = jnp.arange(4)
  os_ = estimator_base.OuterState(jnp.asarray(0))
  state = est.init_local(theta, os_, jax.random.key(1), ids)
  out1 = est.estimate_local(theta, state, jax.random.key(2), ids, os_)
  assert bool(jnp.all(out1.unroll_info.is_done[-1]))
  eps1 = common.per_task_noise(jax.random.split(jax.random.key(2))[0], ids, theta, 0.01)
  assert all(np.allclose(a, e) for a, e in zip(jax.tree.leaves(out1.state.accumulator),
                                               jax.tree.leaves(eps1)))
  out2 = est.estimate_local(theta, out1.state, jax.random.key(3), ids, os_)
  eps2 = common.per_task_noise(jax.random.split(jax.random.key(3))[0], ids, theta, 0.01)
  # Step 0 of the second unroll was the reset: the accumulator restarts at eps2 alone.
  assert bool(jnp.all(out2.unroll_info.is_done[0] == False))  # noqa: E712
  assert all(np.allclose(a, e) for a, e in zip(jax.tree.leaves(out2.state.accumulator),
                                               jax.tree.leaves(eps2)))


@pytest.mark.parametrize("unroll_index", [0, 1], ids=["within_trajectory",
                                                      "across_boundary"])
def test_pes_matches_the_exact_gradient(unroll_index):
  """Trajectories of length 6 unrolled 4 steps at a time: the first unroll lies inside
  one trajectory; the second holds steps 4-5 of the old one (ending on step 5), the reset
  and the first step of a new one. Averaged over many tasks, PES must match the exact
  gradient of that unroll's masked-mean meta-loss through the whole history."""
  num_tasks, std = 8192, 0.01
  lopt, step, est = _setup(num_tasks=num_tasks, length=6, trunc_length=4, std=std)
  theta = lopt.init(jax.random.key(0))
  ids = jnp.arange(num_tasks)
  os_ = estimator_base.OuterState(jnp.asarray(0))
  init_key, keys = jax.random.key(1), [jax.random.key(2), jax.random.key(3)]

  @jax.jit
  def pes(theta):
    state = est.init_local(theta, os_, init_key, ids)
    outs = []
    for k in keys:
      out = est.estimate_local(theta, state, k, ids, os_)
      state = out.state
      outs.append(out)
    return outs[unroll_index].grad, outs[unroll_index].unroll_info

  @jax.jit
  def exact(theta):
    def meta_loss(theta):
      state = step.init_step_state(theta, os_, init_key, task_ids=ids)
      for k in keys[:unroll_index + 1]:
        # PES unrolls with the second half of its key (the first draws the noise).
        state, out = step.unroll(theta, state, jax.random.split(k)[1], 4, os_,
                                 task_ids=ids)
      return jnp.mean(common.masked_mean_over_steps(out.loss, out.mask))
    return jax.grad(meta_loss)(theta)

  @jax.jit
  def history_part_of_ending_step(theta):
    """d/d(theta of the first unroll) of the ending step's share of the second unroll's
    meta-loss: the term an estimator loses if it credits the ending step to the current
    perturbation alone (the reference's convention)."""
    def loss(theta_first, theta_second):
      state = step.init_step_state(theta_first, os_, init_key, task_ids=ids)
      state, _ = step.unroll(theta_first, state, jax.random.split(keys[0])[1], 4, os_,
                             task_ids=ids)
      _, out = step.unroll(theta_second, state, jax.random.split(keys[1])[1], 4, os_,
                           task_ids=ids)
      ending = out.loss[1] * out.mask[1] / jnp.sum(out.mask, axis=0)
      return jnp.mean(ending)
    return jax.grad(loss)(theta, theta)

  g_pes, info = pes(theta)
  if unroll_index == 1:
    assert bool(jnp.all(info.is_done[1])) and not bool(jnp.any(info.is_done[0]))
  g_exact = exact(theta)
  cos = cosine(g_pes, g_exact)
  print(f"cosine(PES, exact) = {cos:.4f}")
  assert cos > 0.9
  if unroll_index == 1:
    # Project the error on the history term: ~0 when the ending step is credited to the
    # accumulated perturbation, ~-1 under the reference's convention.
    flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])
    b = flat(history_part_of_ending_step(theta))
    err = flat(g_pes) - flat(g_exact)
    proj = float(err @ b / (b @ b))
    print(f"|history term| / |exact| = {np.linalg.norm(b) / np.linalg.norm(flat(g_exact)):.3f}"
          f", error projected on it = {proj:.3f}")
    assert abs(proj) < 0.25
