"""The config format: both forms, every section, overrides, one-line errors, the outer
optimizer built from config (schedules, clipping, weight decay, the ``frozen`` mask)."""

import copy
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spmd_lopt import config as config_lib
from spmd_lopt import sharding
from spmd_lopt import tree_utils
from spmd_lopt.config import builders, loading, outer_opt, schema
from spmd_lopt.learned_optimizers import registry
from spmd_lopt.outer_trainers import (full_es, full_grad, truncated_grad, truncated_nres,
                                      truncated_pes)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small(**over):
  """A cheap full-form config: one estimator of 8 tasks on 2-d quadratics."""
  c = dict(name="t", outer_steps=4, log_every=2, lopt=dict(name="learnable_adam"),
           estimators=[dict(task="quadratic", task_kwargs=dict(dim=2), num_tasks=8,
                            trunc_length=2, truncation=dict(name="log_uniform",
                                                            min_length=4, max_length=8),
                            random_initial_iteration_offset=4)])
  c.update(over)
  return c


def one_line_error(fn, *match):
  with pytest.raises(ValueError) as e:
    fn()
  msg = str(e.value)
  assert "\n" not in msg and "\\n" not in msg, msg
  for m in match:
    assert m in msg, msg
  return msg


# --- the two forms --------------------------------------------------------------------

def test_short_and_full_form_of_the_default_job_are_the_same_config():
  full = config_lib.load(os.path.join(ROOT, "configs", "pes_quadratic_digits.py"))
  flat = config_lib.load()  # the packaged short-form default
  a, b = builders.resolve(full, fill_defaults=True), builders.resolve(flat, fill_defaults=True)
  assert a.pop("name") == "pes_quadratic_digits" and b.pop("name") == "default"
  assert a == b
  assert not schema.is_nested(flat) and schema.is_nested(full)


def test_short_form_keys_map_onto_sections():
  flat = config_lib.validate(dict(tasks="quadratic,noisy_quadratic", quadratic_dim=3,
                                  num_tasks=16, estimator="nres", truncation="constant",
                                  max_length=40, lopt="adafac_mlp_lopt", lopt_hidden_size=7,
                                  outer_lr=3e-4, outer_grad_clip=0.5, std=0.2))
  full = builders.resolve(flat)
  assert [e["task"] for e in full["estimators"]] == ["quadratic", "noisy_quadratic"]
  e0 = full["estimators"][0]
  assert (e0["name"], e0["num_tasks"], e0["std"]) == ("nres", 16, 0.2)
  assert e0["task_kwargs"] == {"dim": 3} and full["estimators"][1]["task_kwargs"] == {}
  assert e0["truncation"] == {"name": "constant", "total_length": 40}
  # adafac keeps its own defaults for lopt_* keys left at the short form's defaults
  assert full["lopt"] == {"name": "adafac_mlp_lopt", "hidden_size": 7}
  assert full["outer_opt"]["learning_rate"] == 3e-4
  assert full["outer_opt"]["clip_value"] == 0.5


@pytest.mark.parametrize("name", registry.names())
def test_every_registered_learned_optimizer_is_reachable(name):
  lopt = config_lib.make_lopt(small(lopt=dict(name=name)))
  assert registry.name_of(type(lopt)) == name
  if "step_mult" in config_lib.checks.signature_defaults(type(lopt)):
    assert config_lib.make_lopt(small(lopt=dict(name=name, step_mult=0.5))).step_mult == 0.5


@pytest.mark.parametrize("name,cls,opts", [
    ("pes", truncated_pes.TruncatedPES, {"stack_antithetic_samples": False}),
    ("nres", truncated_nres.TruncatedNRES, {"clip_nan_loss_to_value": 5.0}),
    ("full_es", full_es.FullES, {"loss_type": "min"}),
    ("truncated_grad", truncated_grad.TruncatedGrad, {"use_remat": True}),
    ("full_grad", full_grad.FullGrad, {"use_remat": False}),
])
def test_every_estimator_is_reachable_with_its_options(name, cls, opts):
  cfg = small()
  cfg["estimators"][0].update(name=name, options=opts, std=0.05)
  fam = config_lib.make_task_family("quadratic", cfg)
  est = config_lib.make_estimator(fam, config_lib.make_lopt(cfg), cfg)
  assert isinstance(est, cls) and est.num_tasks == 8
  for k, v in opts.items():
    assert getattr(est, k) == v
  if hasattr(est, "std"):
    assert est.std == 0.05


