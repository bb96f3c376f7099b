"""ParameterCheckpoint files and the optax adapter."""

import json
import os
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from spmd_lopt.learned_optimizers import (AdafacMLPLOpt, Celo2Base, LearnableAdam,
                                          LearnableSGDM, MLPLOpt, NNAdam, as_optax,
                                          load_parameter_checkpoint, resolve,
                                          save_parameter_checkpoint)
from spmd_lopt.learned_optimizers import base as lopt_base
from spmd_lopt.learned_optimizers import checkpoint as ckpt_lib
from spmd_lopt.learned_optimizers import specs
from spmd_lopt.optimizers import base as opt_base


def _tiny_params():
  return {"w": 0.1 * jnp.arange(12, dtype=jnp.float32).reshape(3, 4), "b": jnp.ones(4)}


@pytest.mark.parametrize("lopt", [MLPLOpt(hidden_size=8), AdafacMLPLOpt(hidden_size=5),
                                  AdafacMLPLOpt(concat_weights=False,
                                                make_separate_weights=True),
                                  NNAdam(initial_learning_rate=3e-3), LearnableAdam(0.01)],
                         ids=lambda l: type(l).__name__)
def test_round_trip_is_bit_identical(tmp_path, lopt):
  theta = lopt.init(jax.random.key(1))
  theta = jax.tree.map(lambda x: x + 0.01, theta)  # not just the init values
  path = tmp_path / "lopt.ckpt"
  digest = save_parameter_checkpoint(path, lopt, theta, extra={"outer_step": 7})
  loaded = load_parameter_checkpoint(path)
  assert loaded.sha256 == digest and loaded.format_version == ckpt_lib.FORMAT_VERSION
  assert loaded.extra == {"outer_step": 7}
  assert type(loaded.lopt) is type(lopt) and loaded.lopt.config == lopt.config
  assert loaded.lopt_class == ckpt_lib.class_path(type(lopt))
  assert jax.tree.structure(loaded.theta) == jax.tree.structure(theta)
  for a, b in zip(jax.tree.leaves(theta), jax.tree.leaves(loaded.theta)):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
  if isinstance(lopt, (MLPLOpt, NNAdam)) or lopt.config.get("make_separate_weights"):
    return  # keep the suite fast: one network lopt and one hand-designed one suffice
  # The rebuilt optimizer computes the same update.
  params = _tiny_params()
  grads = jax.tree.map(jnp.cos, params)
  outs = []
  for lo, th in ((lopt, theta), (loaded.lopt, loaded.theta)):
    step = lambda th, lo=lo: lo.opt_fn(th).update(lo.opt_fn(th).init(params, num_steps=5),
                                                  grads).params
    outs.append(jax.jit(step)(th))
  for k in params:
    np.testing.assert_array_equal(outs[0][k], outs[1][k])


def test_atomic_overwrite_leaves_no_temporary_files(tmp_path):
  lopt = LearnableAdam()
  path = tmp_path / "lopt.ckpt"
  save_parameter_checkpoint(path, lopt, lopt.init(None), extra={"v": 1})
  save_parameter_checkpoint(path, lopt, lopt.init(None), extra={"v": 2})
  assert sorted(os.listdir(tmp_path)) == ["lopt.ckpt"]
  assert load_parameter_checkpoint(path).extra == {"v": 2}


def test_wrong_class_names_both_classes(tmp_path):
  lopt = MLPLOpt(hidden_size=8)
  save_parameter_checkpoint(tmp_path / "m.ckpt", lopt, lopt.init(jax.random.key(0)))
  with pytest.raises(ValueError) as err:
    load_parameter_checkpoint(tmp_path / "m.ckpt", expect=AdafacMLPLOpt())
  msg = str(err.value)
  assert "mlp_lopt:MLPLOpt" in msg and "adafac_mlp_lopt:AdafacMLPLOpt" in msg


