"""Celo2: the update rule against an independent numpy transcription of the method, the
optax transformation, the released-weights layout and its errors."""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from spmd_lopt.learned_optimizers import Celo2, Celo2Base, as_optax, registry, resolve
from spmd_lopt.learned_optimizers import celo2 as celo2_lib

WIDTHS = [1, 1, 1, 3, 1, 3, 1, 3, 1, 3, 3, 3, 3, 3]
BETAS = [0.9, 0.99, 0.999]
F32 = jnp.float32


# ----------------------------------------------------------------------------- numpy model
# Written from the method's description (clip, accumulators, grouped features, RMS
# normalisation over the last two axes, grouped MLP, Newton-Schulz, unit RMS), in float64,
# without the implementation's helpers.


def _big_two(shape):
  """(largest axis, second largest axis); on ties the later axis counts as larger."""
  order = sorted(range(len(shape)), key=lambda i: (shape[i], i))
  return order[-1], order[-2]


def _np_init(p):
  st = {"m": [np.zeros(p.shape) for _ in BETAS], "v": np.zeros(p.shape)}
  if p.ndim >= 2:
    d0, d1 = _big_two(p.shape)
    st["row"] = [np.zeros(np.delete(np.array(p.shape), d0)) for _ in BETAS]
    st["col"] = [np.zeros(np.delete(np.array(p.shape), d1)) for _ in BETAS]
  else:
    st["full"] = [np.zeros(p.shape) for _ in BETAS]
  return st


def _unit_rms(x, ndim):
  axes = tuple(range(max(ndim - 2, 0), ndim))
  return x / np.sqrt(1e-9 + np.mean(x * x, axis=axes, keepdims=True))


def _orthogonalize(x):
  a, b, c = 3.4445, -4.7750, 2.0315
  flip = x.shape[-2] > x.shape[-1]
  if flip:
    x = np.swapaxes(x, -1, -2)
  x = x / (np.sqrt((x * x).sum(axis=(-2, -1), keepdims=True)) + 1e-8)
  for _ in range(5):
    gram = x @ np.swapaxes(x, -1, -2)
    x = a * x + (b * gram + c * gram @ gram) @ x
  return np.swapaxes(x, -1, -2) if flip else x


def _np_step(net, p, grad, st, ortho):
  """One step of the rule on one tensor: returns (unit-RMS step, new state)."""
  scalar = p.ndim == 0
  p = np.asarray(p, np.float64).reshape((1,) if scalar else p.shape)
  g = np.clip(np.asarray(grad, np.float64).reshape(p.shape), -1000, 1000)
  st = {k: (list(v) if isinstance(v, list) else v) for k, v in st.items()}
  st = {k: ([x.reshape(p.shape) if scalar else x for x in v] if k in ("m", "full") else
            (v.reshape(p.shape) if k == "v" and scalar else v)) for k, v in st.items()}
  st["m"] = [b * m + (1 - b) * g for b, m in zip(BETAS, st["m"])]
  st["v"] = 0.95 * st["v"] + 0.05 * g * g
  sq = g * g + 1e-30
  if p.ndim >= 2:
    d0, d1 = _big_two(p.shape)
    st["row"] = [b * r + (1 - b) * sq.mean(axis=d0) for b, r in zip(BETAS, st["row"])]
    st["col"] = [b * c + (1 - b) * sq.mean(axis=d1) for b, c in zip(BETAS, st["col"])]
    rows = [np.expand_dims(r, d0) * np.ones(p.shape) for r in st["row"]]
    cols = [np.expand_dims(c, d1) * np.ones(p.shape) for c in st["col"]]
    k = d1 - 1 if d1 > d0 else d1  # where d1 sits once d0 is gone
    rfac = [np.expand_dims(1 / np.sqrt(np.maximum(r / (r.mean(axis=k, keepdims=True) + 1e-9),
                                                  1e-9)), d0) for r in st["row"]]
    cfac = [np.expand_dims(1 / np.sqrt(np.maximum(c, 1e-9)), d1) for c in st["col"]]
    fac_g = [g * rf * cf for rf, cf in zip(rfac, cfac)]
  else:
    st["full"] = [b * f + (1 - b) * sq for b, f in zip(BETAS, st["full"])]
    fac_g = [g / np.sqrt(np.maximum(f + 1e-9, 1e-9)) for f in st["full"]]
  rs = 1 / np.sqrt(st["v"] + 1e-8)
  groups = [[g], [np.clip(g, -0.1, 0.1)], [p], st["m"], [st["v"]],
            [m * rs for m in st["m"]], [rs], fac_g, [g * rs]]
  if p.ndim >= 2:
    groups += [rows, cols, [1 / np.sqrt(r + 1e-8) for r in rows],
               [1 / np.sqrt(c + 1e-8) for c in cols],
               [m * rf * cf for m, rf, cf in zip(st["m"], rfac, cfac)]]
  h = np.asarray(net["b0"], np.float64)
  for i, group in enumerate(groups):
    cols_i = np.stack([_unit_rms(x, p.ndim) for x in group], axis=-1)
    h = h + cols_i @ np.asarray(net[f"w0__{i}"], np.float64)
  h = np.maximum(h, 0) @ np.asarray(net["w1"], np.float64) + net["b1"]
  out = np.maximum(h, 0) @ np.asarray(net["w2"], np.float64) + net["b2"]
  d = out[..., 0]
  if ortho and d.ndim >= 2:
    d = _orthogonalize(d)
  step = _unit_rms(d, d.ndim)
  if scalar:
    step = step.reshape(())
    st = {k: ([x.reshape(()) for x in v] if k in ("m", "full") else
              (v.reshape(()) if k == "v" else v)) for k, v in st.items()}
  return step, st


