"""Truncation schedules, the vectorized truncated step, tasks and optimizers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from spmd_lopt import sharding
from spmd_lopt.learned_optimizers import base as lopt_base
from spmd_lopt.learned_optimizers import mlp_lopt
from spmd_lopt.optimizers import base as opt_base
from spmd_lopt.outer_trainers import estimator_base
from spmd_lopt.outer_trainers import lopt_truncated_step
from spmd_lopt.outer_trainers import truncated_pes
from spmd_lopt.outer_trainers import truncation_schedule
from spmd_lopt.tasks import base as tasks_base
from spmd_lopt.tasks import quadratics

OS = estimator_base.OuterState(jnp.asarray(0))


def test_log_uniform_lengths_stay_in_bounds_and_spread():
  sched = truncation_schedule.LogUniformLengthSchedule(10, 100)
  lengths = jax.vmap(lambda k: sched.init(k, OS).length)(
      jax.random.split(jax.random.key(0), 2000))
  lengths = np.asarray(lengths)
  assert lengths.min() >= 10 and lengths.max() <= 100
  # Log-uniform: about half the mass below the geometric mean sqrt(10 * 100) ~ 31.6.
  assert 0.4 < np.mean(lengths < 31.6) < 0.6


@pytest.mark.parametrize("args", [(0, 10), (-1, 10), (20, 10), (2.5, 10)])
def test_bad_schedule_lengths_are_clear_errors(args):
  with pytest.raises(ValueError, match="LogUniformLengthSchedule"):
    truncation_schedule.LogUniformLengthSchedule(*args)


def test_constant_schedule_rejects_nonpositive_length():
  with pytest.raises(ValueError, match="total_length must be a positive integer"):
    truncation_schedule.ConstantTruncationSchedule(0)


def _step(num_tasks=4, length=3, offset=0, family=None):
  return lopt_truncated_step.VectorizedLOptTruncatedStep(
      family or quadratics.FixedDimQuadraticFamily(5), mlp_lopt.MLPLOpt(),
      truncation_schedule.ConstantTruncationSchedule(length), num_tasks=num_tasks,
      random_initial_iteration_offset=offset)


def test_trajectories_reset_after_their_length_and_reset_steps_are_masked():
  step = _step(num_tasks=4, length=3)
  theta = step.outer_init(jax.random.key(0))
  state = step.init_step_state(theta, OS, jax.random.key(1))
  state, out = jax.jit(lambda s: step.unroll(theta, s, jax.random.key(2), 8, OS))(state)
  # Steps: train x3 (done on the 3rd), reset (no training), train x3 (done), reset.
  np.testing.assert_array_equal(out.is_done[:, 0], [0, 0, 1, 0, 0, 0, 1, 0])
  np.testing.assert_array_equal(out.is_reset[:, 0], [0, 0, 0, 1, 0, 0, 0, 1])
  np.testing.assert_array_equal(out.mask[:, 0], 1 - out.is_reset[:, 0])
  assert np.all(np.asarray(out.loss)[np.asarray(out.is_reset)] == 0)
  np.testing.assert_array_equal(out.iteration[:, 0], [1, 2, 3, 0, 1, 2, 3, 0])
  # A reset draws a new task: the quadratic's center changes.
  assert not np.allclose(out.task_param[2], out.task_param[3])


def test_random_initial_offset_staggers_tasks():
  step = _step(num_tasks=64, length=100, offset=100)
  theta = step.outer_init(jax.random.key(0))
  state = step.init_step_state(theta, OS, jax.random.key(1))
  steps = np.asarray(state.inner_step)
  assert steps.min() >= 0 and steps.max() < 100 and len(np.unique(steps)) > 20


def test_task_state_depends_on_global_index_not_position():
  step = _step(num_tasks=8)
  theta = step.outer_init(jax.random.key(0))
  full = step.init_step_state(theta, OS, jax.random.key(1))
  part = step.init_step_state(theta, OS, jax.random.key(1), task_ids=jnp.arange(4, 8))
  np.testing.assert_array_equal(full.task_param[4:], part.task_param)


class _WrongShapeFamily(tasks_base.TaskFamily):
  """A family whose sample is [2] but whose task expects [3]-d params for the loss."""
  name = "wrong_shape"

  def sample(self, key):
    return jax.random.normal(key, (2,))

  def task_fn(self, task_param):
    fam = quadratics.FixedDimQuadraticFamily(3)
    task = fam.task_fn(task_param)
    task.init = lambda key: jax.random.normal(key, (3,))
    return task


def test_family_whose_sample_has_the_wrong_shape_is_a_clear_error():
  with pytest.raises(ValueError, match="Task family 'wrong_shape'"):
    _step(family=_WrongShapeFamily())


def test_bad_estimator_arguments_are_clear_errors():
  step = _step()
  with pytest.raises(ValueError, match="trunc_length must be a positive integer"):
    truncated_pes.TruncatedPES(truncated_step=step, trunc_length=0)
  with pytest.raises(ValueError, match="std must be positive"):
    truncated_pes.TruncatedPES(truncated_step=step, trunc_length=10, std=-1.0)
  with pytest.raises(ValueError, match="steps_per_jit must be a positive integer"):
    truncated_pes.TruncatedPES(truncated_step=step, trunc_length=10, steps_per_jit=0)
  # The reference's host-loop chunk: accepted where it has no effect (trunc_length=25 with
  # the reference default 10 used to be rejected).
  assert truncated_pes.TruncatedPES(truncated_step=step, trunc_length=25).trunc_length == 25
  with pytest.raises(ValueError, match="missing"):
    truncated_pes.TruncatedPES(task_family=quadratics.FixedDimQuadraticFamily(3))
  with pytest.raises(ValueError, match="num_tasks must be a positive integer"):
    _step(num_tasks=0)


@pytest.mark.slow  # ~9 s; the reference-form tests cover building from parts
def test_pes_built_from_parts_equals_pes_built_from_a_step():
  lopt = mlp_lopt.MLPLOpt()
  fam = quadratics.FixedDimQuadraticFamily(4)
  sched = truncation_schedule.ConstantTruncationSchedule(7)
  a = truncated_pes.TruncatedPES(task_family=fam, learned_opt=lopt, trunc_sched=sched,
                                 num_tasks=4, trunc_length=5, std=0.05)
  b = truncated_pes.TruncatedPES(
      truncated_step=lopt_truncated_step.VectorizedLOptTruncatedStep(fam, lopt, sched, 4),
      trunc_length=5, std=0.05)
  theta = lopt.init(jax.random.key(0))
  ids = jnp.arange(4)
  outs = []
  for est in (a, b):
    st = est.init_local(theta, OS, jax.random.key(1), ids)
    outs.append(est.estimate_local(theta, st, jax.random.key(2), ids, OS).loss)
  assert float(outs[0]) == float(outs[1])


def test_mlp_lopt_has_reference_size_and_keeps_state_shapes():
  lopt = mlp_lopt.MLPLOpt()
  theta = lopt.init(jax.random.key(0))
  assert sum(x.size for x in jax.tree.leaves(theta)) == 1762
  params = {"w": jnp.ones((3, 4)), "b": jnp.zeros(())}
  opt = lopt.opt_fn(theta)
  s0 = opt.init(params, model_state={"bn": jnp.ones(2)})
  s1 = opt.update(s0, jax.tree.map(jnp.ones_like, params), loss=jnp.asarray(1.0))
  s2 = opt.update(s1, jax.tree.map(jnp.ones_like, params), loss=jnp.asarray(1.0))
  assert jax.tree.structure(s2) == jax.tree.structure(s0)
  assert jax.tree.map(lambda x: x.shape, s2) == jax.tree.map(lambda x: x.shape, s0)
  assert int(s2.iteration) == 2 and s2.state["bn"].shape == (2,)
  assert not np.allclose(s2.params["w"], params["w"])


@pytest.mark.parametrize("opt", [opt_base.SGD(0.1), opt_base.Adam(0.1), opt_base.SGDM(0.05),
                                 opt_base.RMSProp(0.05), opt_base.AdamW(0.1),
                                 opt_base.GradientClipOptimizer(opt_base.SGD(0.1)),
                                 lopt_base.LearnableAdam(0.1).opt_fn(
                                     lopt_base.LearnableAdam(0.1).init(None)),
                                 lopt_base.LearnableSGD(0.1).opt_fn(
                                     lopt_base.LearnableSGD(0.1).init(None))],
                         ids=lambda o: o.name)
def test_optimizers_descend_a_quadratic(opt):
  task = quadratics.FixedDimQuadraticFamily(5).task_fn(jnp.arange(5.0))
  state = opt.init(jnp.zeros(5))
  loss0 = task.loss(opt.get_params(state), None, None)

  @jax.jit
  def step(state):
    g = jax.grad(task.loss)(opt.get_params(state), None, None)
    return opt.update(state, g, loss=jnp.asarray(0.0))

  for _ in range(100):
    state = step(state)
  assert int(state.iteration) == 100
  assert task.loss(opt.get_params(state), None, None) < 0.1 * loss0


def test_unroll_prepares_theta_once_with_the_same_numbers_as_single_steps():
  """``unroll`` hands the lopt ``prepare_theta(theta)`` (MLPLOpt: its first kernel split
  once, outside the scan); stepping ``unroll_step`` with the raw theta must agree bit for
  bit, per-task (vector) thetas included."""
  step = _step(num_tasks=4, length=3)
  theta = step.outer_init(jax.random.key(0))
  thetas = jax.tree.map(lambda t: t + 0.01 * jnp.arange(4.0).reshape((4,) + (1,) * t.ndim),
                        theta)
  state0 = step.init_step_state(theta, OS, jax.random.key(1))
  key = jax.random.key(2)
  for th, vec in ((theta, False), (thetas, True)):
    state, out = jax.jit(lambda s, th=th, vec=vec: step.unroll(
        th, s, key, 5, OS, theta_is_vector=vec))(state0)
    ref = state0
    single = jax.jit(lambda s, k, th=th, vec=vec: step.unroll_step(
        th, s, k, outer_state=OS, theta_is_vector=vec))
    for i in range(5):
      ref, ref_out = single(ref, jax.random.fold_in(key, i))
      np.testing.assert_array_equal(np.asarray(out.loss[i]), np.asarray(ref_out.loss))
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(ref)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_mlp_lopt_prepared_theta_gives_the_same_update():
  lopt = mlp_lopt.MLPLOpt()
  theta = lopt.init(jax.random.key(0))
  split = lopt.prepare_theta(theta)
  assert isinstance(split, mlp_lopt.SplitTheta)
  assert split.tensor_kernel.shape == (8, 32) and split.step_kernel.shape == (11, 32)
  assert lopt.prepare_theta(split) is split
  params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "b": jnp.ones(4)}
  grad = jax.tree.map(lambda p: 0.3 * p + 0.1, params)
  outs = []
  for th in (theta, split):
    opt = lopt.opt_fn(th)
    outs.append(jax.jit(opt.update)(opt.init(params), grad).params)
  for a, b in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _unroll_fn(step, theta, theta_is_vector, mesh=None):
  """``state -> unroll(...)`` of 30 steps, jitted; with ``mesh``, inside ``shard_map`` over
  its task axis (each device: its tasks, their global indices), as the learner runs it."""
  run = lambda th, s, ids=None: step.unroll(th, s, jax.random.key(2), 30, OS,
                                            theta_is_vector=theta_is_vector, task_ids=ids)
  if mesh is None:
    return jax.jit(lambda s: run(theta, s))
  ax = sharding.DEFAULT_AXIS
  n_local = step.num_tasks // sharding.axis_size(mesh, ax)
  body = lambda th, s: run(th, s, sharding.local_task_ids(n_local, ax))
  th_spec = P(ax) if theta_is_vector else P()
  fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(th_spec, P(ax)),
                             out_specs=(P(ax), P(None, ax))))
  put = lambda tree, spec: jax.tree.map(
      lambda x: jax.device_put(x, NamedSharding(mesh, spec)), tree)
  th = put(theta, th_spec)
  return lambda s: fn(th, put(s, P(ax)))


@pytest.mark.slow  # ~10 s each; test_estimator_contracts checks the branches by default
@pytest.mark.parametrize("theta_is_vector", [False, True])
def test_cond_resets_of_few_or_many_tasks_equal_select_bit_for_bit(theta_is_vector):
  """With small per-task states "cond" re-initialises only the gathered resetting tasks
  when at most n // 8 reset and all n otherwise; every branch must give the "select"
  numbers exactly, on one device and inside shard_map on two. Staggered lengths exercise the
  gathered branch (1..8 of 64 tasks), equal lengths without an offset make all 64 reset at
  once (the full branch)."""
  n = 64
  few = n // lopt_truncated_step.FEW_RESETS_DIVISOR
  cases = [(truncation_schedule.LogUniformLengthSchedule(4, 40), 40),
           (truncation_schedule.ConstantTruncationSchedule(5), 0)]
  seen = set()
  for sched, offset in cases:
    outs = {}
    for mode in ("cond", "select"):
      step = lopt_truncated_step.VectorizedLOptTruncatedStep(
          quadratics.FixedDimQuadraticFamily(5), mlp_lopt.MLPLOpt(hidden_size=8), sched,
          num_tasks=n, random_initial_iteration_offset=offset, reset_mode=mode)
      theta = step.outer_init(jax.random.key(0))
      if theta_is_vector:  # a different theta per task, as PES's perturbed halves
        theta = jax.tree.map(
            lambda x: x + 0.01 * jax.random.normal(jax.random.key(3), (n,) + x.shape), theta)
      state = step.init_step_state(theta, OS, jax.random.key(1), theta_is_vector=theta_is_vector)
      # small enough for the gathered path (on 64 tasks, and on 32 per device)
      nbytes = lopt_truncated_step._nbytes(state)  # pylint: disable=protected-access
      assert lopt_truncated_step.gathered_resets_pay(nbytes // 2, n // 2)
      outs[mode] = _unroll_fn(step, theta, theta_is_vector)(state)
      # 2 devices, 32 tasks each (at most 4 gathered per device), against "select" on 2.
      outs[mode + "_2_devices"] = _unroll_fn(step, theta, theta_is_vector,
                                             sharding.make_mesh(num_devices=2))(state)
    counts = np.asarray(outs["cond"][1].is_reset).sum(axis=1)
    seen |= {0 if c == 0 else (1 if c <= few else 2) for c in counts}
    for cond, select in (("cond", "select"), ("cond_2_devices", "select_2_devices")):
      for a, b in zip(jax.tree.leaves(outs[cond]), jax.tree.leaves(outs[select])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=cond)
  assert seen == {0, 1, 2}, seen


def test_state_size_counts_arrays_and_keys():
  tree = {"a": jnp.zeros((3, 4), jnp.float32), "b": jnp.zeros(5, jnp.int8),
          "k": jax.random.split(jax.random.key(0), 2), "n": None}
  nbytes = lopt_truncated_step._nbytes  # pylint: disable=protected-access
  assert nbytes(tree) == 48 + 5 + 2 * 2 * 4
  assert jax.jit(lambda t: jnp.float32(nbytes(t)))(tree) == nbytes(tree)


def _cond_branch_counts(step, theta):
  """Branch counts of every ``cond`` in the jaxpr of one ``unroll`` step (nested too);
  traced on abstract states, nothing runs."""
  state = jax.eval_shape(lambda: step.init_step_state(theta, OS, jax.random.key(1)))
  jaxpr = jax.make_jaxpr(lambda s: step.unroll(theta, s, jax.random.key(2), 1, OS))(state)
  out = []

  def visit(jx):
    for eqn in jx.eqns:
      if eqn.primitive.name == "cond":
        out.append(len(eqn.params["branches"]))
      for v in eqn.params.values():
        for sub in (v if isinstance(v, (tuple, list)) else (v,)):
          if hasattr(sub, "jaxpr"):
            visit(sub.jaxpr if hasattr(sub.jaxpr, "eqns") else sub.jaxpr.jaxpr)
  visit(jaxpr.jaxpr)
  return out


def test_gathered_resets_follow_the_per_task_state_size():
  """"cond" takes the three-way gathered switch for many small tasks, however large their
  state in all (1,024 quadratics, ~340 kB: above the earlier 256 kB total bound), and the
  two-way cond for tasks of more than FEW_RESETS_MAX_TASK_STATE_BYTES each (64-d and
  2,000-d quadratics), or fewer tasks than gathered slots; "select" has no conditional."""
  lopt = mlp_lopt.MLPLOpt(hidden_size=4)
  theta = lopt.init(jax.random.key(0))
  sched = truncation_schedule.LogUniformLengthSchedule(4, 40)
  make = lambda dim, n, mode="cond": lopt_truncated_step.VectorizedLOptTruncatedStep(
      quadratics.FixedDimQuadraticFamily(dim), lopt, sched, num_tasks=n,
      random_initial_iteration_offset=40, reset_mode=mode)
  def state_bytes(step):
    sizes = []
    jax.eval_shape(lambda: sizes.append(lopt_truncated_step._nbytes(  # pylint: disable=protected-access
        step.init_step_state(theta, OS, jax.random.key(1)))))
    return sizes[0]

  bound = lopt_truncated_step.FEW_RESETS_MAX_TASK_STATE_BYTES
  many_small = make(10, 1024)
  assert state_bytes(many_small) > 256 * 1024
  assert 3 in _cond_branch_counts(many_small, theta)
  for dim in (64, 2000):  # ~2 kB and ~40 kB per task
    larger = make(dim, 16)
    assert state_bytes(larger) > 16 * bound
    branches = _cond_branch_counts(larger, theta)
    assert 3 not in branches and 2 in branches, dim
  assert 3 not in _cond_branch_counts(make(10, 7), theta)  # 7 // 8 == 0 gathered slots
  assert not _cond_branch_counts(make(10, 64, "select"), theta)


@pytest.mark.parametrize("theta_is_vector", [False, True])
def test_lane_groups_give_the_numbers_of_one_group(theta_is_vector):
  """``lane_groups=2`` / ``4`` step the lanes as independent groups in one scan body;
  every task keeps its keys, so states and outputs equal one group's, on one device and
  inside shard_map on two (4 tasks each, 2 groups of 2). Staggered lengths make some
  groups reset while others do not."""
  n = 8
  sched = truncation_schedule.LogUniformLengthSchedule(4, 20)
  make = lambda groups: lopt_truncated_step.VectorizedLOptTruncatedStep(
      quadratics.FixedDimQuadraticFamily(5), mlp_lopt.MLPLOpt(), sched, num_tasks=n,
      random_initial_iteration_offset=20, lane_groups=groups)
  theta = make(1).outer_init(jax.random.key(0))
  if theta_is_vector:
    theta = jax.tree.map(
        lambda x: x + 0.01 * jax.random.normal(jax.random.key(3), (n,) + x.shape), theta)
  state = make(1).init_step_state(theta, OS, jax.random.key(1),
                                  theta_is_vector=theta_is_vector)
  mesh = sharding.make_mesh(num_devices=2)
  want = _unroll_fn(make(1), theta, theta_is_vector)(state)
  assert np.asarray(want[1].is_reset).any()
  for got in (_unroll_fn(make(2), theta, theta_is_vector)(state),
              _unroll_fn(make(4), theta, theta_is_vector)(state),
              _unroll_fn(make(2), theta, theta_is_vector, mesh)(state)):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_lane_groups_are_checked():
  sched = truncation_schedule.ConstantTruncationSchedule(5)
  make = lambda groups: lopt_truncated_step.VectorizedLOptTruncatedStep(
      quadratics.FixedDimQuadraticFamily(3), mlp_lopt.MLPLOpt(hidden_size=8), sched,
      num_tasks=6, lane_groups=groups)
  for bad in (0, -1, 1.5):
    with pytest.raises(ValueError, match="lane_groups"):
      make(bad)
  step = make(4)
  theta = step.outer_init(jax.random.key(0))
  state = step.init_step_state(theta, OS, jax.random.key(1))
  with pytest.raises(ValueError, match="lane_groups=4 does not divide the 6 lanes"):
    step.unroll(theta, state, jax.random.key(2), 3, OS)


def test_auto_lane_groups_follow_cores_per_device_and_state_size(monkeypatch):
  """Auto: a device's share of the process's cores, fewer where they would not divide the
  lanes or would leave a group under LANE_GROUP_MIN_BYTES; one off the CPU."""
  auto = lopt_truncated_step.auto_lane_groups
  big = 64 * lopt_truncated_step.LANE_GROUP_MIN_BYTES
  monkeypatch.setattr(lopt_truncated_step.os, "sched_getaffinity", lambda pid: {0, 1},
                      raising=False)
  monkeypatch.setattr(lopt_truncated_step.jax, "local_device_count", lambda: 1)
  assert auto(32, 2_159_904) == 2   # 16 image-MLP tasks, both PES halves
  assert auto(128, 42_624) == 1     # 64 quadratics: too little state per group
  assert auto(7, big) == 1          # 2 does not divide 7
  monkeypatch.setattr(lopt_truncated_step.os, "sched_getaffinity",
                      lambda pid: set(range(16)), raising=False)
  assert auto(12, big) == 12
  assert auto(18, big) == 9
  assert auto(18, 3 * lopt_truncated_step.LANE_GROUP_MIN_BYTES) == 3
  monkeypatch.setattr(lopt_truncated_step.jax, "local_device_count", lambda: 8)
  assert auto(32, big) == 2         # 16 cores over 8 devices
  monkeypatch.setattr(lopt_truncated_step.jax, "default_backend", lambda: "gpu")
  assert auto(32, big) == 1