def test_wrong_shapes_name_first_differing_leaf(tmp_path):
  lopt = MLPLOpt(hidden_size=8)
  save_parameter_checkpoint(tmp_path / "m.ckpt", lopt, lopt.init(jax.random.key(0)))
  with pytest.raises(ValueError) as err:
    load_parameter_checkpoint(tmp_path / "m.ckpt", expect=MLPLOpt(hidden_size=16))
  msg = str(err.value)
  assert "params/Dense_0/bias" in msg and "(16,)" in msg and "(8,)" in msg
  # Matching shapes but different constructor arguments only warn.
  with pytest.warns(UserWarning, match="step_mult"):
    loaded = load_parameter_checkpoint(tmp_path / "m.ckpt",
                                       expect=MLPLOpt(hidden_size=8, step_mult=0.1))
  assert loaded.lopt.config["step_mult"] == 0.001


def test_save_rejects_theta_of_another_optimizer(tmp_path):
  with pytest.raises(ValueError, match="does not fit MLPLOpt.*leaf params is missing"):
    save_parameter_checkpoint(tmp_path / "x.ckpt", MLPLOpt(),
                              AdafacMLPLOpt().init(jax.random.key(0)))
  with pytest.raises(ValueError, match="JSON"):
    save_parameter_checkpoint(tmp_path / "x.ckpt", LearnableAdam(),
                              LearnableAdam().init(None), extra={"f": object()})
  assert not os.listdir(tmp_path)