# ----------------------------------------------------------------------------- fixtures


def _theta(seed=0, hidden_size=8, hidden_layers=2):
  """Init plus a perturbation, so that no hidden unit is dead by construction."""
  theta = Celo2(hidden_size=hidden_size, hidden_layers=hidden_layers).init(
      jax.random.key(seed))
  leaves, tdef = jax.tree.flatten(theta)
  keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
  return jax.tree.unflatten(tdef, [x + 0.3 * jax.random.normal(k, x.shape)
                                   for x, k in zip(leaves, keys)])


def _params():
  k = jax.random.split(jax.random.key(7), 4)
  return {"conv": 0.5 * jax.random.normal(k[0], (2, 3, 4, 5)),
          "mlp/~/linear_0": {"w": 0.5 * jax.random.normal(k[1], (6, 4)),
                             "b": 0.1 * jax.random.normal(k[2], (5,))},
          "scale": jnp.float32(0.7)}


def _grads(params, t):
  leaves, tdef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(20 + t), len(leaves))
  out = [jax.random.normal(k, x.shape) * (0.01 if t % 2 else 3.0) for x, k in zip(leaves, keys)]
  if t == 1:
    out[0] = out[0].at[0, 0, 0, 0].set(5000.0)  # beyond the +-1000 clip
  return jax.tree.unflatten(tdef, out)


STEPS = 3


@functools.lru_cache(maxsize=None)
def _optax_steps(ortho):
  theta, params = _theta(), _params()
  tx = celo2_lib.scale_by_celo2(theta, orthogonalize=ortho)
  update = jax.jit(tx.update)
  state, out = tx.init(params), []
  for t in range(STEPS):
    u, state = update(_grads(params, t), state, params)
    out.append(u)
  return out, state


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("ortho", [True, False], ids=["celo2", "celo2_base"])
def test_steps_match_numpy_transcription(ortho):
  theta, params = _theta(), _params()
  net = jax.tree.map(np.asarray, theta["ff_mod_stack"]["~"])
  got, _ = _optax_steps(ortho)
  paths = {"conv": lambda t: t["conv"], "w": lambda t: t["mlp/~/linear_0"]["w"],
           "b": lambda t: t["mlp/~/linear_0"]["b"], "scale": lambda t: t["scale"]}
  for name, pick in paths.items():
    p = np.asarray(pick(params))
    st = _np_init(p)
    for t in range(STEPS):
      want, st = _np_step(net, p, np.asarray(pick(_grads(params, t))), st, ortho)
      have = np.asarray(pick(got[t]))
      assert have.shape == p.shape and have.dtype == np.float32
      np.testing.assert_allclose(have, want, rtol=0, atol=2e-4, err_msg=f"{name} t={t}")
      if p.ndim >= 1:  # unit RMS over the last two axes
        axes = tuple(range(max(p.ndim - 2, 0), p.ndim))
        np.testing.assert_allclose(np.sqrt(np.mean(have ** 2, axis=axes)), 1.0, rtol=1e-4)