def test_two_estimators_with_their_own_tasks_build_one_learner():
  cfg = small()
  cfg["estimators"].append(dict(name="truncated_grad", task="ImageMLP_Digits8_Relu32",
                                task_kwargs=dict(batch_size=16), num_tasks=16,
                                trunc_length=3, truncation=dict(name="constant",
                                                                total_length=6)))
  learner, state = config_lib.abstract_learner_state(
      cfg, mesh=sharding.make_mesh(num_devices=8))
  assert [e.num_tasks for e in learner.gradient_estimators] == [8, 16]
  assert learner.gradient_estimators[1].unroll_length == 3
  assert learner.metric_names[1].startswith("ImageMLP_Digits8_Relu32")
  assert len(jax.tree.leaves(state)) > 0


def test_parametric_mlp_architectures_and_activations_come_from_the_config():
  # Its hidden sizes are a list of lists and its activations a list of names: both must
  # pass the kwargs check (it once accepted only lists of numbers) and reach the family.
  cfg = small()
  cfg["estimators"][0].update(task="ParametricImageMLP_Digits8", task_kwargs=dict(
      architectures=[[8, 4]], activations=["tanh", "elu"]))
  family = builders.make_task_family_from_entry("e", builders.resolve(cfg)["estimators"][0])
  assert family.architectures == ((8, 4),)
  assert family.activation_names == ("tanh", "elu")
  for kwargs, expect in ((dict(architectures=[8, 4]), "architectures[0]"),
                         (dict(architectures=[[8, "x"]]), "architectures[0][1]"),
                         (dict(activations=[1]), "activations[0]")):
    cfg["estimators"][0]["task_kwargs"] = kwargs
    one_line_error(lambda: builders.make_task_family_from_entry(
        "e", builders.resolve(cfg)["estimators"][0]), expect)


# --- one-line errors ------------------------------------------------------------------

@pytest.mark.parametrize("where,key,expect", [
    ((), "outer_stpes", "config.outer_stpes"),
    (("lopt",), "hiden_size", "Did you mean 'hidden_size'"),
    (("outer_opt",), "weight_decya", "Did you mean 'weight_decay'"),
    (("estimators", 0), "num_task", "Did you mean 'num_tasks'"),
    (("estimators", 0, "options"), "stack_antithetic", "stack_antithetic_samples"),
    (("estimators", 0, "truncation"), "max_lenght", "Did you mean 'max_length'"),
    (("estimators", 0, "task_kwargs"), "dimm", "Did you mean 'dim'"),
    (("outer_opt", "schedule"), "alpah", "alpah"),
])
def test_a_misspelled_key_in_any_section_is_one_line_naming_it(where, key, expect):
  cfg = small(lopt=dict(name="mlp_lopt"))
  cfg["outer_opt"] = dict(name="adam", schedule=dict(name="cosine"))
  node = cfg
  for w in where:
    node = node[w] if isinstance(w, int) else node.setdefault(w, {})
  node[key] = 1
  msg = one_line_error(lambda: builders.resolve(cfg), key, expect)
  assert "Unknown config key" in msg


@pytest.mark.parametrize("path,value,expect", [
    (("estimators", 0, "num_tasks"), 0, "config.estimators.0.num_tasks"),
    (("estimators", 0, "std"), float("nan"), "config.estimators.0.std"),
    (("estimators", 0, "name"), "pess", "Did you mean 'pes'"),
    (("estimators", 0, "truncation", "min_length"), 100, "min_length"),
    (("outer_opt", "name"), "adamww", "Did you mean 'adamw'"),
    (("outer_opt", "weight_decay"), 0.1, "only used by adamw"),
    (("outer_opt", "b1"), 1.5, "config.outer_opt.b1"),
    (("lopt", "name"), "mlp_lop", "Did you mean 'mlp_lopt'"),
    (("lopt", "initial_lr"), "big", "config.lopt.initial_lr"),
    (("outer_steps",), 2.5, "config.outer_steps"),
    (("steps_per_call",), 3, "multiple of config.steps_per_call"),
    (("estimators",), [], "config.estimators"),
])
def test_bad_values_are_one_line_naming_the_key(path, value, expect):
  cfg = small()
  cfg["outer_opt"] = dict(name="adam")
  node = cfg
  for p in path[:-1]:
    node = node[p]
  node[path[-1]] = value
  one_line_error(lambda: config_lib.abstract_learner_state(
      cfg, mesh=sharding.make_mesh(num_devices=8)), expect)


