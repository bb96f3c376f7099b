"""The Celo2 recipe as config files (configs/celo2*.py): they state the paper's recipe,
build, fail cleanly without data, start from a given theta, freeze theta leaves by path,
and give the same meta-gradient on 1 and 8 devices."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spmd_lopt import checkpoints
from spmd_lopt import config as config_lib
from spmd_lopt import sharding
from spmd_lopt.learned_optimizers import celo2
from spmd_lopt.outer_trainers import common as trainers_common
from spmd_lopt.tasks import registry

import fake_data
from helpers import max_rel_err

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {n: os.path.join(ROOT, "configs", f"{n}.py")
           for n in ("celo2", "celo2_base", "celo2_digits")}
# Small enough to compile in seconds; the recipe's structure (four estimators, Celo2,
# global reparametrisation, AdamW) is unchanged.
TINY = [(f"estimators.{i}.{k}", v) for i in range(4) for k, v in (
    ("num_tasks", "8"), ("trunc_length", "2"), ("truncation.min_length", "4"),
    ("truncation.max_length", "8"), ("random_initial_iteration_offset", "8"))]


def _load(name, overrides=()):
  return config_lib.resolve(config_lib.load(CONFIGS[name], list(overrides)))


def _write_paper_data(data_dir):
  fake_data.write_mnist_like(data_dir, "mnist")
  fake_data.write_mnist_like(data_dir, "fashion_mnist", seed=1)
  fake_data.write_cifar10(data_dir)
  fake_data.write_svhn(data_dir)


def _one_line_value_error(fn, *match):
  with pytest.raises(ValueError) as e:
    fn()
  msg = str(e.value)
  assert "\n" not in msg, msg
  for m in match:
    assert m in msg, msg


# --- what the files say ---------------------------------------------------------------

def test_celo2_config_is_the_papers_recipe():
  c = _load("celo2")
  assert c["outer_steps"] == 100_000 and c["checkpoint_every"] == 5_000
  assert c["lopt"]["name"] == "celo2" and c["lopt"]["step_mult"] == 1e-3
  assert c["lopt"]["regex_1d"] == "/b$"
  oo = c["outer_opt"]
  assert (oo["name"], oo["learning_rate"], oo["weight_decay"]) == ("adamw", 5e-5, 1e-4)
  assert (oo["b1"], oo["b2"], oo["eps"], oo["schedule"]["name"]) == (0.9, 0.999, 1e-8,
                                                                       "constant")
  assert oo["clip_value"] == 0 and oo["clip_global_norm"] == 0
  assert [e["task"] for e in c["estimators"]] == list(registry.get_task_set("celo2"))
  for e in c["estimators"]:
    assert (e["name"], e["num_tasks"], e["trunc_length"], e["std"]) == ("pes", 8, 50, 0.01)
    assert e["truncation"] == dict(name="log_uniform", min_length=100, max_length=2000)
    assert e["random_initial_iteration_offset"] == 2000
    assert e["augmentation"]["name"] == "reparam_global"
    assert tuple(e["augmentation"]["param_scale_range"]) == (1e-3, 1e3)


def test_base_and_digits_configs_differ_from_celo2_only_where_they_should():
  paper, base, digits = _load("celo2"), _load("celo2_base"), _load("celo2_digits")
  assert base["lopt"].pop("name") == "celo2_base" and paper["lopt"].pop("name") == "celo2"
  assert base["outer_opt"].pop("learning_rate") == 1e-4
  paper_lr = paper["outer_opt"].pop("learning_rate")
  assert {k: v for k, v in base.items() if k != "name"} == {
      k: v for k, v in paper.items() if k != "name"}
  assert [e.pop("task") for e in digits["estimators"]] == list(
      registry.get_task_set("celo2_digits"))
  for e in paper["estimators"]:
    e.pop("task")
  paper["outer_opt"]["learning_rate"], paper["lopt"]["name"] = paper_lr, "celo2"
  assert {k: v for k, v in digits.items() if k != "name"} == {
      k: v for k, v in paper.items() if k != "name"}


# --- building -------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["celo2", "celo2_base"])
def test_paper_configs_build_on_data_files(name, tmp_path, devices):
  _write_paper_data(str(tmp_path))
  cfg = config_lib.load(CONFIGS[name], [("data_dir", str(tmp_path))])
  learner, state = config_lib.abstract_learner_state(
      cfg, mesh=sharding.make_mesh(num_devices=8))
  want = {"celo2": "Celo2", "celo2_base": "Celo2Base"}[name]
  assert type(learner.meta_init).__name__ == want
  theta = learner.get_meta_params(state)
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(theta)) == 347
  assert len(state.gradient_estimator_states) == 4


def test_offline_config_builds_with_nothing_downloaded(tmp_path, devices):
  cfg = config_lib.load(CONFIGS["celo2_digits"], [("data_dir", str(tmp_path))])
  _, state = config_lib.abstract_learner_state(cfg, mesh=sharding.make_mesh(num_devices=8))
  assert len(state.gradient_estimator_states) == 4
  assert os.listdir(tmp_path) == []


def test_missing_paper_data_is_one_line_naming_files_and_url(tmp_path):
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
  workdir = tmp_path / "run"
  proc = subprocess.run(
      [sys.executable, "-m", "spmd_lopt.launch", "--config", CONFIGS["celo2"],
       f"--config.data_dir={tmp_path}", f"--workdir={workdir}"],
      capture_output=True, text=True, env=env, timeout=300, check=False)
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = [l for l in proc.stderr.splitlines() if l.startswith("spmd_lopt: error:")]
  assert len(lines) == 1, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  for part in ("not found", "data_batch_1", str(tmp_path), "https://"):
    assert part in lines[0], lines[0]
  assert not workdir.exists()


# --- starting from a theta, freezing ---------------------------------------------------

def _released_like_theta(tmp_path):
  """A Celo2 theta unlike a fresh init, written in the authors' released layout."""
  theta = celo2.Celo2().init(jax.random.key(7))
  theta = jax.tree.map(lambda t: t + 0.25, theta)
  path = str(tmp_path / "theta.state")
  celo2.save_released_weights(path, theta)
  return theta, path


