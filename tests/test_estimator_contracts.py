"""Contracts of the estimators and the truncated step that earlier versions broke: the
meta-loss batch's own key, FullES/FullGrad running exactly the drawn length and telling
the inner optimizer that length, one ``data`` argument everywhere, separate key streams in
NRES, non-finite tasks vs entries, both reset modes, and the reference's host data model
(``get_batch`` / ``get_outer_batch`` / ``meta_loss_batch``)."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spmd_lopt.learned_optimizers import base as lopt_base
from spmd_lopt.learned_optimizers import mlp_lopt
from spmd_lopt.optimizers import base as opt_base
from spmd_lopt.outer_trainers import common
from spmd_lopt.outer_trainers import estimator_base
from spmd_lopt.outer_trainers import full_es
from spmd_lopt.outer_trainers import full_grad
from spmd_lopt.outer_trainers import lopt_truncated_step
from spmd_lopt.outer_trainers import truncated_grad
from spmd_lopt.outer_trainers import truncated_nres
from spmd_lopt.outer_trainers import truncated_pes
from spmd_lopt.outer_trainers import truncation_schedule as ts
from spmd_lopt.tasks import base as tasks_base
from spmd_lopt.tasks import quadratics

OS = estimator_base.OuterState(jnp.asarray(0))
OFFSETS = {"train": 0.0, "inner_valid": 10.0, "outer_valid": 100.0, "test": 1000.0}


def _lopt():
  return mlp_lopt.MLPLOpt(hidden_size=4, hidden_layers=1, step_mult=0.03, exp_mult=0.1)


class _SplitTask(tasks_base.Task):
  """``sum((p - x)^2)`` with ``x ~ N(offset[split], I)``: the loss says which split (and
  which draw) a batch came from. Its aux value ``l1`` is ``sum |p - x|``."""

  name = "split_task"

  def init(self, key):
    return jax.random.normal(key, (3,))

  def loss(self, params, key, data):
    return jnp.sum(jnp.square(params - data))

  def loss_with_state_and_aux(self, params, state, key, data):
    return self.loss(params, key, data), state, {"l1": jnp.sum(jnp.abs(params - data))}

  def sample_batch(self, key, split="train"):
    return jax.random.normal(key, (3,)) + OFFSETS[split]


def _split_step(meta_loss_split, num_tasks=4, **kw):
  return lopt_truncated_step.VectorizedLOptTruncatedStep(
      tasks_base.single_task_to_family(_SplitTask()), _lopt(),
      ts.ConstantTruncationSchedule(50), num_tasks=num_tasks,
      meta_loss_split=meta_loss_split, **kw)


def test_meta_loss_split_draws_its_own_batch():
  theta = _lopt().init(jax.random.key(0))
  losses = {}
  for split in [None, "same_data", "train", "outer_valid"]:
    step = _split_step(split)
    state = step.init_step_state(theta, OS, jax.random.key(1))
    _, out = jax.jit(lambda s: step.unroll_step(theta, s, jax.random.key(2),
                                                outer_state=OS))(state)
    losses[split] = np.asarray(out.loss)
  # A fresh train batch differs from the training batch itself.
  assert np.all(np.abs(losses["train"] - losses["same_data"]) > 1e-3)
  # The outer-valid batch is centred at 100: ~3 * 100^2 away from params near 0.
  assert np.all(losses["outer_valid"] > 1e4)
  assert np.all(losses["same_data"] < 1e3) and np.all(losses["train"] < 1e3)


def test_meta_loss_with_aux_key_replaces_the_loss():
  theta = _lopt().init(jax.random.key(0))
  step = _split_step(None, meta_loss_with_aux_key="l1")
  state = step.init_step_state(theta, OS, jax.random.key(1))
  _, out = step.unroll_step(theta, state, jax.random.key(2), outer_state=OS)
  plain = _split_step(None)
  _, out_plain = plain.unroll_step(theta, state, jax.random.key(2), outer_state=OS)
  # The same batch: l2 loss s = sum d^2 and l1 = sum |d| satisfy l1^2 >= s >= l1^2 / 3.
  l1, l2 = np.asarray(out.loss), np.asarray(out_plain.loss)
  assert np.all(l1 ** 2 >= l2 - 1e-4) and np.all(l2 >= l1 ** 2 / 3 - 1e-4)
  assert not np.allclose(l1, l2)
  with pytest.raises(ValueError, match="'nope' is not among"):
    bad = _split_step(None, meta_loss_with_aux_key="nope")
    bad.unroll_step(theta, state, jax.random.key(2), outer_state=OS)


# --- whole unrolls: exact drawn length, told to the optimizer ---------------------------


@flax.struct.dataclass
class _HorizonState:
  params: object
  state: object
  iteration: jax.Array
  num_steps: jax.Array


class _HorizonSGD(opt_base.Optimizer):
  """SGD whose step decays linearly over the horizon ``num_steps`` it is told at init (a
  fraction-of-training feature): ``p -= lr * (1 - t / num_steps) * g``."""

  def __init__(self, lr):
    self.lr = lr

  def init(self, params, model_state=None, num_steps=None, key=None):
    return _HorizonState(params, model_state, jnp.asarray(0, jnp.int32),
                         jnp.asarray(num_steps, jnp.int32))

  def update(self, opt_state, grad, loss=None, model_state=None, key=None, **kw):
    frac = opt_state.iteration.astype(jnp.float32) / opt_state.num_steps.astype(jnp.float32)
    params = jax.tree.map(lambda p, g: p - self.lr * (1.0 - frac) * g, opt_state.params,
                          grad)
    return opt_state.replace(params=params, iteration=opt_state.iteration + 1)


class _HorizonLOpt(lopt_base.LearnedOptimizer):

  def init(self, key):
    return {"log_lr": jnp.asarray(np.log(0.1), jnp.float32)}

  def opt_fn(self, theta, is_training=False):
    return _HorizonSGD(jnp.exp(theta["log_lr"]))


def _quad_step(lopt, sched, num_tasks=4):
  return lopt_truncated_step.VectorizedLOptTruncatedStep(
      quadratics.FixedDimQuadraticFamily(3), lopt, sched, num_tasks=num_tasks)


@pytest.mark.parametrize("length", [5, 7])
def test_full_es_runs_exactly_the_drawn_length_with_a_chunk_that_does_not_divide(length):
  """max_length 10 in chunks of 4: a drawn length of 5 or 7 runs exactly that many steps
  (the old code rounded up to 8, or refused a chunk that does not divide 10), and the
  inner optimizer is told that length."""
  lopt = _HorizonLOpt()
  est = full_es.FullES(_quad_step(lopt, ts.NeverEndingTruncationSchedule()),
                       ts.LogUniformLengthSchedule(3, 10), chunk_length=4)
  theta = lopt.init(jax.random.key(0))
  ids = jnp.arange(4)
  theta_vec = common.broadcast_per_task(theta, 4)
  key = jax.random.key(3)
  state, out = jax.jit(lambda: est.unroll_fresh(theta_vec, key, ids, OS,
                                                jnp.asarray(length, jnp.int32)))()
  assert out.loss.shape == (10, 4)
  np.testing.assert_array_equal(np.asarray(out.mask[:length]), 1)
  np.testing.assert_array_equal(np.asarray(out.mask[length:]), 0)
  np.testing.assert_array_equal(np.asarray(state.inner_opt_state.iteration), length)
  np.testing.assert_array_equal(np.asarray(state.inner_opt_state.num_steps), length)

  # The same numbers as a plain unroll of `length` steps of trajectories of that length.
  ref_step = _quad_step(lopt, ts.ConstantTruncationSchedule(length))
  k_init, k_unroll = jax.random.split(key)
  ref_state = ref_step.init_step_state(theta_vec, OS, k_init, theta_is_vector=True,
                                       task_ids=ids)
  _, ref = ref_step.unroll(theta_vec, ref_state, k_unroll, length, OS,
                           theta_is_vector=True, task_ids=ids)
  np.testing.assert_allclose(np.asarray(out.loss[:length]), np.asarray(ref.loss),
                             rtol=1e-6)


def test_drawn_lengths_are_not_rounded():
  est = full_es.FullES(_quad_step(_lopt(), ts.NeverEndingTruncationSchedule()),
                       ts.LogUniformLengthSchedule(3, 10), chunk_length=4)
  lengths = {int(est.sample_length(jax.random.key(i), OS)) for i in range(40)}
  assert lengths - {4, 8} and lengths <= set(range(3, 11))


def test_full_grad_tells_the_optimizer_the_drawn_length():
  """FullGrad's loss with a horizon-aware optimizer equals the loss of trajectories whose
  length (hence the optimizer's num_steps) is the drawn one; with num_steps = 2**31 - 1
  (the never-ending schedule's length, as before) the decay would be absent."""
  lopt, length = _HorizonLOpt(), 6
  est = full_grad.FullGrad(_quad_step(lopt, ts.NeverEndingTruncationSchedule()),
                           ts.ConstantTruncationSchedule(length), chunk_length=4)
  theta = lopt.init(jax.random.key(0))
  ids, key = jnp.arange(4), jax.random.key(2)
  out = est.estimate_local(theta, est.init_local(theta, OS, key, ids), key, ids, OS)

  _, k_init, k_unroll = jax.random.split(key, 3)
  ref_step = _quad_step(lopt, ts.ConstantTruncationSchedule(length))

  def loss(th):
    st = ref_step.init_step_state(th, OS, k_init, task_ids=ids)
    _, o = ref_step.unroll(th, st, k_unroll, length, OS, task_ids=ids)
    return jnp.mean(common.masked_mean_over_steps(o.loss, o.mask))

  ref_loss, ref_grad = jax.value_and_grad(loss)(theta)
  np.testing.assert_allclose(float(out.loss), float(ref_loss), rtol=1e-5)
  np.testing.assert_allclose(float(out.grad["log_lr"]), float(ref_grad["log_lr"]),
                             rtol=1e-4)


# --- one interface ----------------------------------------------------------------------


def _ests(lopt):
  never = ts.NeverEndingTruncationSchedule()
  return {
      "pes": truncated_pes.TruncatedPES(truncated_step=_quad_step(
          lopt, ts.ConstantTruncationSchedule(20)), trunc_length=3),
      "nres": truncated_nres.TruncatedNRES(truncated_step=_quad_step(
          lopt, ts.ConstantTruncationSchedule(20)), trunc_length=3),
      "tgrad": truncated_grad.TruncatedGrad(
          _quad_step(lopt, ts.ConstantTruncationSchedule(20)), unroll_length=3,
          use_remat=True, remat_chunk=2),
      "full_es": full_es.FullES(_quad_step(lopt, never), ts.ConstantTruncationSchedule(3)),
      "full_grad": full_grad.FullGrad(_quad_step(lopt, never),
                                      ts.ConstantTruncationSchedule(3)),
  }


@pytest.mark.parametrize("name", [pytest.param("nres", marks=pytest.mark.slow), "full_es",
                                  pytest.param("pes", marks=pytest.mark.slow),
                                  pytest.param("tgrad", marks=pytest.mark.slow),
                                  pytest.param("full_grad", marks=pytest.mark.slow)])
def test_estimators_take_host_data(name):
  """The same ``data=`` argument everywhere; quadratics ignore their batches, so host-fed
  zeros give the numbers of on-device sampling (TruncatedGrad with a remat chunk that does
  not divide the unroll pads the data)."""
  lopt = _lopt()
  est = _ests(lopt)[name]
  theta = lopt.init(jax.random.key(0))
  ids = jnp.arange(4)
  state = est.init_local(theta, OS, jax.random.key(1), ids)
  run = jax.jit(lambda d: est.estimate_local(theta, state, jax.random.key(2), ids, OS,
                                             data=d).loss)
  np.testing.assert_allclose(float(run(jnp.zeros((3, 4, 1)))), float(run(None)),
                             rtol=1e-6)


def test_nres_draws_states_and_noise_from_separate_streams():
  """The initial inner states come from one half of the key and the noise from the other:
  changing the noise stream's input (the full key) changes both, but the states equal
  those of ``init_step_state`` on the first half, not on the key itself."""
  lopt = _lopt()
  step = _quad_step(lopt, ts.ConstantTruncationSchedule(20))
  est = truncated_nres.TruncatedNRES(truncated_step=step, trunc_length=3)
  theta = lopt.init(jax.random.key(0))
  ids, key = jnp.arange(4), jax.random.key(1)
  state = est.init_local(theta, OS, key, ids)
  k_state, k_noise = jax.random.split(key)
  expected = step.init_step_state(theta, OS, k_state, task_ids=ids)
  np.testing.assert_array_equal(np.asarray(state.pos_state.task_param),
                                np.asarray(expected.task_param))
  noise = common.per_task_noise(k_noise, ids, theta, est.std)
  for a, b in zip(jax.tree.leaves(state.noise), jax.tree.leaves(noise)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_nonfinite_counts_tasks_and_entries_separately():
  grads = {"w": jnp.asarray([[1.0, jnp.nan, jnp.inf], [1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])}
  losses = jnp.asarray([1.0, 2.0, jnp.nan])
  g, l, tasks, entries = estimator_base.sanitize_per_task(grads, losses, 20.0)
  assert int(tasks) == 2 and int(entries) == 3
  np.testing.assert_array_equal(np.asarray(g["w"][0]), [1.0, 0.0, 0.0])
  np.testing.assert_array_equal(np.asarray(l), [1.0, 2.0, 20.0])


# --- reset modes ------------------------------------------------------------------------


def test_cond_and_select_resets_give_identical_numbers():
  lopt = _lopt()
  theta = lopt.init(jax.random.key(0))
  outs = []
  for mode in ("cond", "select"):
    step = lopt_truncated_step.VectorizedLOptTruncatedStep(
        quadratics.FixedDimQuadraticFamily(3), lopt, ts.LogUniformLengthSchedule(4, 12),
        num_tasks=16, random_initial_iteration_offset=12, reset_mode=mode)
    state = step.init_step_state(theta, OS, jax.random.key(1))
    outs.append(jax.jit(lambda s: step.unroll(theta, s, jax.random.key(2), 12, OS))(state))
  (s_c, o_c), (s_s, o_s) = outs
  # 16 small tasks: "cond" takes its gathered branch on steps where 1-2 tasks reset and
  # initialises all 16 where more do; both happened.
  counts = np.asarray(o_c.is_reset).sum(axis=1)
  few = 16 // lopt_truncated_step.FEW_RESETS_DIVISOR
  assert np.any((counts > 0) & (counts <= few)) and np.any(counts > few), counts
  for a, b in zip(jax.tree.leaves((s_c, o_c)), jax.tree.leaves((s_s, o_s))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(ValueError, match="reset_mode"):
    lopt_truncated_step.VectorizedLOptTruncatedStep(
        quadratics.FixedDimQuadraticFamily(3), lopt, ts.ConstantTruncationSchedule(3), 2,
        reset_mode="maybe")


# --- the reference's surface ------------------------------------------------------------


class _Datasets:
  """Host iterators per split, as the reference's ``Datasets``."""

  def __init__(self):
    self.counters = {s: 0 for s in OFFSETS}

  def split(self, name):
    def gen():
      while True:
        self.counters[name] += 1
        yield np.full((3,), OFFSETS[name] + self.counters[name], np.float32)
    if not hasattr(self, "_its"):
      self._its = {}
    return self._its.setdefault(name, gen())


class _HostFamily(tasks_base.TaskFamily):
  name = "host_family"

  def __init__(self):
    self._datasets = _Datasets()

  @property
  def datasets(self):
    return self._datasets

  def sample(self, key):
    return jnp.asarray(0)

  def task_fn(self, task_param):
    return _SplitTask()


def test_get_batch_get_outer_batch_and_meta_loss_batch():
  lopt = _lopt()
  step = lopt_truncated_step.VectorizedLOptTruncatedStep(
      _HostFamily(), lopt, ts.ConstantTruncationSchedule(50), num_tasks=2,
      meta_loss_split="outer_valid", outer_data_split="test")
  train, meta = step.get_batch(3)
  assert train.shape == (3, 2, 3) and meta.shape == (3, 2, 3)
  assert np.all(train < 10) and np.all((meta > 100) & (meta < 1000))
  outer = step.get_outer_batch()
  assert outer.shape == (2, 3) and np.all(outer > 1000)

  theta = lopt.init(jax.random.key(0))
  state0 = step.init_step_state(theta, OS, jax.random.key(1))
  state, out = step.unroll(theta, state0, jax.random.key(2), 3, OS, data=(train, meta))
  assert out.loss.shape == (3, 2) and np.all(np.asarray(out.loss) > 1e4)  # outer_valid
  # Each task's host batches reach it when the lanes are stepped in two groups.
  grouped = lopt_truncated_step.VectorizedLOptTruncatedStep(
      _HostFamily(), lopt, ts.ConstantTruncationSchedule(50), num_tasks=2,
      meta_loss_split="outer_valid", outer_data_split="test", lane_groups=2)
  g_state, g_out = grouped.unroll(theta, state0, jax.random.key(2), 3, OS,
                                  data=(train, meta))
  for a, b in zip(jax.tree.leaves((g_state, g_out)), jax.tree.leaves((state, out))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  losses = step.meta_loss_batch(theta, state, jax.random.key(3), outer, OS)
  assert losses.shape == (2,) and np.all(np.asarray(losses) > 1e6)  # the test split
  # Without datasets (quadratics), get_batch returns () and batches come from the device.
  quad = _quad_step(lopt, ts.ConstantTruncationSchedule(5))
  assert quad.get_batch(4) == ()


def test_reference_names_and_defaults():
  lopt = _lopt()
  simple = lopt_truncated_step.SimpleVecLOptTruncatedStep(_SplitTask(), lopt, num_tasks=3,
                                                          unroll_length=4)
  theta = lopt.init(jax.random.key(0))
  state = simple.init_step_state(theta, OS, jax.random.key(1))
  _, out = simple.unroll(theta, state, jax.random.key(2), 6, OS)
  # Trajectories of 4 steps: done after step 4, reset (masked) on step 5.
  np.testing.assert_array_equal(np.asarray(out.is_done[3]), True)
  np.testing.assert_array_equal(np.asarray(out.mask[4]), False)

  sched = ts.ScheduledTruncationSchedule(lambda it: 5 + it, min_length=2)
  assert int(sched.init(jax.random.key(0), OS).length) == 5
  assert int(sched.init(jax.random.key(0), estimator_base.OuterState(7)).length) == 12
  jitter = ts.ScheduledTruncationSchedule(lambda it: 3, std=10.0, min_length=2)
  drawn = [int(jitter.init(jax.random.key(i), OS).length) for i in range(20)]
  assert min(drawn) == 2 and max(drawn) > 3

  class _Bare(estimator_base.GradientEstimator):
    pass

  assert _Bare().task_name() == "unnamed_task"
  pes = truncated_pes.TruncatedPES(truncated_step=simple)
  assert pes.task_name() == "split_task"
  assert pes.cfg_name() == (getattr(lopt, "name", None) or type(lopt).__name__)
  assert _Bare().cfg_name() == "unnamed_cfg"


def test_estimator_base_names_stay_importable():
  # estimator_base was one module; it is a package now and every name it had must still
  # resolve there, to the very object its new home defines.
  from spmd_lopt.outer_trainers.estimator_base import (antithetic, arguments, interface,
                                                       per_task, whole_unroll)
  homes = {
      interface: ["OuterState", "WorkerWeights", "UnrollInfo", "GradientEstimatorOut",
                  "LocalEstimate", "GradientEstimator", "has_host_datasets", "MetaParams"],
      per_task: ["sanitize_per_task", "finish_estimate", "per_task_grads"],
      arguments: ["positive_int", "check_steps_per_jit", "check_step",
                  "build_truncated_step"],
      antithetic: ["pes_weights", "AntitheticTruncatedEstimator"],
      whole_unroll: ["FullUnrollWorkerState", "check_never_ending", "whole_unroll_lengths",
                     "sample_length", "WholeUnrollEstimator"],
  }
  for module, names in homes.items():
    for name in names:
      assert getattr(estimator_base, name) is getattr(module, name), name
  assert sorted(estimator_base.__all__) == sorted(n for ns in homes.values() for n in ns)