def test_mixing_the_forms_is_refused():
  one_line_error(lambda: builders.resolve(small(num_tasks=8)), "num_tasks", "mixes")


# --- overrides ------------------------------------------------------------------------

def test_overrides_reach_list_entries_and_sections_with_the_right_types():
  plain = small()
  for key, raw in [("estimators.0.num_tasks", "16"), ("estimators[0].std", "0.5"),
                   ("estimators.0.options.stack_antithetic_samples", "false"),
                   ("estimators.0.truncation.max_length", "9"), ("lopt.initial_lr", "0.01"),
                   ("outer_opt.schedule.name", "warmup_cosine"),
                   ("outer_opt.schedule.warmup_steps", "2"), ("frozen", "beta"),
                   ("estimators.0.augmentation.param_scale_range", "[0.1, 10]")]:
    loading.apply_override(plain, key, raw)
  e = plain["estimators"][0]
  assert e["num_tasks"] == 16 and isinstance(e["num_tasks"], int)
  assert e["std"] == 0.5 and e["options"]["stack_antithetic_samples"] is False
  assert e["truncation"]["max_length"] == 9 and plain["lopt"]["initial_lr"] == 0.01
  assert plain["outer_opt"]["schedule"] == {"name": "warmup_cosine", "warmup_steps": 2}
  assert plain["frozen"] == "beta" and e["augmentation"]["param_scale_range"] == [0.1, 10]
  one_line_error(lambda: loading.apply_override(plain, "estimators.0.num_tasks", "1e3"),
                 "config.estimators.0.num_tasks must be an integer")
  one_line_error(lambda: loading.apply_override(plain, "estimators.1.std", "1"),
                 "list of 1")
  one_line_error(lambda: loading.apply_override(plain, "estimators.0.stdd", "1"),
                 "Did you mean 'std'")


def test_a_full_form_override_of_a_short_form_file_converts_it(tmp_path):
  path = os.path.join(ROOT, "configs", "pes_quadratic.py")
  cfg = config_lib.load(path, [("estimators.0.num_tasks", "8"), ("lopt.hidden_size", "4"),
                               ("num_devices", "1")])
  assert cfg.estimators[0]["num_tasks"] == 8 and cfg.lopt.hidden_size == 4
  assert cfg.name == "pes_quadratic" and cfg.num_devices == 1
  flat = config_lib.load(path, [("num_tasks", "8")])
  assert flat.num_tasks == 8 and flat.tasks == "quadratic"
  assert loading.split_args(["x", "--config.a=1", "--config.b", "2", "--w=3"]) == (
      ["x", "--w=3"], [("a", "1"), ("b", "2")])