def test_orthogonalize_changes_only_rank_two_and_up():
  with_ns, _ = _optax_steps(True)
  without, _ = _optax_steps(False)
  for t in range(STEPS):
    np.testing.assert_array_equal(with_ns[t]["scale"], without[t]["scale"])
    np.testing.assert_array_equal(with_ns[t]["mlp/~/linear_0"]["b"],
                                  without[t]["mlp/~/linear_0"]["b"])
    for a, b in ((with_ns[t]["conv"], without[t]["conv"]),
                 (with_ns[t]["mlp/~/linear_0"]["w"], without[t]["mlp/~/linear_0"]["w"])):
      assert float(jnp.max(jnp.abs(a - b))) > 1e-2


def test_newton_schulz_output_is_near_orthogonal():
  x = jax.random.normal(jax.random.key(0), (3, 4, 6))
  y = np.asarray(celo2_lib.newton_schulz(x), np.float64)
  s = np.linalg.svd(y, compute_uv=False)
  # The quintic iteration maps singular values into roughly [0.7, 1.2], not exactly 1.
  assert s.min() > 0.5 and s.max() < 1.3
  yt = np.asarray(celo2_lib.newton_schulz(jnp.swapaxes(x, -1, -2)))
  np.testing.assert_allclose(np.swapaxes(yt, -1, -2), y, atol=1e-5)


def test_scale_by_celo2_equals_opt_fn_update():
  theta, params = _theta(), _params()
  opt = Celo2().opt_fn(theta)
  state = opt.init(params, num_steps=50)
  update = jax.jit(opt.update)
  tx = celo2_lib.scale_by_celo2(theta)
  tx_update = jax.jit(tx.update)
  p, tx_state = params, tx.init(params)
  for t in range(STEPS):
    state = update(state, _grads(params, t))
    u, tx_state = tx_update(_grads(params, t), tx_state, p)
    p = jax.tree.map(lambda a, b: a - 1e-3 * b, p, u)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-7),
                 opt.get_params(state), p)
  assert int(state.num_steps) == 50 and int(state.iteration) == STEPS
  assert int(tx_state.count) == STEPS


def test_optax_chain_as_the_authors_use_it():
  theta, params = _theta(), _params()
  tx = optax.chain(celo2_lib.scale_by_celo2(theta), optax.add_decayed_weights(0.1),
                   optax.scale_by_learning_rate(0.01))
  u, _ = jax.jit(tx.update)(_grads(params, 0), tx.init(params), params)
  raw, _ = _optax_steps(True)
  jax.tree.map(lambda a, r, p: np.testing.assert_allclose(a, -0.01 * (r + 0.1 * p),
                                                          rtol=1e-5, atol=1e-8),
               u, raw[0], params)
  with pytest.raises(ValueError, match="needs|reads the parameters"):
    celo2_lib.scale_by_celo2(theta).update(_grads(params, 0), tx.init(params)[0])


def test_regex_1d_adam_branch_and_weight_decay():
  theta, params = _theta(), _params()
  lopt = Celo2(regex_1d="/b$", weight_decay=0.5, step_mult=2e-3)
  opt = lopt.opt_fn(theta)
  assert lopt.adam_mask(params) == [False, True, False, False]  # conv, b, w, scale
  state = opt.init(params, num_steps=10)
  update = jax.jit(opt.update)
  m = v = 0.0
  b = np.asarray(params["mlp/~/linear_0"]["b"], np.float64)
  steps, _ = _optax_steps(True)
  w = np.asarray(params["mlp/~/linear_0"]["w"], np.float64)
  for t in range(2):
    g = np.asarray(_grads(params, t)["mlp/~/linear_0"]["b"], np.float64)
    state = update(state, _grads(params, t))
    m, v = 0.9 * m + 0.1 * g, 0.95 * v + 0.05 * g * g
    lr = 20 * 2e-3
    b = b - lr * m / np.sqrt(v + 1e-8) - 0.5 * lr * b
    np.testing.assert_allclose(opt.get_params(state)["mlp/~/linear_0"]["b"], b, atol=1e-6)
  # The learned leaves do not see the Adam leaf: first step as without regex_1d.
  w = w - 2e-3 * np.asarray(steps[0]["mlp/~/linear_0"]["w"]) - 0.5 * 2e-3 * w
  one = jax.jit(opt.update)(opt.init(params), _grads(params, 0))
  np.testing.assert_allclose(one.params["mlp/~/linear_0"]["w"], w, atol=1e-6)
  with pytest.raises(ValueError, match="regex_1d"):
    Celo2(regex_1d="(")


