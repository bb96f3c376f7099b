"""Gradient estimators against exact gradients, NRES vs PES variance, device-count
invariance of every estimator inside the fused learner, and per-task NaN handling.

Problems are dim-4 quadratics with a small MLPLOpt (178 meta-parameters), small enough to
differentiate the unrolled meta-loss exactly with ``jax.grad``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spmd_lopt import sharding
from spmd_lopt.learned_optimizers import mlp_lopt
from spmd_lopt.optimizers import base as opt_base
from spmd_lopt.outer_trainers import common
from spmd_lopt.outer_trainers import estimator_base
from spmd_lopt.outer_trainers import full_es
from spmd_lopt.outer_trainers import full_grad
from spmd_lopt.outer_trainers import gradient_learner
from spmd_lopt.outer_trainers import lopt_truncated_step
from spmd_lopt.outer_trainers import truncated_grad
from spmd_lopt.outer_trainers import truncated_nres
from spmd_lopt.outer_trainers import truncated_pes
from spmd_lopt.outer_trainers import truncation_schedule as ts
from spmd_lopt.tasks import base as tasks_base
from spmd_lopt.tasks import quadratics

from helpers import cosine, global_rel_err, max_rel_err

OS = estimator_base.OuterState(jnp.asarray(0))


def _lopt():
  return mlp_lopt.MLPLOpt(hidden_size=8, hidden_layers=1, step_mult=0.03, exp_mult=0.1)


def _step(lopt, num_tasks, sched, dim=4, offset=0, family=None):
  return lopt_truncated_step.VectorizedLOptTruncatedStep(
      family or quadratics.FixedDimQuadraticFamily(dim), lopt, sched, num_tasks=num_tasks,
      random_initial_iteration_offset=offset)


def _flat(tree):
  return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(tree)])


# --- exact-gradient agreement ---------------------------------------------------------


def test_full_es_matches_the_exact_gradient():
  num_tasks, std = 2048, 0.01
  lopt = _lopt()
  step = _step(lopt, num_tasks, ts.NeverEndingTruncationSchedule())
  est = full_es.FullES(step, ts.ConstantTruncationSchedule(8), std=std, chunk_length=4)
  theta = lopt.init(jax.random.key(0))
  ids, key = jnp.arange(num_tasks), jax.random.key(3)

  g_es = jax.jit(lambda th: est.estimate_local(th, est.init_local(th, OS, key, ids), key,
                                               ids, OS).grad)(theta)

  @jax.jit
  def exact(theta):
    _, k_len, k_run = jax.random.split(key, 3)  # the estimator's key layout
    num_active = est.sample_length(k_len, OS)
    loss = lambda tv: jnp.mean(est.per_task_loss(tv, k_run, ids, OS, num_active)[0])
    return jax.grad(lambda th: loss(common.broadcast_per_task(th, num_tasks)))(theta)

  cos = cosine(g_es, exact(theta))
  print(f"cosine(FullES, exact) = {cos:.4f}")
  assert cos > 0.9


@pytest.mark.parametrize("use_remat", [False, True], ids=["plain", "remat"])
def test_truncated_grad_over_a_whole_unroll_is_jax_grad(use_remat):
  """Trajectories of 8 steps, one unroll of 8 in chunks of 4: exactly the whole
  trajectory, so truncated backprop is plain backprop of the unrolled loss."""
  lopt = _lopt()
  step = _step(lopt, 8, ts.ConstantTruncationSchedule(8))
  est = truncated_grad.TruncatedGrad(step, unroll_length=8, remat_chunk=4,
                                     use_remat=use_remat)
  theta = lopt.init(jax.random.key(0))
  ids, key = jnp.arange(8), jax.random.key(2)
  state = est.init_local(theta, OS, jax.random.key(1), ids)
  out = jax.jit(lambda th: est.estimate_local(th, state, key, ids, OS))(theta)
  assert not bool(jnp.any(out.unroll_info.is_done[:-1])) and bool(
      jnp.all(out.unroll_info.is_done[-1]))

  def unrolled_loss(th):
    _, o = step.unroll(th, state.inner_state, key, 8, OS, task_ids=ids)
    return jnp.mean(common.masked_mean_over_steps(o.loss, o.mask))

  loss, g = jax.jit(jax.value_and_grad(unrolled_loss))(theta)
  err = global_rel_err(out.grad, g)
  print(f"TruncatedGrad vs jax.grad: rel err {err:.2e}")
  assert err < 1e-5
  assert abs(float(out.loss) - float(loss)) < 1e-5 * abs(float(loss))


def test_full_grad_is_jax_grad_of_a_fresh_unroll():
  lopt = _lopt()
  step = _step(lopt, 8, ts.NeverEndingTruncationSchedule())
  est = full_grad.FullGrad(step, ts.ConstantTruncationSchedule(8), chunk_length=4)
  theta = lopt.init(jax.random.key(0))
  ids, key = jnp.arange(8), jax.random.key(2)
  out = jax.jit(lambda th: est.estimate_local(th, est.init_local(th, OS, key, ids), key,
                                              ids, OS))(theta)

  def unrolled_loss(th):
    _, k_init, k_unroll = jax.random.split(key, 3)
    state = step.init_step_state(th, OS, k_init, task_ids=ids)
    _, o = step.unroll(th, state, k_unroll, 8, OS, task_ids=ids)
    return jnp.mean(common.masked_mean_over_steps(o.loss, o.mask))

  err = global_rel_err(out.grad, jax.jit(jax.grad(unrolled_loss))(theta))
  print(f"FullGrad vs jax.grad: rel err {err:.2e}")
  assert err < 1e-5


@pytest.mark.slow  # ~25 s; by default test_pes checks PES against the exact gradient
def test_nres_and_pes_are_unbiased_and_nres_has_lower_variance():
  """Trajectories of 24 steps unrolled 4 at a time; the estimate of the 5th truncation
  (PES's accumulator then holds 5 perturbations, NRES still reuses one). Both match the
  exact gradient of that truncation's loss through the whole history; NRES's per-task
  variance is lower (Li et al. 2023)."""
  num_tasks, std, num_unrolls = 4096, 0.01, 5
  lopt = _lopt()
  step = _step(lopt, num_tasks, ts.ConstantTruncationSchedule(24))
  pes = truncated_pes.TruncatedPES(truncated_step=step, trunc_length=4, std=std)
  nres = truncated_nres.TruncatedNRES(truncated_step=step, trunc_length=4, std=std)
  theta = lopt.init(jax.random.key(0))
  ids = jnp.arange(num_tasks)
  init_key = jax.random.key(1)
  keys = [jax.random.key(10 + i) for i in range(num_unrolls)]

  keys = jnp.stack(keys)

  def per_task_estimates(est):
    # A task's estimate does not depend on which other tasks share the call (all keys are
    # per global task index), so vmapping single-task calls gives every per-task g_i.
    # The unrolls run under lax.scan over the keys: one compiled estimate, not five.
    def chain(i):
      task_ids = i[None]
      def body(state, k):
        out = est.estimate_local(theta, state, k, task_ids, OS)
        return out.state, out.grad
      _, grads = jax.lax.scan(body, est.init_local(theta, OS, init_key, task_ids), keys)
      return jax.tree.map(lambda g: g[-1], grads)
    return jax.jit(jax.vmap(chain))(ids)

  @jax.jit
  def exact(theta):
    def meta_loss(theta):
      def body(state, k):
        # PES and NRES unroll with the second half of their key (the first draws noise).
        return step.unroll(theta, state, jax.random.split(k)[1], 4, OS, task_ids=ids)
      state = step.init_step_state(theta, OS, init_key, task_ids=ids)
      state, _ = jax.lax.scan(lambda s, k: (body(s, k)[0], None), state, keys[:-1])
      _, out = body(state, keys[-1])
      return jnp.mean(common.masked_mean_over_steps(out.loss, out.mask))
    return jax.grad(meta_loss)(theta)

  g_exact = _flat(exact(theta))
  stats = {}
  for name, est in [("PES", pes), ("NRES", nres)]:
    g = np.concatenate([np.asarray(x).reshape(num_tasks, -1)
                        for x in jax.tree.leaves(per_task_estimates(est))], axis=1)
    mean = g.mean(axis=0)
    var = float(np.mean(np.sum((g - mean) ** 2, axis=1)))
    cos = float(mean @ g_exact / (np.linalg.norm(mean) * np.linalg.norm(g_exact)))
    stats[name] = (cos, var)
    print(f"{name}: cosine to exact = {cos:.4f}, per-task variance (trace) = {var:.4g}")
  print(f"variance ratio PES / NRES = {stats['PES'][1] / stats['NRES'][1]:.2f}")
  assert stats["PES"][0] > 0.9 and stats["NRES"][0] > 0.9
  assert stats["NRES"][1] < stats["PES"][1]


# --- inside the fused learner ---------------------------------------------------------


def _all_estimators(lopt, num_tasks=16):
  """One estimator of every kind, each with its own tasks (2 per device on 8 devices)."""
  varying = ts.LogUniformLengthSchedule(8, 16)
  never = ts.NeverEndingTruncationSchedule()
  return [
      truncated_pes.TruncatedPES(truncated_step=_step(lopt, num_tasks, varying, offset=16),
                                 trunc_length=4),
      truncated_nres.TruncatedNRES(truncated_step=_step(lopt, num_tasks, varying,
                                                        offset=16), trunc_length=4),
      # Lengths 4..8 in chunks of 3: exercises the skipped-chunk and skipped-step paths.
      full_es.FullES(_step(lopt, num_tasks, never), ts.LogUniformLengthSchedule(4, 8),
                     chunk_length=3),
      truncated_grad.TruncatedGrad(_step(lopt, num_tasks, ts.ConstantTruncationSchedule(6)),
                                   unroll_length=4, remat_chunk=2, use_remat=True),
      full_grad.FullGrad(_step(lopt, num_tasks, never), ts.ConstantTruncationSchedule(8),
                         chunk_length=4),
  ]


def test_every_estimator_gives_the_same_numbers_on_1_and_8_devices(devices):
  """One learner holding all five estimators (so also a multi-estimator learner: PES with
  each new one) and two sharded estimate calls, the second from the carried, sharded
  states. ``_estimate`` is the whole sharded half of ``update`` (the outer update after it
  is estimator-agnostic and covered by tests/test_learner.py); calling it keeps the
  per-estimator gradients, and saves compiling a second copy of the program. The tolerances are tests/test_learner.py's: 1e-5 for the first call
  (same inputs, only the reduction order differs), 1e-4 once inputs carry rounding that ES
  amplifies by ~1/std."""
  names = ["PES", "NRES", "FullES", "TruncatedGrad", "FullGrad"]
  results = {}
  for n in (1, 8):
    lopt = _lopt()
    lrn = gradient_learner.SpmdGradientLearner(lopt, _all_estimators(lopt),
                                               opt_base.Adam(1e-3),
                                               mesh=sharding.make_mesh(num_devices=n))
    state = lrn.init(jax.random.key(0))
    # the sharded half of update, per estimator (no host data; the data sets replicated)
    estimate = jax.jit(lambda st, k: lrn._estimate(st, k, None, lrn._datasets))
    key1 = sharding.replicate(jax.random.key(1), lrn.mesh)
    key2 = sharding.replicate(jax.random.key(2), lrn.mesh)
    est_states, grads1, losses1, _ = estimate(state, key1)
    state2 = state.replace(gradient_estimator_states=est_states)
    _, grads2, losses2, nonfinite = estimate(state2, key2)
    noise = est_states[1].noise["params"]["Dense_0"]["kernel"]
    assert len(noise.sharding.device_set) == n
    results[n] = jax.device_get((grads1, losses1, grads2, losses2, nonfinite))
  (g1a, l1a, g2a, l2a, nfa), (g1b, l1b, g2b, l2b, nfb) = results[1], results[8]
  for i, name in enumerate(names):
    assert np.linalg.norm(_flat(g1a[i])) > 0, name
    e1, e2 = max_rel_err(g1b[i], g1a[i]), max_rel_err(g2b[i], g2a[i])
    print(f"{name}: 1 vs 8 devices rel err call 1 = {e1:.1e}, call 2 = {e2:.1e}")
    assert e1 < 1e-5, name
    assert e2 < 1e-4, name
  np.testing.assert_allclose(l1b, l1a, rtol=1e-5)
  np.testing.assert_allclose(l2b, l2a, rtol=1e-5)
  assert int(np.sum(nfa)) == 0 and int(np.sum(nfb)) == 0


class _MaybeNaNTask(tasks_base.Task):
  """A quadratic bowl whose loss is NaN when its center's first coordinate exceeds
  ``threshold`` (the gradient stays finite: ``where`` picks a constant NaN)."""

  def __init__(self, center, threshold):
    self.center, self.threshold = center, threshold

  def init(self, key):
    return jax.random.normal(key, self.center.shape)

  def loss(self, params, key, data):
    del key, data
    loss = jnp.sum(jnp.square(self.center - params))
    return jnp.where(self.center[0] > self.threshold, jnp.nan, loss)


class _MaybeNaNFamily(tasks_base.TaskFamily):

  def __init__(self, dim=4):
    self.base = quadratics.FixedDimQuadraticFamily(dim)
    self.name = "MaybeNaNQuadratic"
    self.threshold = np.inf  # set by the test once the centers are known

  def sample(self, key):
    return self.base.sample(key)

  def task_fn(self, task_param):
    return _MaybeNaNTask(task_param, self.threshold)


def test_a_nan_in_one_task_leaves_theta_finite_and_is_counted(devices):
  """PES and NRES on 16 tasks over 8 devices; exactly one global task (the one with the
  largest center coordinate) has a NaN meta-loss. Its loss and every entry of its gradient
  estimate (``1 + |theta|`` values per estimator) are replaced and counted; theta stays
  finite and the step still moves it. ``nonfinite`` counts the task once,
  ``nonfinite_entries`` every replaced value."""
  lopt = _lopt()
  families = [_MaybeNaNFamily(), _MaybeNaNFamily()]
  sched = ts.ConstantTruncationSchedule(100)  # no reset within the step
  ests = [truncated_pes.TruncatedPES(
              truncated_step=_step(lopt, 16, sched, family=families[0]), trunc_length=5),
          truncated_nres.TruncatedNRES(
              truncated_step=_step(lopt, 16, sched, family=families[1]), trunc_length=5)]
  lrn = gradient_learner.SpmdGradientLearner(lopt, ests, opt_base.Adam(1e-3),
                                             mesh=sharding.make_mesh(num_devices=8))
  state = lrn.init(jax.random.key(0))
  # The centers are drawn at init (keyed by global task index); the loss is only traced in
  # update, so each threshold can be placed between the two largest first coordinates.
  for family, est_state in zip(families, state.gradient_estimator_states):
    first = np.sort(np.asarray(est_state.pos_state.task_param[:, 0]))
    assert first[-1] > first[-2]
    family.threshold = float(0.5 * (first[-1] + first[-2]))
  theta0 = jax.device_get(lrn.get_meta_params(state))
  theta_size = sum(x.size for x in jax.tree.leaves(theta0))

  state, loss, metrics = lrn.update(state, jax.random.key(1), with_metrics=True)
  metrics = jax.device_get(metrics)
  theta = jax.device_get(lrn.get_meta_params(state))
  print({k: v for k, v in metrics.items() if "nonfinite" in k})
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(theta))
  assert np.isfinite(loss)
  assert global_rel_err(theta, theta0) > 0
  for name in ["MaybeNaNQuadratic", "MaybeNaNQuadratic_1"]:
    assert metrics[f"mean||{name}/nonfinite"] == 1
    assert metrics[f"mean||{name}/nonfinite_entries"] == 1 + theta_size
  assert metrics["none||nonfinite"] == 2
  assert metrics["none||nonfinite_entries"] == 2 * (1 + theta_size)


@pytest.mark.parametrize("name,cls", [("pes", truncated_pes.TruncatedPES),
                                      ("nres", truncated_nres.TruncatedNRES),
                                      ("full_es", full_es.FullES),
                                      ("truncated_grad", truncated_grad.TruncatedGrad)])
def test_config_builds_each_estimator(name, cls):
  from spmd_lopt import config
  cfg = config.validate({"estimator": name})
  est = config.make_estimator(quadratics.FixedDimQuadraticFamily(4), _lopt(), cfg)
  assert isinstance(est, cls)


def test_config_rejects_an_unknown_estimator():
  from spmd_lopt import config
  with pytest.raises(ValueError, match="Known: pes, nres, full_es, truncated_grad"):
    config.make_estimator(quadratics.FixedDimQuadraticFamily(4), _lopt(),
                          config.validate({"estimator": "es"}))


def test_full_es_requires_a_never_ending_truncated_step():
  lopt = _lopt()
  with pytest.raises(ValueError, match="NeverEndingTruncationSchedule"):
    full_es.FullES(_step(lopt, 8, ts.ConstantTruncationSchedule(8)),
                   ts.ConstantTruncationSchedule(8))
  with pytest.raises(ValueError, match="NeverEndingTruncationSchedule"):
    full_grad.FullGrad(_step(lopt, 8, ts.ConstantTruncationSchedule(8)),
                            ts.ConstantTruncationSchedule(8))


@pytest.mark.slow  # five small compiles per estimator: ~25 s each on an idle 2-core box
@pytest.mark.parametrize("cls", [truncated_pes.TruncatedPES, truncated_nres.TruncatedNRES],
                         ids=["pes", "nres"])
def test_antithetic_options(cls):
  """stack_antithetic_samples and steps_per_jit do not change the numbers;
  sign_delta_loss_scalar=c turns each task's weight into c*sign(weight); std sets the noise
  scale; steps_per_jit is accepted for compatibility whether or not it divides."""
  lopt = _lopt()
  step = _step(lopt, 8, ts.ConstantTruncationSchedule(6))  # the 2nd call crosses a reset
  theta = lopt.init(jax.random.key(0))
  ids = jnp.arange(8)

  def run(est, per_task=False):
    def chain(task_ids):
      state = est.init_local(theta, OS, jax.random.key(1), task_ids)
      out1 = est.estimate_local(theta, state, jax.random.key(2), task_ids, OS)
      out2 = est.estimate_local(theta, out1.state, jax.random.key(3), task_ids, OS)
      return out1.grad, out2.grad, out2.state
    if per_task:
      return jax.jit(jax.vmap(lambda i: chain(i[None])))(ids)
    return jax.jit(chain)(ids)

  base = run(cls(truncated_step=step, trunc_length=4, steps_per_jit=4))
  for kw in [dict(stack_antithetic_samples=False), dict(steps_per_jit=2)]:
    other = run(cls(truncated_step=step, trunc_length=4, **kw))
    assert max_rel_err(other[:2], base[:2]) < 1e-5, kw

  assert cls(truncated_step=step, trunc_length=4, steps_per_jit=3).trunc_length == 4

  # First call (no reset): each task's estimate is w_i * e_i / (2 std^2) with e_i its
  # noise (PES: accumulator = eps), so the sign version is c * sign(w_i) * e_i / (2 std^2).
  c, std = 0.5, 0.02
  g_plain, _, _ = run(cls(truncated_step=step, trunc_length=4, std=std), per_task=True)
  g_sign, _, _ = run(cls(truncated_step=step, trunc_length=4, std=std,
                         sign_delta_loss_scalar=c), per_task=True)
  gp = np.stack([_flat(jax.tree.map(lambda x: x[i], g_plain)) for i in range(8)])
  gs = np.stack([_flat(jax.tree.map(lambda x: x[i], g_sign)) for i in range(8)])
  # e_i is parallel to both; recover it from the sign version and check the scale.
  e = gs * (2 * std ** 2) / c
  assert np.allclose(np.abs(np.sum(e * gp, axis=1)), np.linalg.norm(e, axis=1)
                     * np.linalg.norm(gp, axis=1), rtol=1e-4)
  np.testing.assert_allclose(np.sign(np.sum(e * gp, axis=1)), 1.0)
  rms = float(np.sqrt(np.mean(e ** 2)))
  assert 0.8 * std < rms < 1.2 * std, rms
