"""optimizers.optax_opts, GraftedOptimizer and learning_rate_schedules: the reference's names
and arguments, each one the optax transformation it wraps."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from spmd_lopt.optimizers import base as opt_base
from spmd_lopt.optimizers import learning_rate_schedules as lrs
from spmd_lopt.optimizers import optax_opts


def _params():
  k1, k2 = jax.random.split(jax.random.key(0))
  return {"w": jax.random.normal(k1, (3, 4)), "b": jax.random.normal(k2, (4,))}


def _grads(t):
  k1, k2 = jax.random.split(jax.random.fold_in(jax.random.key(1), t))
  return {"w": jax.random.normal(k1, (3, 4)), "b": jax.random.normal(k2, (4,))}


# (our wrapper, the optax transformation it must equal)
CASES = {
    "SGD": (lambda: optax_opts.SGD(0.1), lambda: optax.sgd(0.1)),
    "SGDM": (lambda: optax_opts.SGDM(0.1, 0.8), lambda: optax.sgd(0.1, momentum=0.8)),
    "Adam": (lambda: optax_opts.Adam(0.01), lambda: optax.adam(0.01, eps_root=1e-8)),
    "AdamW": (lambda: optax_opts.AdamW(0.01, weight_decay=0.1),
              lambda: optax.adamw(0.01, weight_decay=0.1)),
    "RMSProp": (lambda: optax_opts.RMSProp(0.01, momentum=0.5),
                lambda: optax.rmsprop(0.01, decay=0.9, eps=1e-8, momentum=0.5)),
    "AdaBelief": (lambda: optax_opts.AdaBelief(0.01),
                  lambda: optax.adabelief(0.01, eps=1e-16, eps_root=1e-16)),
    "AdaGrad": (lambda: optax_opts.AdaGrad(0.1), lambda: optax.adagrad(0.1, eps=1e-7)),
    "Adafactor": (lambda: optax_opts.Adafactor(0.01, min_dim_size_to_factor=2),
                  lambda: optax.adafactor(0.01, min_dim_size_to_factor=2)),
    "Yogi": (lambda: optax_opts.Yogi(0.01), lambda: optax.yogi(0.01, eps=1e-3)),
    "RAdam": (lambda: optax_opts.RAdam(0.01), lambda: optax.radam(0.01)),
    "Lamb": (lambda: optax_opts.Lamb(0.01), lambda: optax.lamb(0.01, eps=1e-6)),
    "Lars": (lambda: optax_opts.Lars(0.1), lambda: optax.lars(0.1)),
    "Fromage": (lambda: optax_opts.Fromage(0.01), lambda: optax.fromage(0.01)),
    "SM3": (lambda: optax_opts.SM3(0.01),
            lambda: optax.chain(optax.scale_by_sm3(b1=0.9, b2=1.0), optax.scale(-0.01))),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_optimizer_is_its_optax_transformation(name):
  ours_fn, tx_fn = CASES[name]
  opt, tx = ours_fn(), tx_fn()
  params = _params()
  state = opt.init(params, num_steps=10)
  ref_params, ref_state = params, tx.init(params)
  for t in range(3):
    state = opt.update(state, _grads(t), loss=jnp.float32(1.0))
    upd, ref_state = tx.update(_grads(t), ref_state, ref_params)
    ref_params = optax.apply_updates(ref_params, upd)
  got = opt.get_params(state)
  for k in params:
    np.testing.assert_allclose(got[k], ref_params[k], rtol=1e-6, atol=1e-7)
    assert not np.allclose(got[k], params[k])  # it moved
  assert int(state.iteration) == 3


def test_reference_defaults_and_base_aliases():
  # The reference's Adam default learning rate and epsilon_root.
  adam = optax_opts.Adam()
  assert adam.learning_rate == 0.01 and adam.epsilon_root == 1e-8
  # The reference also reaches these through optimizers.base.
  for name in ("SGD", "SGDM", "Adam", "AdamW", "RMSProp"):
    assert getattr(opt_base, name) is getattr(optax_opts, name)
  with pytest.raises(AttributeError):
    getattr(opt_base, "NotAnOptimizer")


def test_sm3_keeps_scalar_params_scalar():
  opt = optax_opts.SM3(0.1)
  params = {"s": jnp.asarray(2.0), "v": jnp.ones(3)}
  state = opt.init(params)
  state = jax.jit(lambda s: opt.update(s, {"s": jnp.asarray(1.0), "v": jnp.ones(3)}))(state)
  got = opt.get_params(state)
  assert got["s"].shape == () and got["v"].shape == (3,)
  assert float(got["s"]) < 2.0


def test_piecewise_linear_adam_follows_its_schedule():
  sched = optax_opts.piecewise_linear([10, 20], [1.0, 0.0])
  vals = [float(sched(jnp.asarray(t))) for t in (0, 10, 15, 20, 30)]
  np.testing.assert_allclose(vals, [1.0, 1.0, 0.5, 0.0, 0.0], atol=1e-6)
  # With lr 0 after step 20, the 21st update leaves the params where they were.
  opt = optax_opts.PiecewiseLinearAdam(times=(0, 20), lrs=(0.1, 0.0))
  state = opt.init(_params())
  for t in range(21):
    state = opt.update(state, _grads(t))
  before = opt.get_params(state)
  state = opt.update(state, _grads(21))
  np.testing.assert_array_equal(opt.get_params(state)["w"], before["w"])


def test_grafted_optimizer_takes_step_length_from_one_and_direction_from_other():
  mag, dirn = optax_opts.SGD(0.1), optax_opts.Adam(0.01)
  graft = opt_base.GraftedOptimizer(mag, dirn)
  params = _params()
  g = _grads(0)
  new = graft.get_params(graft.update(graft.init(params, model_state=jnp.asarray(3)), g))
  m_step = jax.tree.map(lambda a, b: a - b, mag.get_params(mag.update(mag.init(params), g)),
                        params)
  d_step = jax.tree.map(lambda a, b: a - b,
                        dirn.get_params(dirn.update(dirn.init(params), g)), params)
  flat = lambda t: np.concatenate([np.ravel(v) for v in jax.tree.leaves(t)])
  step = flat(new) - flat(params)
  np.testing.assert_allclose(np.linalg.norm(step), np.linalg.norm(flat(m_step)), rtol=1e-5)
  cos = np.vdot(step, flat(d_step)) / (np.linalg.norm(step) * np.linalg.norm(flat(d_step)))
  np.testing.assert_allclose(cos, 1.0, rtol=1e-5)


def test_wrappers_reject_a_class_instead_of_an_instance():
  with pytest.raises(ValueError, match="Optimizer instance"):
    opt_base.GraftedOptimizer(optax_opts.SGD, optax_opts.Adam(1e-3))
  with pytest.raises(ValueError, match="Optimizer instance"):
    opt_base.GradientClipOptimizer(optax_opts.Adam)


def test_learning_rate_schedules():
  cos = lrs.CosineLearningRateSchedule(1.0, min_learning_rate_mult=0.1,
                                       constant_fraction=0.5, warmup_fraction=0.1)
  # W = max(0.1, 0.5) * 100 = 50 warmup steps; then cosine from 1.0 down to 0.1.
  np.testing.assert_allclose(float(cos(25, 100)), 0.5, rtol=1e-6)
  np.testing.assert_allclose(float(cos(50, 100)), 1.0, rtol=1e-6)
  np.testing.assert_allclose(float(cos(75, 100)), 0.55, rtol=1e-5)
  np.testing.assert_allclose(float(cos(100, 100)), 0.1, rtol=1e-5)
  np.testing.assert_allclose(float(cos(500, 100)), 0.1, rtol=1e-5)
  with pytest.raises(ValueError, match="max_steps"):
    cos(1, None)

  ramp = lrs.LinearRampupSqrtDecay(peak_lr=2.0, warmup_steps=100)
  np.testing.assert_allclose([float(ramp(jnp.asarray(t))) for t in (50, 100, 400)],
                             [1.0, 2.0, 1.0], rtol=1e-6)
  pw = lrs.PiecewiseLinear([0, 10], [1.0, 3.0])
  np.testing.assert_allclose([float(pw(t)) for t in (-5, 5, 50)], [1.0, 2.0, 3.0])
  with pytest.raises(ValueError, match="as many times as vals"):
    lrs.PiecewiseLinear([0, 1], [1.0])
  np.testing.assert_allclose(float(lrs.ExponentialDecay(1.0, 0.5)(3)), 0.125)
  # A schedule drives an optimizer through as_optax.
  sgd = optax_opts.SGD(lrs.as_optax(lrs.ExponentialDecay(1.0, 1.0)))
  state = sgd.update(sgd.init({"x": jnp.ones(())}), {"x": jnp.ones(())})
  state2 = sgd.update(state, {"x": jnp.ones(())})  # lr is 0 from the second step on
  assert float(state.params["x"]) == 0.0 and float(state2.params["x"]) == 0.0
  assert isinstance(pw, lrs.ScalarSchedule)