def _launch(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  return subprocess.run([sys.executable, "-m", "spmd_lopt.launch", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=120)


def test_cli_errors_are_one_clean_line_and_print_config_shows_every_key(tmp_path):
  for args, expect in [(["--config", "does_not_exist.py"], "does_not_exist.py"),
                       (["--config.num_task=8"], "Did you mean 'num_tasks'")]:
    proc = _launch(*args, f"--workdir={tmp_path}/w")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0] and "\\n" not in lines[0], proc.stderr
  proc = _launch("--config", "configs/pes_quadratic_digits.py", "--print_config",
                 "--config.estimators.1.num_tasks=16", f"--workdir={tmp_path}/w")
  assert proc.returncode == 0, proc.stderr
  assert "num_tasks: 16" in proc.stdout and "stack_antithetic_samples: true" in proc.stdout
  assert "clip_global_norm" in proc.stdout and not (tmp_path / "w").exists()


# --- the outer optimizer --------------------------------------------------------------

def _step(sec, params, grads, frozen="", steps=1, outer_steps=100):
  opt = outer_opt.make_outer_optimizer(sec, outer_steps, frozen, theta=params)

  @jax.jit
  def run(params, grads):
    state = jax.lax.fori_loop(0, steps, lambda _, s: opt.update(s, grads), opt.init(params))
    return opt.get_params(state)

  return run(params, grads)


def test_schedules_set_the_step_size_at_each_outer_step():
  p, g = {"w": jnp.zeros(())}, {"w": jnp.ones(())}
  lrs = {}
  for sched in (dict(name="constant"), dict(name="cosine"),
                dict(name="warmup_cosine", warmup_steps=10),
                dict(name="linear", end_value=0.0)):
    sec = dict(name="sgd", learning_rate=0.1, schedule=sched)
    # with SGD and gradient 1, the total movement is the sum of the step sizes
    lrs[sched["name"]] = [float(-_step(sec, p, g, steps=s)["w"]) for s in (1, 10, 50)]
  np.testing.assert_allclose(lrs["constant"], [0.1, 1.0, 5.0], rtol=1e-5)
  c = [0.1 * 0.5 * (1 + np.cos(np.pi * t / 100)) for t in range(50)]
  np.testing.assert_allclose(lrs["cosine"], [c[0], sum(c[:10]), sum(c)], rtol=1e-4)
  assert lrs["warmup_cosine"][0] == 0.0 and 0 < lrs["warmup_cosine"][1] < 0.5
  lin = [0.1 * (1 - t / 100) for t in range(50)]
  np.testing.assert_allclose(lrs["linear"], [lin[0], sum(lin[:10]), sum(lin)], rtol=1e-4)


def test_clipping_and_weight_decay():
  p = {"a": jnp.ones(3), "b": jnp.zeros(4)}
  g = {"a": jnp.full(3, 10.0), "b": jnp.full(4, -10.0)}
  by_value = _step(dict(name="sgd", learning_rate=1.0, clip_value=0.5), p, g)
  np.testing.assert_allclose(by_value["a"], 0.5) and np.testing.assert_allclose(
      by_value["b"], 0.5)
  by_norm = _step(dict(name="sgd", learning_rate=1.0, clip_global_norm=2.0), p, g)
  moved = np.sqrt(sum(float(jnp.sum((by_norm[k] - p[k]) ** 2)) for k in p))
  np.testing.assert_allclose(moved, 2.0, rtol=1e-5)
  zero = jax.tree.map(jnp.zeros_like, p)
  decayed = _step(dict(name="adamw", learning_rate=0.1, weight_decay=0.5), p, zero)
  np.testing.assert_allclose(decayed["a"], 1 - 0.1 * 0.5, rtol=1e-6)


def test_frozen_theta_leaves_do_not_move_and_the_others_do():
  # laid out as MLPLOpt's theta (flax params), without paying for its init
  theta = {"params": {f"Dense_{i}": {"kernel": jnp.full((3, 4), 0.1 * i),
                                     "bias": jnp.zeros(4)} for i in range(3)}}
  paths = outer_opt.theta_paths(theta)
  frozen = "Dense_0"
  assert any(frozen in p for p in paths) and not all(frozen in p for p in paths)
  grads = jax.tree.map(lambda t: jnp.ones_like(t) * 0.3, theta)
  for sec in (dict(name="adam", learning_rate=0.1), dict(
      name="adamw", learning_rate=0.1, weight_decay=0.1, clip_global_norm=0.01)):
    new = _step(sec, theta, grads, frozen=frozen, steps=3)
    flat_old = jax.tree_util.tree_flatten_with_path(theta)[0]
    flat_new = jax.tree.leaves(new)
    for (path, old), nw in zip(flat_old, flat_new):
      moved = float(jnp.max(jnp.abs(nw - old)))
      if frozen in tree_utils.path_str(path):
        assert moved == 0.0, path
      else:
        assert moved > 0.0, path
  one_line_error(lambda: _step(dict(name="adam"), theta, grads, frozen="nothing_here"),
                 "config.frozen", "matches no theta leaf")
  one_line_error(lambda: _step(dict(name="adam"), theta, grads, frozen="(["),
                 "config.frozen")


def test_frozen_reaches_the_learner_from_the_config():
  cfg = small(lopt=dict(name="learnable_adam"), frozen="log_epsilon|one_minus")
  learner = config_lib.make_learner(cfg, mesh=sharding.make_mesh(num_devices=8))
  theta = learner.meta_init.init(jax.random.key(0))
  grads = jax.tree.map(jnp.ones_like, theta)
  new = learner.theta_opt.get_params(learner.theta_opt.update(
      learner.theta_opt.init(theta), grads))
  moved = {k: bool(jnp.any(new[k] != theta[k])) for k in theta}
  assert moved == {k: not ("log_epsilon" in k or "one_minus" in k) for k in theta}, moved


# --- starting from a theta, augmentation ---------------------------------------------

def test_init_from_is_resolved_lazily_and_checked(monkeypatch):
  import spmd_lopt.learned_optimizers as lopts  # pylint: disable=import-outside-toplevel
  cfg = small(lopt=dict(name="learnable_sgd"))
  base = config_lib.make_lopt(cfg).init(jax.random.key(0))
  calls = []

  def fake_resolve(spec):
    calls.append(spec)
    return jax.tree.map(lambda t: t + 1.0, base) if spec == "good" else {"x": jnp.ones(2)}

  monkeypatch.setattr(lopts, "resolve", fake_resolve, raising=False)
  config_lib.make_lopt(cfg)
  assert calls == []  # not set: never called
  cfg["lopt"]["init_from"] = "good"
  lopt = config_lib.make_lopt(cfg)
  got = lopt.init(jax.random.key(3))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b + 1.0), got, base)
  cfg["lopt"]["init_from"] = "bad"
  one_line_error(lambda: config_lib.make_lopt(cfg), "config.lopt.init_from", "'bad'")


