"""Learned-optimizer zoo: smoketests, accumulator math, AdafacMLPLOpt specifics, descent."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spmd_lopt.learned_optimizers import (AdafacMLPLOpt, Celo2, LearnableAdam, LearnableSGD,
                                          LearnableSGDM, MLPLOpt, NNAdam, registry)
from spmd_lopt.learned_optimizers import common

LOPTS = {
    "MLPLOpt": MLPLOpt,
    "AdafacMLPLOpt": AdafacMLPLOpt,
    "NNAdam": NNAdam,
    "LearnableSGD": LearnableSGD,
    "LearnableAdam": LearnableAdam,
    "LearnableSGDM": LearnableSGDM,
    "Celo2": Celo2,
}


def _params(dtype):
  # Small magnitudes so that 1e-4..1e-3 steps are visible in bfloat16 (8-bit mantissa).
  k = jax.random.split(jax.random.key(0), 4)
  shapes = {"w": (3, 5), "b": (5,), "s": (), "conv": (2, 3, 4)}
  return {name: (1e-3 * jax.random.normal(kk, shape)).astype(dtype)
          for kk, (name, shape) in zip(k, shapes.items())}


def _grads(params):
  k = jax.random.split(jax.random.key(1), len(params))
  return {n: jax.random.normal(kk, p.shape).astype(p.dtype)
          for kk, (n, p) in zip(k, sorted(params.items()))}


def _two_updates(lopt, theta, params, grads, ms0, ms1):
  """init with model state ms0; update without model state (keeps ms0), then with ms1."""
  opt = lopt.opt_fn(theta)
  s = opt.init(params, model_state=ms0, num_steps=10, key=jax.random.key(2))
  s1 = opt.update(s, grads, loss=jnp.asarray(1.0), key=jax.random.key(3))
  s2 = opt.update(s1, grads, loss=jnp.asarray(0.5), model_state=ms1, key=jax.random.key(4))
  return s, s1, s2


@pytest.mark.parametrize("dtype", [
    jnp.float32,
    # slow: the bf16 path is the f32 one with casts (each case compiles a new program)
    pytest.param(jnp.bfloat16, marks=pytest.mark.slow)], ids=["f32", "bf16"])
@pytest.mark.parametrize("name", list(LOPTS))
def test_smoketest(name, dtype):
  lopt = LOPTS[name]()
  theta = lopt.init(jax.random.key(0))
  params, ms0, ms1 = _params(dtype), {"bn": jnp.zeros(3)}, {"bn": jnp.ones(3)}
  grads = _grads(params)
  s0, s1, s2 = jax.jit(lambda th, p, g, a, b: _two_updates(lopt, th, p, g, a, b))(
      theta, params, grads, ms0, ms1)
  opt = lopt.opt_fn(theta)
  new = opt.get_params(s2)
  assert jax.tree.structure(new) == jax.tree.structure(params)
  for k in params:
    assert new[k].shape == params[k].shape and new[k].dtype == params[k].dtype, k
    assert bool(jnp.all(jnp.isfinite(new[k].astype(jnp.float32)))), k
    assert bool(jnp.any(new[k] != params[k])), f"{name}: leaf {k} did not move"
  np.testing.assert_array_equal(opt.get_state(s1)["bn"], ms0["bn"])
  np.testing.assert_array_equal(opt.get_state(s2)["bn"], ms1["bn"])
  # The whole state keeps its structure and dtypes across updates (a valid scan carry).
  sig = lambda s: jax.tree.map(lambda x: (x.shape, x.dtype), s)
  assert sig(s0) == sig(s1) == sig(s2)
  assert int(s2.iteration) == 2


# Celo2's vmapped compile is the costliest here (~40 s loaded; AdafacMLPLOpt ~6 s); test_celo2
# and the learner tests cover their jit.
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow)
                                  if n in ("Celo2", "AdafacMLPLOpt") else n for n in LOPTS])
def test_jit_vmap_over_thetas(name):
  lopt = LOPTS[name]()
  keys = jax.random.split(jax.random.key(5), 4)
  thetas = jax.vmap(lopt.init)(keys)
  # Perturb so that even key-independent inits (LearnableSGD/Adam) differ per member.
  leaves, treedef = jax.tree.flatten(thetas)
  noise_keys = jax.random.split(jax.random.key(6), len(leaves))
  thetas = jax.tree.unflatten(treedef, [
      x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, noise_keys)])
  params = _params(jnp.float32)
  grads = _grads(params)
  run = lambda th: lopt.opt_fn(th).get_params(
      _two_updates(lopt, th, params, grads, None, None)[2])
  out = jax.jit(jax.vmap(run))(thetas)
  for k in params:
    assert out[k].shape == (4,) + params[k].shape
    assert bool(jnp.all(jnp.isfinite(out[k])))
  w = np.asarray(out["w"])
  assert not np.allclose(w[0], w[1]), "different thetas gave identical params"


def test_config_rebuilds_every_lopt():
  for cls in LOPTS.values():
    lopt = cls()
    rebuilt = cls(**lopt.config)
    assert rebuilt.config == lopt.config
  assert AdafacMLPLOpt(hidden_size=7).config["hidden_size"] == 7
  assert AdafacMLPLOpt().config["initial_rms_decays"] == [0.999]


def test_learnable_sgdm_is_heavy_ball_with_learned_lr_and_momentum():
  lopt = registry.get("learnable_sgdm")(initial_lr=0.1, initial_momentum=0.5)
  theta = lopt.init(None)
  np.testing.assert_allclose(1 - np.exp(theta["one_minus_momentum"]), 0.5, rtol=1e-6)
  theta = {"log_lr": jnp.log(0.2), "one_minus_momentum": jnp.log(1 - 0.8)}
  opt = lopt.opt_fn(theta)
  p, grads = np.array([1.0, -1.0]), [np.array([0.5, 1.0]), np.array([-1.0, 2.0])]
  s = opt.init({"x": jnp.asarray(p, jnp.float32)})
  m = 0.0
  for g in grads:
    s = opt.update(s, {"x": jnp.asarray(g, jnp.float32)})
    m = 0.8 * m + g
    p = p - 0.2 * m
  np.testing.assert_allclose(opt.get_params(s)["x"], p, rtol=1e-6)
  # Meta-gradients reach both hyper-parameters.
  def final_loss(th):
    st = opt.init({"x": jnp.ones(2)})
    op = lopt.opt_fn(th)
    for _ in range(3):
      st = op.update(st, {"x": op.get_params(st)["x"]})
    return jnp.sum(op.get_params(st)["x"] ** 2)
  grad = jax.grad(final_loss)(theta)
  assert float(grad["log_lr"]) != 0.0 and float(grad["one_minus_momentum"]) != 0.0
  with pytest.raises(ValueError, match="initial_momentum"):
    LearnableSGDM(initial_momentum=1.0)


# ----------------------------------------------------------------------------- common


def test_momentum_and_rms_math():
  decays = jnp.asarray([0.0, 0.5, 0.9])
  g1, g2 = jnp.asarray([1.0, -2.0]), jnp.asarray([3.0, 0.5])
  m = common.momentum_init({"x": g1}, 3)
  v = common.rms_init({"x": g1}, 3)
  for g in (g1, g2):
    m = common.momentum_update(m, {"x": g}, decays)
    v = common.rms_update(v, {"x": g}, decays)
  b = np.asarray(decays)
  want_m = (b * (1 - b))[None] * np.asarray(g1)[:, None] + (1 - b)[None] * np.asarray(g2)[:, None]
  want_v = ((b * (1 - b))[None] * np.asarray(g1)[:, None] ** 2
            + (1 - b)[None] * np.asarray(g2)[:, None] ** 2)
  np.testing.assert_allclose(m.m["x"], want_m, rtol=1e-6)
  np.testing.assert_allclose(v.v["x"], want_v, rtol=1e-6)
  assert m.m["x"].shape == (2, 3) and m.m["x"].dtype == jnp.float32


def test_factored_dims():
  assert common.factored_dims((5,)) is None
  assert common.factored_dims(()) is None
  assert common.factored_dims((3, 5)) == (0, 1)
  assert common.factored_dims((4, 2, 3)) == (2, 0)


@pytest.mark.parametrize("shape", [(3, 5), (4, 2, 3), (6,)])
def test_factored_is_exact_for_rank_one_squares(shape):
  # If g^2 is a rank-1 (outer-product) tensor, Adafactor's estimate V_hat = R C / mean(R)
  # is exact, so with decay 0 the preconditioned gradient is g / |g| = sign(g).
  vecs = [jax.random.uniform(jax.random.key(i), (d,), minval=0.5, maxval=2.0)
          for i, d in enumerate(shape)]
  g = vecs[0]
  for v in vecs[1:]:
    g = g[..., None] * v
  g = g * jnp.where(jax.random.bernoulli(jax.random.key(9), 0.5, shape), 1.0, -1.0)
  state = common.factored_init({"g": g}, 2)
  state, y = common.factored_update(state, {"g": g}, jnp.asarray([0.0, 0.5]))
  assert y["g"].shape == shape + (2,)
  np.testing.assert_allclose(y["g"][..., 0], np.sign(g), atol=1e-4)
  # decay 0.5 from zero-init: V_hat is half of g^2, so y = sqrt(2) sign(g).
  np.testing.assert_allclose(y["g"][..., 1], np.sqrt(2) * np.sign(g), rtol=1e-4)
  if len(shape) >= 2:
    assert state.v_full["g"].size == 0 and state.v_row["g"].ndim == len(shape)


# ----------------------------------------------------------------------------- AdafacMLPLOpt


def test_adafac_theta_count_matches_reference():
  theta = AdafacMLPLOpt().init(jax.random.key(0))
  assert sum(x.size for x in jax.tree.leaves(theta)) == 197
  assert theta["nn"]["w0"].shape == (39, 4)
  separate = AdafacMLPLOpt(concat_weights=False, make_separate_weights=True)
  sep_theta = separate.init(jax.random.key(0))
  assert sum(x.size for x in jax.tree.leaves(sep_theta)) == 197
  assert len(jax.tree.leaves(sep_theta["nn"])) == 190


def test_adafac_requires_num_steps():
  lopt = AdafacMLPLOpt()
  with pytest.raises(ValueError, match="num_steps"):
    lopt.opt_fn(lopt.init(jax.random.key(0))).init(_params(jnp.float32))


@pytest.mark.slow  # ~8 s; the reference-fixture test pins the default path
def test_adafac_scalar_and_separate_paths_match_concat():
  theta = AdafacMLPLOpt().init(jax.random.key(3))
  # Non-zero biases and decay offsets so every weight matters.
  theta["nn"] = {k: v + 0.1 if k.startswith("b") else v for k, v in theta["nn"].items()}
  theta["momentum_decays"] = theta["momentum_decays"] + 0.02
  sep_nn = {}
  for k, v in theta["nn"].items():
    layer = k[1:]
    if k.startswith("w"):
      for i in range(v.shape[0]):
        for o in range(v.shape[1]):
          sep_nn[f"w{layer}_{i}_{o}"] = v[i, o]
    else:
      for o in range(v.shape[0]):
        sep_nn[f"b{layer}_{o}"] = v[o]
  sep_theta = dict(theta, nn=sep_nn)
  params = _params(jnp.float32)
  grads = _grads(params)
  steps = []
  # step_mult=1 so that step differences are not hidden by the params' rounding.
  for kw, th in [({}, theta), ({"concat_weights": False}, theta),
                 ({"concat_weights": False, "make_separate_weights": True}, sep_theta)]:
    lopt = AdafacMLPLOpt(step_mult=1.0, **kw)
    _, _, s2 = _two_updates(lopt, th, params, grads, None, None)
    steps.append(jax.tree.map(lambda a, b: a - b, s2.params, params))
  for other in steps[1:]:
    for k in params:
      np.testing.assert_allclose(other[k], steps[0][k], atol=1e-6, rtol=1e-5)


def test_adafac_rejects_unpairable_decays():
  with pytest.raises(ValueError, match="paired"):
    AdafacMLPLOpt(initial_momentum_decays=(0.9, 0.99), initial_adafactor_decays=(0.9, 0.99,
                                                                                  0.999))


# ----------------------------------------------------------------------------- descent


def _quadratic_ratio(lopt, theta, steps=100, num_steps=100):
  """final / initial loss of ``0.5 sum a_i x_i^2`` (a in [0.5, 2]) from x = 1."""
  a = jnp.linspace(0.5, 2.0, 10)
  loss_fn = lambda p: 0.5 * jnp.sum(a * p["x"] ** 2)
  params = {"x": jnp.ones(10)}
  opt = lopt.opt_fn(theta)

  @jax.jit
  def run(theta_unused):
    del theta_unused
    def body(s, _):
      loss, g = jax.value_and_grad(loss_fn)(opt.get_params(s))
      return opt.update(s, g, loss=loss), loss
    s, _ = jax.lax.scan(body, opt.init(params, num_steps=num_steps), None, length=steps)
    return loss_fn(opt.get_params(s))

  return float(run(0) / loss_fn(params))


def _identity_mlp_theta(layers, alpha):
  """(W, b) list for an MLP with two ReLU hidden layers whose output 0 is alpha * x_0 and
  output 1 is 0: units relu(x_0), relu(-x_0) pass through, then alpha * (u - v)."""
  out = []
  for li, (w, b) in enumerate(layers):
    w = np.zeros(w.shape, np.float32)
    if li == 0:
      w[0, 0], w[0, 1] = 1.0, -1.0
    elif li < len(layers) - 1:
      w[0, 0], w[1, 1] = 1.0, 1.0
    else:
      w[0, 0], w[1, 0] = alpha, -alpha
    out.append((jnp.asarray(w), jnp.zeros(b.shape, jnp.float32)))
  return out


def test_quadratic_descends_under_each_lopt():
  ratios = {}
  ratios["LearnableAdam"] = _quadratic_ratio(LearnableAdam(initial_lr=0.1),
                                             LearnableAdam(initial_lr=0.1).init(None))
  ratios["LearnableSGD"] = _quadratic_ratio(LearnableSGD(initial_lr=0.1),
                                            LearnableSGD(initial_lr=0.1).init(None))
  nn_adam = NNAdam(initial_learning_rate=0.05)
  ratios["NNAdam"] = _quadratic_ratio(nn_adam, nn_adam.init(jax.random.key(0)))

  # MLP-based lopts: feature 0 is the normalised gradient; route it to the direction.
  mlp = MLPLOpt()
  theta = mlp.init(jax.random.key(0))
  p = theta["params"]
  names = sorted(p, key=lambda n: int(n.split("_")[1]))
  layers = _identity_mlp_theta([(p[n]["kernel"], p[n]["bias"]) for n in names], 20.0)
  theta = {"params": {n: {"kernel": w, "bias": b} for n, (w, b) in zip(names, layers)}}
  ratios["MLPLOpt"] = _quadratic_ratio(mlp, theta)

  ada = AdafacMLPLOpt()
  theta = ada.init(jax.random.key(0))
  nl = len(ada.layer_sizes)
  layers = _identity_mlp_theta([(theta["nn"][f"w{i}"], theta["nn"][f"b{i}"])
                                for i in range(nl)], 20.0)
  theta["nn"] = {k: v for i, (w, b) in enumerate(layers)
                 for k, v in ((f"w{i}", w), (f"b{i}", b))}
  ratios["AdafacMLPLOpt"] = _quadratic_ratio(ada, theta)

  for name, r in ratios.items():
    assert r < 0.1, f"{name}: loss only fell to {r:.3g} of its start ({ratios})"