def test_theta_layout_and_registry():
  theta = Celo2().init(jax.random.key(0))
  assert sum(x.size for x in jax.tree.leaves(theta)) == 347
  net = theta["ff_mod_stack"]["~"]
  assert [net[f"w0__{i}"].shape[0] for i in range(14)] == WIDTHS
  assert net["w1"].shape == (8, 8) and net["w2"].shape == (8, 3)
  assert registry.get("celo2") is Celo2 and registry.get("celo2_base") is Celo2Base
  base = registry.get("celo2_base")()
  assert not base.orthogonalize and type(base)(**base.config).config == base.config
  # Truncated-normal init with stddev 1/sqrt(fan_in = 30) for the first layer.
  w0 = np.concatenate([np.asarray(net[f"w0__{i}"]) for i in range(14)])
  assert 0.6 / np.sqrt(30) < w0.std() < 1.4 / np.sqrt(30)
  assert np.abs(w0).max() <= 2 / np.sqrt(30) / 0.87  # truncated at two (raw) std units


def _released_dict(theta):
  return {"ff_mod_stack": {"~": {k: np.asarray(v) for k, v in
                                 theta["ff_mod_stack"]["~"].items()}}}


def test_released_layout_round_trips_and_runs(tmp_path):
  theta = _theta(3)
  path = tmp_path / "theta.state"
  path.write_bytes(flax.serialization.to_bytes(_released_dict(theta)))
  back = celo2_lib.load_released_weights(path)
  jax.tree.map(np.testing.assert_array_equal, back, theta)
  lopt, th = resolve(f"celo2={path}")
  assert type(lopt) is Celo2
  jax.tree.map(np.testing.assert_array_equal, th, theta)
  lopt, _ = resolve(f"celo2_base={path}")
  assert type(lopt) is Celo2Base
  params = _params()
  tx = as_optax(str(path), lopt=Celo2())
  u, _ = jax.jit(tx.update)(_grads(params, 0), tx.init(params), params)
  want = jax.jit(celo2_lib.scale_by_celo2(theta).update)(
      _grads(params, 0), celo2_lib.accumulators_init(params), params)[0]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, -1e-3 * b, atol=1e-6), u, want)


def test_wrong_files_give_one_line_errors(tmp_path):
  d = _released_dict(_theta())
  net = d["ff_mod_stack"]["~"]
  del net["w0__13"]
  net["w3"] = np.zeros((8, 3), np.float32)
  net["w1"] = np.zeros((8, 9), np.float32)
  bad = tmp_path / "bad.state"
  bad.write_bytes(flax.serialization.to_bytes(d))
  with pytest.raises(ValueError) as e:
    celo2_lib.load_released_weights(bad)
  msg = str(e.value)
  assert "\n" not in msg and "not a Celo2 checkpoint" in msg
  assert "missing ff_mod_stack/~/w0__13 (3, 8)" in msg
  assert "extra ff_mod_stack/~/w3 (8, 3)" in msg and "w1 is (8, 9), expected (8, 8)" in msg
  junk = tmp_path / "junk.state"
  junk.write_bytes(b"\xc1\x00garbage")
  with pytest.raises(ValueError, match="cannot decode"):
    celo2_lib.load_released_weights(junk)
  other = tmp_path / "other.state"
  other.write_bytes(flax.serialization.to_bytes({"mlp/~/linear_0": {"w": np.zeros((2, 2))}}))
  with pytest.raises(ValueError, match="missing ff_mod_stack.*extra mlp"):
    resolve(f"celo2={other}")
  with pytest.raises(ValueError, match="no such file"):
    resolve(f"celo2={tmp_path / 'absent.state'}")


# ----------------------------------------------------------------------------- fast path


def _direction_materialised(net, groups, shape):
  """The first implementation of items 4-5, kept as the reference for the folded one:
  every group broadcast to ``S + (w,)``, normalised column by column, concatenated, one
  product with the stacked first-layer weights."""
  ndim = len(shape)
  full = [jnp.broadcast_to(x, shape + x.shape[-1:]) for x in groups]
  feats = jnp.concatenate([celo2_lib.rms_normalize(x, ndim) for x in full], axis=-1)
  w0 = jnp.concatenate([net[f"w0__{i}"] for i in range(len(groups))], axis=0)
  h = jnp.matmul(feats, w0, precision=jax.lax.Precision.HIGHEST) + net["b0"]
  layer = 1
  while f"w{layer}" in net:
    h = jnp.matmul(jax.nn.relu(h), net[f"w{layer}"],
                   precision=jax.lax.Precision.HIGHEST) + net[f"b{layer}"]
    layer += 1
  return h[..., 0]


