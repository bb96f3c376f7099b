"""The learned optimizers shipped as package data (``spmd_lopt/pretrained/*.lopt``)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from spmd_lopt import config
from spmd_lopt.learned_optimizers import as_optax, checkpoint, registry, resolve, specs
from spmd_lopt.tasks import registry as task_registry

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = specs.pretrained_names()


def test_at_least_one_optimizer_is_shipped():
  assert NAMES, f"no .lopt file in {specs.PRETRAINED_DIR}"


@pytest.mark.parametrize("name", NAMES)
def test_pretrained_loads_and_matches_its_metadata(name):
  lopt, theta = resolve(f"pretrained:{name}")
  ckpt = checkpoint.load_parameter_checkpoint(
      os.path.join(specs.PRETRAINED_DIR, name + ".lopt"))
  extra = ckpt.extra
  assert extra["name"] == name
  assert int(extra["outer_steps"]) > 0 and float(extra["train_time_s"]) > 0
  json.dumps(extra, allow_nan=False)  # strict JSON metadata
  # the config file named in the metadata reproduces this optimizer
  cfg_file = extra["reproduce"].split("--config ")[1].split()[0]
  cfg = config.load(os.path.join(REPO, cfg_file), [])
  full = config.resolve(cfg)
  assert full["lopt"]["name"] == registry.name_of(type(lopt))
  assert int(cfg.outer_steps) == int(extra["outer_steps"])
  for k, v in lopt.config.items():
    if k in full["lopt"]:
      assert full["lopt"][k] == v, k
  assert extra["config"]["lopt"]["name"] == full["lopt"]["name"]
  parent = extra["config"]["lopt"].get("init_from", "")
  if parent.startswith("pretrained:"):  # a continued run: totals include its parent's
    assert cfg.lopt.init_from == parent and extra["init_from"] == parent
    up = checkpoint.load_parameter_checkpoint(os.path.join(
        specs.PRETRAINED_DIR, parent[len("pretrained:"):] + ".lopt")).extra
    assert extra["outer_steps_total"] == extra["outer_steps"] + up.get(
        "outer_steps_total", up["outer_steps"])
    assert extra["train_time_s_total"] > float(up["train_time_s"])
  same = jax.tree.map(lambda a, b: bool(jnp.all(a == b)), theta, ckpt.theta)
  assert all(jax.tree.leaves(same))


@pytest.mark.parametrize("name", NAMES)
def test_pretrained_trains_a_digits_mlp_in_optax(name):
  task = task_registry.get_task("ImageMLP_Digits8_Relu32_B64")
  key = jax.random.key(0)
  params = task.init(key)
  tx = as_optax(f"pretrained:{name}", num_steps=50)
  state = tx.init(params)

  @jax.jit
  def step(params, state, k):
    batch = task.sample_batch(k, "train")
    loss, grads = jax.value_and_grad(task.loss)(params, k, batch)
    updates, state = tx.update(grads, state, params, loss=loss)
    return optax.apply_updates(params, updates), state, loss

  losses = []
  for i in range(50):
    params, state, loss = step(params, state, jax.random.fold_in(key, i))
    losses.append(float(loss))
  assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10


def test_a_later_suite_is_attached_without_touching_theta(tmp_path):
  """``ship_pretrained.py --add_suite_as KEY``: the shipped file gains ``extra[KEY]`` (the
  suite's aggregate rows of the label, of ``label+lr`` and ``label+lr+wd``); theta and the
  rest stay."""
  import importlib.util
  spec = importlib.util.spec_from_file_location(
      "ship_pretrained", os.path.join(REPO, "scripts", "ship_pretrained.py"))
  ship = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(ship)
  name = NAMES[0]
  src = checkpoint.load_parameter_checkpoint(os.path.join(specs.PRETRAINED_DIR, name + ".lopt"))
  checkpoint.save_parameter_checkpoint(str(tmp_path / f"{name}.lopt"), src.lopt, src.theta,
                                       extra=src.extra)
  row = {"all": {"loss_ratio": {"iqm": 0.9}, "speedup": {"iqm": 1.1}}}
  row_wd = {"all": {"loss_ratio": {"iqm": 0.8}, "speedup": {"iqm": 1.2}}}
  suite = {"suite": "full", "tasks": {"b": {}, "a": {}},
           "aggregates": {"x": row, "x+lr": row, "x+lr+wd": row_wd, "Adam": row}}
  (tmp_path / "suite.json").write_text(json.dumps(suite))
  ship.add_suite(name, str(tmp_path / "suite.json"), "suite_later", "x", str(tmp_path))
  got = checkpoint.load_parameter_checkpoint(str(tmp_path / f"{name}.lopt"))
  assert got.extra["suite_later"] == {"suite": "full", "label": "x", "aggregates": row,
                                      "tasks": ["a", "b"], "aggregates_lr_tuned": row,
                                      "aggregates_lr_wd_tuned": row_wd}
  assert {k: v for k, v in got.extra.items() if k != "suite_later"} == src.extra
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)),
                                   src.theta, got.theta))


def test_optax_chain_in_the_readme_is_the_suites_tuned_point():
  """``chain(as_optax(spec), scale(m), add_decayed_weights(-m wd step_mult))`` (README,
  *Results*) takes the steps of the suite's ``+lr+wd`` point ``(m, wd)``."""
  from spmd_lopt.evaluation import lr_scaled  # pylint: disable=import-outside-toplevel
  name = NAMES[0]
  lopt, theta = resolve(f"pretrained:{name}")
  m, wd = 3.0, 0.5
  tx = optax.chain(as_optax(f"pretrained:{name}"), optax.scale(m),
                   optax.add_decayed_weights(-m * wd * lopt.step_mult))
  ref = lr_scaled.ScaledUpdateOptimizer(lopt.opt_fn(theta, is_training=False), m,
                                        wd * lopt.step_mult)
  params = {"w": jax.random.normal(jax.random.key(0), (8, 4)), "b": jnp.ones(4)}
  p, st, rs = params, tx.init(params), ref.init(params)
  for i in range(3):
    u, st = tx.update(jax.tree.map(lambda x, i=i: jnp.sin(x * (i + 1)), p), st, p)
    p = optax.apply_updates(p, u)
    rs = ref.update(rs, jax.tree.map(lambda x, i=i: jnp.sin(x * (i + 1)), ref.get_params(rs)))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), p, ref.get_params(rs))
  assert not np.allclose(p["w"], params["w"])