@pytest.mark.parametrize("prefix", ["celo2", "celo2_base"])
def test_init_from_starts_the_learner_from_the_given_theta(prefix, tmp_path, devices):
  theta, path = _released_like_theta(tmp_path)
  cfg = config_lib.load(CONFIGS["celo2_digits"],
                        [("lopt.init_from", f"{prefix}={path}")] + TINY)
  learner = config_lib.make_learner(cfg, mesh=sharding.make_mesh(num_devices=8))
  for seed in (0, 1):
    got = learner.meta_init.init(jax.random.key(seed))
    jax.tree.map(np.testing.assert_array_equal, got, theta)
  bad = tmp_path / "not_celo2.state"
  bad.write_bytes(b"\x80")
  cfg = config_lib.load(CONFIGS["celo2_digits"], [("lopt.init_from", f"celo2={bad}")])
  _one_line_value_error(lambda: config_lib.make_learner(cfg), "not_celo2.state")


def test_frozen_celo2_theta_paths_get_no_update(devices):
  frozen = "ff_mod_stack/~/w0__.*"
  cfg = config_lib.load(CONFIGS["celo2_digits"], [("frozen", frozen)] + TINY)
  learner = config_lib.make_learner(cfg, mesh=sharding.make_mesh(num_devices=8))
  theta = learner.meta_init.init(jax.random.key(0))
  grads = jax.tree.map(jnp.ones_like, theta)
  opt = learner.theta_opt
  new = opt.get_params(opt.update(opt.init(theta), grads))
  moved = {k: bool(jnp.any(new["ff_mod_stack"]["~"][k] != v))
           for k, v in theta["ff_mod_stack"]["~"].items()}
  assert moved == {k: not k.startswith("w0__") for k in moved}, moved
  assert sum(k.startswith("w0__") for k in moved) == 14
  cfg = config_lib.load(CONFIGS["celo2_digits"], [("frozen", "ff_mod_stack/~/w9")])
  _one_line_value_error(lambda: config_lib.make_learner(cfg), "config.frozen")


# --- checkpoints ----------------------------------------------------------------------

class _StateOnly:
  """The two methods of a learner the checkpointer uses to lay out a restored state."""

  def __init__(self, state, mesh):
    self._state = state
    self._sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def abstract_state(self):
    return jax.eval_shape(lambda: self._state)

  def state_shardings(self):
    return jax.tree.map(lambda _: self._sharding, self._state)


def test_celo2_states_with_empty_factored_moments_checkpoint_and_restore(tmp_path, devices):
  """Celo2 keeps zero-size factored moments for 1-D parameters (orbax refuses to write
  zero-size arrays): they are left out of the files and come back empty."""
  params = {"w": jnp.ones((3, 4)), "b": jnp.arange(4.0)}
  acc = celo2.accumulators_init(params)
  empty = [x for x in jax.tree.leaves(acc) if x.size == 0]
  assert empty, "the test needs a state with zero-size leaves"
  mesh = sharding.make_mesh(num_devices=8)
  state = jax.device_put({"acc": acc, "step": jnp.int32(5)},
                         jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  state = jax.tree.map(lambda x: x + 1 if x.dtype == jnp.float32 else x, state)
  ckpt = checkpoints.Checkpointer(str(tmp_path / "ckpt"), async_save=False)
  ckpt.save(5, state, {"config": {"name": "t"}})
  ckpt.wait()
  got, meta = ckpt.restore_latest(_StateOnly(state, mesh), config={"name": "t"})
  assert meta["step"] == 5
  assert jax.tree.structure(got) == jax.tree.structure(state)
  jax.tree.map(np.testing.assert_array_equal, got, state)
  ckpt.close()


# --- the fused step -------------------------------------------------------------------

def test_resetting_tasks_keeps_empty_factored_moments_per_task(devices):
  """The fused step re-initialises finished tasks with ``select_per_task(reset, fresh,
  trained)`` inside a ``lax.cond`` under ``shard_map``; Celo2's empty factored moments (1-D
  parameters) must keep the per-task (varying) type there, or the step does not trace."""
  mesh = sharding.make_mesh(num_devices=8)
  spec = jax.sharding.PartitionSpec(sharding.DEFAULT_AXIS)

  def local(reset, trained):
    fresh = {"empty": jnp.zeros(trained["empty"].shape), "full": jnp.zeros_like(trained["full"])}
    picked = lambda: trainers_common.select_per_task(reset, fresh, trained)
    return jax.lax.cond(jnp.any(reset), picked, lambda: trained)

  fn = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(spec, spec), out_specs=spec))
  reset = np.arange(16) % 3 == 0
  trained = {"empty": np.ones((16, 0, 3), np.float32), "full": np.ones((16, 4), np.float32)}
  put = lambda x: jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))
  out = fn(put(reset), jax.tree.map(put, trained))
  assert out["empty"].shape == (16, 0, 3)
  np.testing.assert_array_equal(out["full"][:, 0], np.where(reset, 0.0, 1.0))