def test_augmentation_section_is_checked_before_use():
  cfg = small()
  cfg["estimators"][0]["augmentation"] = dict(name="reparam_globl")
  one_line_error(lambda: config_lib.make_learner(cfg), "Did you mean 'reparam_global'")
  cfg["estimators"][0]["augmentation"] = dict(name="reparam_global",
                                              param_scale_range=[10.0, 1.0])
  one_line_error(lambda: config_lib.make_learner(cfg), "param_scale_range[1]")
  cfg["estimators"][0]["augmentation"] = dict(name="reparam_tensor",
                                              param_scale_range=[1e-3, 1e3])
  try:
    from spmd_lopt.tasks import augmentation  # noqa: F401  pylint: disable=import-outside-toplevel
  except ImportError:
    one_line_error(lambda: config_lib.make_learner(cfg), "spmd_lopt.tasks.augmentation")
  else:
    learner = config_lib.make_learner(copy.deepcopy(cfg))
    fam = learner.gradient_estimators[0].truncated_step.task_family
    assert type(fam).__name__ == "ReparamWeightsFamily"


# --- the full form through the launcher -----------------------------------------------

def test_a_full_form_config_trains_through_the_launcher(tmp_path):
  import json  # pylint: disable=import-outside-toplevel
  from spmd_lopt import launch  # pylint: disable=import-outside-toplevel
  cfg = loading.finish(small(num_devices=8, outer_opt=dict(
      name="adamw", weight_decay=1e-4, schedule=dict(name="warmup_cosine", warmup_steps=2)),
                             frozen="log_epsilon"))
  summary = launch.train(cfg, str(tmp_path), show_progress=False)
  assert summary["outer_steps"] == 4
  # strict JSON, list entries included
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["estimators"][0]["task_kwargs"] == {"dim": 2}
  assert saved["frozen"] == "log_epsilon"


def test_periodic_evaluation_reads_the_tasks_of_a_full_form_config():
  import types  # pylint: disable=import-outside-toplevel
  from spmd_lopt import evaluate  # pylint: disable=import-outside-toplevel
  cfg = small(eval_every=4, eval_steps=3, eval_seeds=1)
  cfg["estimators"].append(dict(task="noisy_quadratic", task_kwargs=dict(dim=3)))
  learner = types.SimpleNamespace(meta_init=config_lib.make_lopt(cfg),
                                  get_meta_params=lambda state: state)
  ev = evaluate.PeriodicEvaluator.from_config(loading.finish(cfg), learner)
  assert list(ev.tasks) == ["quadratic", "noisy_quadratic"]
