"""spmd_lopt.evaluate: the CLI (as a user runs it), its errors, evaluate_theta and the
periodic evaluation hook of the launcher."""

import json
import os
import types

import jax
import numpy as np
import pytest

from spmd_lopt import config as config_lib
from spmd_lopt import evaluate
from spmd_lopt.learned_optimizers import LearnableAdam, MLPLOpt, save_parameter_checkpoint

from helpers import run_module


def _cli(args, timeout=120):
  return run_module("spmd_lopt.evaluate", args, timeout=timeout)


def _checkpoint(tmp_path, lopt, name="theta.lopt"):
  path = str(tmp_path / name)
  save_parameter_checkpoint(path, lopt, lopt.init(jax.random.key(3)))
  return path


def test_cli_writes_curves_json_and_plot(tmp_path):
  # LearnableAdam: the cheapest learned optimizer to compile (MLPLOpt: see test_launch).
  ckpt = _checkpoint(tmp_path, LearnableAdam(initial_lr=0.05))
  out = tmp_path / "out"
  proc = _cli([f"--lopt=trained={ckpt},init:learnable_adam", "--task=FixedDimQuadraticFamily_4",
               "--steps=20", "--seeds=2", "--adam_lrs=1e-2,1e-1", "--eval_every=10",
               "--expect=learnable_adam", f"--out={out}"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  res = json.loads((out / "FixedDimQuadraticFamily_4.json").read_text())
  assert (out / "FixedDimQuadraticFamily_4.png").stat().st_size > 10_000
  assert {"task", "steps", "seeds", "seed", "eval_every", "eval_batches", "eval_step",
          "best_adam", "best_adam_lr", "optimizers"} <= set(res)
  assert res["eval_step"] == [0, 10, 20]
  assert list(res["optimizers"]) == ["trained", "init:learnable_adam", "Adam lr=0.01",
                                     "Adam lr=0.1"]
  for v in res["optimizers"].values():
    assert np.asarray(v["train_loss"]).shape == (2, 20)
    assert np.asarray(v["test_loss"]).shape == (2, 3)
    assert np.asarray(v["eval_train_loss"]).shape == (2, 3)
    assert np.isfinite(v["final_train_loss_mean"]) and v["final_test_loss_std"] >= 0
  # on a 4-d bowl, 20 Adam steps of 0.1 beat 20 steps of 0.01
  assert res["best_adam"] == "Adam lr=0.1" and res["best_adam_lr"] == 0.1
  assert res["optimizers"]["trained"]["lopt_class"].endswith(":LearnableAdam")
  # common random numbers: every optimizer starts from the same task and init per seed
  first = [np.asarray(v["train_loss"])[:, 0] for v in res["optimizers"].values()]
  for f in first[1:]:
    np.testing.assert_allclose(f, first[0], rtol=1e-6)
  assert "final train loss" in proc.stdout and "Adam lr=0.1 *" in proc.stdout


@pytest.mark.parametrize("saved,message", [
    (LearnableAdam(), "holds theta for spmd_lopt.learned_optimizers.base:LearnableAdam"),
    (MLPLOpt(hidden_size=8), "theta does not match the expected MLPLOpt"),
], ids=["wrong_class", "wrong_shape"])
def test_cli_wrong_checkpoint_is_a_one_line_error(tmp_path, saved, message):
  ckpt = _checkpoint(tmp_path, saved)
  proc = _cli([f"--lopt={ckpt}", "--expect=mlp_lopt", "--task=FixedDimQuadraticFamily_4",
               "--steps=5", "--seeds=1", f"--out={tmp_path}/out"])
  assert proc.returncode == 2, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1, proc.stderr
  assert lines[0].startswith("spmd_lopt.evaluate: error:") and message in lines[0]
  assert not os.path.exists(tmp_path / "out")


def test_cli_unknown_task_and_lopt_are_clear_errors(tmp_path):
  proc = _cli(["--lopt=init:mlp_lop", "--task=FixedDimQuadraticFamily_4",
               f"--out={tmp_path}"])
  assert proc.returncode == 2 and "Unknown learned optimizer 'mlp_lop'" in proc.stderr
  assert "Traceback" not in proc.stderr


def test_evaluate_theta_is_finite_cached_and_keyed_by_name():
  lopt = LearnableAdam()
  theta = lopt.init(jax.random.key(0))
  names = ["FixedDimQuadraticFamily_4", "NoisyQuadraticFamily_3"]
  a = evaluate.evaluate_theta(lopt, theta, names, num_steps=10, key=jax.random.key(1),
                              seeds=2)
  assert set(a) == set(names) and all(np.isfinite(v) for v in a.values())
  # a task's numbers do not depend on which other tasks are evaluated with it
  b = evaluate.evaluate_theta(lopt, theta, names[::-1], num_steps=10,
                              key=jax.random.key(1), seeds=2, with_train=True)
  assert b["FixedDimQuadraticFamily_4"][0] == pytest.approx(a["FixedDimQuadraticFamily_4"])
  # another theta reuses the compiled program (theta is an argument, not a constant)
  fn = evaluate._theta_eval_fn(lopt, names[0], 10, 2, 5)
  size = fn._cache_size()
  theta2 = dict(theta, log_lr=theta["log_lr"] + 4.0)  # lr 1e-3 -> 0.055: learns
  c = evaluate.evaluate_theta(lopt, theta2, names[:1], num_steps=10,
                              key=jax.random.key(1), seeds=2)
  assert fn._cache_size() == size and c[names[0]] < 0.9 * a[names[0]]


@pytest.mark.slow  # ~15 s here, nearly all compiling the MLP's training loop
def test_evaluate_theta_on_a_fixed_data_task():
  lopt = MLPLOpt()
  a = evaluate.evaluate_theta(lopt, lopt.init(jax.random.key(0)),
                              ["ImageMLP_Digits8_Relu32"], num_steps=10,
                              key=jax.random.key(1), seeds=2, with_train=True)
  test, train = a["ImageMLP_Digits8_Relu32"]
  assert 1.5 < test < 3.0 and 1.5 < train < 3.0  # 10 small steps: still near ln 10


def test_periodic_evaluator_schedule_and_plot(tmp_path):
  cfg = config_lib.base_config()
  cfg.update(dict(eval_every=25, eval_tasks="quadratic", eval_steps=5, eval_seeds=2,
                  quadratic_dim=3, outer_steps=60))
  lopt = LearnableAdam()
  learner = types.SimpleNamespace(meta_init=lopt, get_meta_params=lambda state: state)
  ev = evaluate.PeriodicEvaluator.from_config(cfg, learner)
  theta = lopt.init(jax.random.key(0))
  got = {s: ev.maybe_evaluate(s, theta) for s in range(10, 61, 10)}
  # due at the first log step at or after each multiple of 25, and at the final step
  assert [s for s, r in got.items() if r] == [30, 50, 60]
  assert np.isfinite(got[30]["eval/quadratic/final_loss"]) and "eval/time_s" in got[30]
  assert got[50]["eval/quadratic/final_loss"] == got[30]["eval/quadratic/final_loss"]
  assert ev.finish(str(tmp_path)) == str(tmp_path / "eval.png")
  assert (tmp_path / "eval.png").stat().st_size > 0
  off = evaluate.PeriodicEvaluator.from_config(config_lib.base_config(), learner)
  assert off.maybe_evaluate(300, theta) == {} and off.finish(str(tmp_path / "x")) is None
  cfg.eval_tasks = "no_such_task"
  with pytest.raises(ValueError, match="no_such_task"):
    evaluate.PeriodicEvaluator.from_config(cfg, learner)


def test_launcher_logs_periodic_evaluations(tmp_path):
  """The hook in launch.train: eval/<task>/final_loss in metrics.jsonl, eval.png."""
  from spmd_lopt import launch  # pylint: disable=import-outside-toplevel
  cfg = config_lib.base_config()
  cfg.update(dict(tasks="quadratic", quadratic_dim=3, num_tasks=8, num_devices=1,
                  trunc_length=5, min_length=10, max_length=20,
                  random_initial_iteration_offset=20, outer_steps=10, log_every=5,
                  lopt="learnable_adam", eval_every=5, eval_steps=5, eval_seeds=2))
  summary = launch.train(cfg, str(tmp_path), show_progress=False)
  records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == [5, 10]
  assert all(np.isfinite(r["eval/quadratic/final_loss"]) for r in records)
  assert summary["eval_plot"] == str(tmp_path / "eval.png")
  assert (tmp_path / "eval.png").stat().st_size > 0


@pytest.mark.parametrize("seed", [0, 3])
def test_init_seed_evaluates_the_theta_a_launcher_run_starts_from(seed):
  """``--lopt init:NAME --init_seed s`` and ``launch.train`` with ``config.seed = s``
  start from one theta: both take its key from ``train.keys``."""
  from spmd_lopt import sharding  # pylint: disable=import-outside-toplevel
  from spmd_lopt.evaluation import cli  # pylint: disable=import-outside-toplevel
  from spmd_lopt.train import keys  # pylint: disable=import-outside-toplevel
  cfg = config_lib.base_config()
  cfg.update(dict(tasks="quadratic", quadratic_dim=3, num_tasks=2, seed=seed))
  learner = config_lib.make_learner(cfg, mesh=sharding.make_mesh(num_devices=1))
  launched = learner.get_meta_params(learner.init(keys.init_key(seed)))  # as launch.train
  [(_, _, lopt, theta)] = cli._load_lopts([f"init:{cfg.lopt}"], "{}", "", seed)
  assert type(lopt) is type(learner.meta_init)
  jax.tree.map(np.testing.assert_array_equal, theta, jax.device_get(launched))
  other = cli._load_lopts([f"init:{cfg.lopt}"], "{}", "", seed + 1)[0][3]
  assert any(not np.array_equal(a, b)  # the seed matters (the weights, not the zero biases)
             for a, b in zip(jax.tree.leaves(other), jax.tree.leaves(theta)))