def _meta_gradients_on_1_and_8_devices(cfg):
  results = {}
  for n in (1, 8):
    learner = config_lib.make_learner(cfg, mesh=sharding.make_mesh(num_devices=n))
    state = learner.init(jax.random.key(0))
    results[n] = jax.device_get(learner.meta_gradient(state, jax.random.key(1)))
  (g1, l1), (g8, l8) = results[1], results[8]
  assert np.isfinite(l1) and all(np.all(np.isfinite(x)) for x in jax.tree.leaves(g1))
  assert np.linalg.norm(np.concatenate([np.ravel(x) for x in jax.tree.leaves(g1)])) > 0
  assert max_rel_err(g8, g1) < 1e-4
  assert abs(l8 - l1) <= 1e-5 * abs(l1)


# Compiling Celo2's inner step under PES is the cost: 7 min wall (loaded, 1.7 min CPU) for
# the four estimators on two meshes, 3 min for one estimator alone, so it runs with -m slow.
@pytest.mark.slow
def test_recipe_meta_gradient_is_the_same_on_1_and_8_devices(devices):
  _meta_gradients_on_1_and_8_devices(config_lib.load(CONFIGS["celo2_digits"], TINY))


# --- the meta2 ablations (configs/celo2_digits_mix.py, celo2_digits_longtraj.py) --------

def _ablation(name):
  path = os.path.join(ROOT, "configs", f"{name}.py")
  return config_lib.resolve(config_lib.load(path, []))


def test_ablation_configs_change_only_what_they_name_from_the_shipped_recipe():
  parent = config_lib.resolve(config_lib.load(
      os.path.join(ROOT, "configs", "celo2_digits_long.py"), []))
  mix, longtraj = _ablation("celo2_digits_mix"), _ablation("celo2_digits_longtraj")
  tensor = _ablation("celo2_digits_tensor")
  for cfg in (mix, longtraj, tensor):
    assert cfg["lopt"] == dict(parent["lopt"], init_from="pretrained:celo2_digits")
    assert cfg["outer_opt"] == parent["outer_opt"]
  # long / short: other lengths and offsets (the paper's; the suite's horizon), same tasks.
  shorttraj = _ablation("celo2_digits_shorttraj")
  assert shorttraj["lopt"] == longtraj["lopt"] and shorttraj["outer_opt"] == parent["outer_opt"]
  for cfg, length in ((longtraj, 2000), (shorttraj, 300)):
    for e, p in zip(cfg["estimators"], parent["estimators"]):
      assert e["truncation"]["max_length"] == length
      assert e["random_initial_iteration_offset"] == length
      assert dict(e, truncation=p["truncation"], random_initial_iteration_offset=1000) == p
  # tensor: one scale per parameter tensor, nothing else changed.
  for e, p in zip(tensor["estimators"], parent["estimators"]):
    assert e["augmentation"]["name"] == "reparam_tensor"
    assert dict(e, augmentation=p["augmentation"]) == p
  # mix: only MLP classifiers on the digits, none of the suite's held-out kinds.
  tasks = [e["task"] for e in mix["estimators"]]
  assert len(tasks) == 4 and all(t.startswith(("ImageMLP_Digits8", "ParametricImageMLP_Digits8"))
                                 for t in tasks)
  for e, p in zip(mix["estimators"], parent["estimators"]):
    assert dict(e, task=p["task"], task_kwargs=p["task_kwargs"]) == p


def test_mix_config_builds_its_parametric_families(tmp_path, devices):
  cfg = config_lib.load(os.path.join(ROOT, "configs", "celo2_digits_mix.py"),
                        [("data_dir", str(tmp_path))] + TINY)
  learner, state = config_lib.abstract_learner_state(
      cfg, mesh=sharding.make_mesh(num_devices=8))
  assert len(state.gradient_estimator_states) == 4
  fams = [e.truncated_step.task_family for e in learner.gradient_estimators]
  archs = [getattr(getattr(f, "task_family", f), "architectures", None) for f in fams]
  assert archs[2:] == [((64, 32),), ((32, 32, 32),)]