def test_corrupted_files_give_clear_errors(tmp_path):
  lopt = AdafacMLPLOpt()
  path = tmp_path / "a.ckpt"
  save_parameter_checkpoint(path, lopt, lopt.init(jax.random.key(0)))
  blob = path.read_bytes()

  # A flipped byte inside theta's payload: decodes fine, fails the hash.
  outer = flax.serialization.msgpack_restore(blob)
  start = blob.index(outer["theta"])
  flipped = bytearray(blob)
  flipped[start + len(outer["theta"]) // 2] ^= 0x55
  (tmp_path / "flip.ckpt").write_bytes(bytes(flipped))
  with pytest.raises(ValueError, match="hash mismatch.*corrupted"):
    load_parameter_checkpoint(tmp_path / "flip.ckpt")

  (tmp_path / "trunc.ckpt").write_bytes(blob[: len(blob) // 2])
  with pytest.raises(ValueError, match="not a valid spmd_lopt parameter checkpoint"):
    load_parameter_checkpoint(tmp_path / "trunc.ckpt")

  (tmp_path / "other.ckpt").write_bytes(flax.serialization.msgpack_serialize({"a": 1}))
  with pytest.raises(ValueError, match="marker"):
    load_parameter_checkpoint(tmp_path / "other.ckpt")

  future = dict(outer, format_version=ckpt_lib.FORMAT_VERSION + 1)
  (tmp_path / "future.ckpt").write_bytes(flax.serialization.msgpack_serialize(future))
  with pytest.raises(ValueError, match="format version"):
    load_parameter_checkpoint(tmp_path / "future.ckpt")


# ----------------------------------------------------------------------------- optax


def _mlp_loss(params, batch):
  x, y = batch
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  return jnp.mean((h @ params["w2"] + params["b2"] - y) ** 2)


def _mlp_setup():
  k = jax.random.split(jax.random.key(0), 4)
  params = {"w1": 0.5 * jax.random.normal(k[0], (4, 8)), "b1": jnp.zeros(8),
            "w2": 0.5 * jax.random.normal(k[1], (8, 1)), "b2": jnp.zeros(1)}
  x = jax.random.normal(k[2], (16, 4))
  return params, (x, jnp.sin(x[:, :1]))


def _own_trajectory(lopt, theta, params, batch, steps=20):
  opt = lopt.opt_fn(theta)

  def body(s, _):
    loss, g = jax.value_and_grad(_mlp_loss)(opt.get_params(s), batch)
    s = opt.update(s, g, loss=loss)
    return s, opt.get_params(s)

  return jax.lax.scan(body, opt.init(params, num_steps=steps), None, length=steps)[1]


def _optax_trajectory(tx, params, batch, steps=20):
  def body(carry, _):
    p, s = carry
    loss, g = jax.value_and_grad(_mlp_loss)(p, batch)
    u, s = tx.update(g, s, p, loss=loss)
    p = optax.apply_updates(p, u)
    return (p, s), p

  return jax.lax.scan(body, (params, tx.init(params)), None, length=steps)[1]


@pytest.mark.parametrize("lopt", [AdafacMLPLOpt(step_mult=0.01), NNAdam(1e-2)],
                         ids=lambda l: type(l).__name__)
def test_optax_adapter_matches_own_update(tmp_path, lopt):
  theta = lopt.init(jax.random.key(3))
  params, batch = _mlp_setup()
  own = jax.jit(lambda th: _own_trajectory(lopt, th, params, batch))(theta)
  path = tmp_path / "t.ckpt"
  save_parameter_checkpoint(path, lopt, theta)
  # chain() checks that loss travels through optax's extra-args plumbing.
  for tx in (as_optax(theta, lopt, num_steps=20),
             optax.chain(as_optax(str(path), num_steps=20), optax.scale(1.0))):
    via_optax = jax.jit(lambda: _optax_trajectory(tx, params, batch))()
    for k in params:
      np.testing.assert_allclose(via_optax[k], own[k], atol=1e-6, rtol=0)
  moved = float(jnp.max(jnp.abs(own["w1"][-1] - params["w1"])))
  assert moved > 1e-3, "trajectory barely moved; the comparison would be vacuous"


@flax.struct.dataclass
class _LossState:
  params: object
  state: object
  iteration: jax.Array


class _LossScaledSGD(lopt_base.LearnedOptimizer):
  """Test double: ``p <- p - theta * loss * g`` (it reads the loss)."""

  def init(self, key):
    return {"lr": jnp.asarray(0.1)}

  def opt_fn(self, theta, is_training=False):
    class _Opt(opt_base.Optimizer):
      def init(self, params, model_state=None, num_steps=None, key=None):
        return _LossState(params, model_state, jnp.asarray(0, jnp.int32))

      def update(self, s, grad, loss=None, model_state=None, key=None, **kw):
        p = jax.tree.map(lambda p, g: p - theta["lr"] * loss * g, s.params, grad)
        return _LossState(p, s.state, s.iteration + 1)

    return _Opt()


def test_optax_adapter_passes_loss_and_needs_params():
  lopt = _LossScaledSGD()
  tx = as_optax(lopt.init(None), lopt)
  params = {"x": jnp.ones(3)}
  state = tx.init(params)
  assert state.params is None  # the adapter does not keep a second copy of params
  u, state = tx.update({"x": jnp.ones(3)}, state, params, loss=jnp.asarray(2.0))
  np.testing.assert_allclose(u["x"], -0.2 * np.ones(3), rtol=1e-6)
  assert int(state.iteration) == 1
  with pytest.raises(ValueError, match="params"):
    tx.update({"x": jnp.ones(3)}, state)
  with pytest.raises(ValueError, match="lopt"):
    as_optax(lopt.init(None))


# ----------------------------------------------------------------------------- safe loading


def _crafted(path, header):
  """A well-formed checkpoint (valid hash) whose header says whatever the test wants."""
  lopt = LearnableAdam()
  theta_bytes = flax.serialization.msgpack_serialize(
      jax.tree.map(np.asarray, lopt.init(None)))
  head = json.dumps(header).encode()
  path.write_bytes(flax.serialization.msgpack_serialize({
      "magic": ckpt_lib.MAGIC, "format_version": 1, "header": head, "theta": theta_bytes,
      "sha256": ckpt_lib._digest(head, theta_bytes)}))  # pylint: disable=protected-access
  return path


def test_loading_never_imports_a_module_named_by_the_file(tmp_path, monkeypatch):
  marker = tmp_path / "imported.marker"
  moddir = tmp_path / "mods"
  moddir.mkdir()
  (moddir / "evil_lopt_mod.py").write_text(
      f"open({str(marker)!r}, 'w').write('ran')\n"
      "from spmd_lopt.learned_optimizers.base import LearnableAdam as Evil\n")
  monkeypatch.syspath_prepend(str(moddir))
  for i, cls_path in enumerate(["evil_lopt_mod:Evil", "os:system", "subprocess:Popen"]):
    for key in ("lopt_class", "lopt_name"):
      f = _crafted(tmp_path / f"c{i}{key}.lopt",
                   {key: cls_path, "config": {}, "extra": {}})
      with pytest.raises(ValueError) as e:
        load_parameter_checkpoint(f)
      assert "\n" not in str(e.value) and "refusing" in str(e.value)
      assert cls_path in str(e.value)
  assert not marker.exists()
  assert "evil_lopt_mod" not in sys.modules


def test_old_header_with_builtin_class_path_still_loads(tmp_path):
  f = _crafted(tmp_path / "old.lopt",
               {"lopt_class": "spmd_lopt.learned_optimizers.base:LearnableAdam",
                "config": LearnableAdam().config, "extra": {"a": 1}})
  loaded = load_parameter_checkpoint(f)
  assert type(loaded.lopt) is LearnableAdam and loaded.lopt_name == "learnable_adam"
  assert loaded.extra == {"a": 1}


def test_new_files_store_the_registered_name_and_unregistered_classes_are_refused(tmp_path):
  lopt = Celo2Base(step_mult=2e-3)
  save_parameter_checkpoint(tmp_path / "c.lopt", lopt, lopt.init(jax.random.key(0)))
  header = json.loads(flax.serialization.msgpack_restore(
      (tmp_path / "c.lopt").read_bytes())["header"].decode())
  assert header["lopt_name"] == "celo2_base"
  loaded = load_parameter_checkpoint(tmp_path / "c.lopt")
  assert type(loaded.lopt) is Celo2Base and loaded.lopt.step_mult == 2e-3

  class Unregistered(LearnableAdam):
    pass

  with pytest.raises(ValueError, match="not registered"):
    save_parameter_checkpoint(tmp_path / "u.lopt", Unregistered(), LearnableAdam().init(None))
  assert not (tmp_path / "u.lopt").exists()


# ----------------------------------------------------------------------------- specs


def test_resolve_grammar(tmp_path):
  lopt, theta = resolve("init:learnable_sgdm", lopt_args={"initial_lr": 0.1})
  assert type(lopt) is LearnableSGDM
  np.testing.assert_allclose(np.exp(theta["log_lr"]), 0.1, rtol=1e-6)
  lopt = AdafacMLPLOpt(hidden_size=3)
  th = lopt.init(jax.random.key(1))
  save_parameter_checkpoint(tmp_path / "a.lopt", lopt, th)
  got_lopt, got = resolve(str(tmp_path / "a.lopt"))
  assert got_lopt.config == lopt.config
  jax.tree.map(np.testing.assert_array_equal, got, th)
  ref = os.path.join(os.path.dirname(__file__), "fixtures", "learned_optimization",
                     "mlp_lopt_theta.state")
  got_lopt, got = resolve(f"mlp_lopt={ref}")
  assert type(got_lopt) is MLPLOpt and got["params"]["Dense_0"]["kernel"].shape == (19, 32)
  for bad, what in [("init:nope", "Unknown learned optimizer"),
                    ("pretrained:../../etc/passwd", "no pretrained"),
                    ("pretrained:not_shipped", "no pretrained"),
                    (ref, "not a spmd_lopt parameter checkpoint"),
                    (str(tmp_path / "missing.lopt"), "neither a file nor a spec")]:
    with pytest.raises(ValueError, match=what):
      resolve(bad)


def test_resolve_pretrained_reads_the_package_folder(tmp_path, monkeypatch):
  lopt = LearnableSGDM(initial_lr=0.05)
  save_parameter_checkpoint(tmp_path / "sgdm_demo.lopt", lopt, lopt.init(None))
  monkeypatch.setattr(specs, "PRETRAINED_DIR", str(tmp_path))
  assert specs.pretrained_names() == ("sgdm_demo",)
  got_lopt, theta = resolve("pretrained:sgdm_demo")
  assert got_lopt.config == lopt.config
  np.testing.assert_allclose(np.exp(theta["log_lr"]), 0.05, rtol=1e-6)