# Ranks 1-4; (40, 3, 7): the factored axes (0, 2) are not the normalised ones (1, 2);
# (5, 5): a tie; (2, 3, 4, 6): a conv kernel with 6 normalisation slices.
FAST_PATH_SHAPES = [(7,), (12, 5), (5, 5), (40, 3, 7), (2, 3, 4, 6)]


# (8, 2): the released shape; (5, 1) and (6, 3): the output layer right after the first
# one, and two hidden layers in between (the layer loop and the output-0-only product).
@pytest.mark.parametrize("hidden_size,hidden_layers", [
    (8, 2), pytest.param(5, 1, marks=pytest.mark.slow),
    pytest.param(6, 3, marks=pytest.mark.slow)])
def test_folded_first_layer_equals_materialised_features(hidden_size, hidden_layers):
  """Folding the column norms into the weights, keeping row/column features un-broadcast
  and running the layers as (hidden, entries) products computes the same direction as
  materialising every feature column (perturbed biases: a dropped bias would show)."""
  net = _theta(0, hidden_size, hidden_layers)["ff_mod_stack"]["~"]
  rng = np.random.default_rng(0)
  inputs = []  # numpy draws: jax.random inside the jit would dominate its compile time
  for shape in FAST_PATH_SHAPES:
    acc = jax.eval_shape(celo2_lib.accumulators_init, jax.ShapeDtypeStruct(shape, F32))
    normal = lambda s: rng.standard_normal(s).astype(np.float32)
    m = normal(acc.momentum.m.shape)
    inputs.append([normal(shape), normal(shape), m] + [
        np.exp(normal(x.shape)) for x in (acc.rms.v, m, acc.factored.v_row,
                                          acc.factored.v_col)])

  def both(inputs):
    out = []
    for shape, leaf in zip(FAST_PATH_SHAPES, inputs):
      groups = celo2_lib._features(*leaf)
      out.append((celo2_lib._mlp_direction(net, groups),
                  _direction_materialised(net, groups, shape)))
    return out

  for shape, (got, want) in zip(FAST_PATH_SHAPES, jax.jit(both)(inputs)):
    assert got.shape == shape
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6, err_msg=str(shape))


# Two PES compiles of Celo2 on the 8x8 image MLP: ~1 min each on the loaded 2-core box.
@pytest.mark.slow
def test_pes_meta_gradient_unchanged_by_the_fast_direction(monkeypatch):
  """The PES meta-gradient through the whole inner step (Celo2 on the 64-32-10 image MLP,
  Newton-Schulz included) with the fast direction and with the materialised reference
  one: the same to float32 rounding, which PES's loss differences amplify (cosine
  >= 0.9999; measured 1 - 1.2e-7, the largest entry difference 5.4e-4 of the largest
  entry)."""
  from spmd_lopt.outer_trainers import estimator_base, lopt_truncated_step, truncated_pes
  from spmd_lopt.outer_trainers import truncation_schedule
  from spmd_lopt.tasks import registry as task_registry
  fam = task_registry.get_task_family("ImageMLP_Synthetic8_Relu32_B64", batch_size=16)
  lopt = Celo2()
  step = lopt_truncated_step.VectorizedLOptTruncatedStep(
      fam, lopt, truncation_schedule.ConstantTruncationSchedule(5), num_tasks=4)
  est = truncated_pes.TruncatedPES(truncated_step=step, trunc_length=3, std=0.01)
  theta = _theta(1)
  ids = jnp.arange(4)
  outer = estimator_base.OuterState(jnp.asarray(0))

  def run():
    def chain(theta):
      state = est.init_local(theta, outer, jax.random.key(1), ids)
      out = est.estimate_local(theta, state, jax.random.key(2), ids, outer)
      out = est.estimate_local(theta, out.state, jax.random.key(3), ids, outer)  # a reset
      return out.grad
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(jax.jit(chain)(theta))])

  fast = run()
  monkeypatch.setattr(celo2_lib, "_mlp_direction", lambda net, groups: (
      _direction_materialised(net, groups, groups[0].shape[:-1])))
  slow = run()
  cos = np.dot(fast, slow) / (np.linalg.norm(fast) * np.linalg.norm(slow))
  assert np.linalg.norm(slow) > 0
  assert cos >= 0.9999, cos
