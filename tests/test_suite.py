"""The held-out suite runner (tuning, metrics, resumable cache) and its command line."""

import dataclasses
import json
import os
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spmd_lopt.evaluation import lr_scaled
from spmd_lopt.evaluation import metrics
from spmd_lopt.evaluation import runner
from spmd_lopt.evaluation import suite as S
from spmd_lopt.learned_optimizers import LearnableAdam
from spmd_lopt.optimizers.base import Adam

from helpers import run_module


def _tiny_suite(lopt_lr_mults=()):
  """One quadratic entry, 12 steps, 2 seeds, Adam over 3 rates: 4 runs with one lopt
  (plus one per step multiplier other than 1)."""
  task = S.SuiteTask("NoisyQuadratic_10_cond1000", S.TASKS["NoisyQuadratic_10_cond1000"][0],
                     12, "other")
  adam = S.Baseline("Adam", Adam, ((1e-3,), (3e-2,), (3e-1,)), ("lr",))
  return S.Suite("tiny", (task,), seeds=2, baselines=(adam,), eval_batches=2,
                 lopt_lr_mults=lopt_lr_mults)


class _Interrupt(Exception):
  pass


def test_suite_runner_tunes_scores_and_resumes_from_its_cache(tmp_path):
  suite = _tiny_suite()
  lopt = LearnableAdam()
  lopts = [("la", "init:learnable_adam", lopt, lopt.init(jax.random.key(0)))]
  seen = []

  def interrupt_after_two(n):
    seen.append(n)
    if n == 2:
      raise _Interrupt

  with pytest.raises(_Interrupt):
    runner.run_suite(suite, lopts, str(tmp_path), on_run=interrupt_after_two,
                     bootstrap_reps=50)
  files = list((tmp_path / "cache").rglob("*.json"))
  assert len(files) == 1  # the second run raised before it was written
  resumed = runner.run_suite(suite, lopts, str(tmp_path), bootstrap_reps=50)
  assert resumed["stats"] == {"computed": 3, "cached": 1}
  again = runner.run_suite(suite, lopts, str(tmp_path), bootstrap_reps=50)
  assert again["stats"] == {"computed": 0, "cached": 4}
  fresh = runner.run_suite(suite, lopts, None, bootstrap_reps=50)  # no cache at all
  assert fresh["stats"] == {"computed": 4, "cached": 0}
  t_r, t_f = resumed["tasks"]["NoisyQuadratic_10_cond1000@12"], fresh["tasks"][
      "NoisyQuadratic_10_cond1000@12"]
  for k, run in t_f["baselines"]["Adam"]["runs"].items():  # cached numbers = computed ones
    np.testing.assert_allclose(t_r["baselines"]["Adam"]["runs"][k]["test_loss"],
                               run["test_loss"], rtol=1e-6)
  # a changed theta is a new run, never a stale cache hit
  theta2 = dict(lopts[0][3], log_lr=lopts[0][3]["log_lr"] + 3.0)
  other = runner.run_suite(suite, [("la", "x", lopt, theta2)], str(tmp_path),
                           bootstrap_reps=50)
  assert other["stats"] == {"computed": 1, "cached": 3}

  t = fresh["tasks"]["NoisyQuadratic_10_cond1000@12"]
  runs = t["baselines"]["Adam"]["runs"]
  best = t["baselines"]["Adam"]["best"]
  assert best == min(runs, key=lambda k: runs[k]["final_valid_mean"])
  assert np.asarray(runs[best]["test_loss"]).shape == (2, len(t["eval_step"]))
  m = t["metrics"]
  np.testing.assert_allclose(m["tuned Adam"]["loss_ratio"], 1.0)
  np.testing.assert_allclose(m["tuned Adam"]["speedup"], 1.0)
  ratio = np.asarray(m["la"]["loss_ratio"])
  finals = np.asarray(t["optimizers"]["la"]["test_loss"])[:, -1]
  np.testing.assert_allclose(ratio, finals / np.asarray(runs[best]["test_loss"])[:, -1],
                             rtol=1e-6)
  agg = fresh["aggregates"]["la"]
  assert set(agg) == {"all"}  # one horizon: no per-horizon rows
  assert agg["all"]["loss_ratio"]["iqm"] == pytest.approx(metrics.iqm(ratio))
  json.dumps(metrics.strict_json(fresh), allow_nan=False)


def test_learned_optimizer_lr_tuning_picks_the_best_validation_multiplier(tmp_path):
  suite = _tiny_suite(lopt_lr_mults=(0.1, 10.0))
  lopt = LearnableAdam()
  theta = lopt.init(jax.random.key(0))
  res = runner.run_suite(suite, [("la", "init:learnable_adam", lopt, theta)], str(tmp_path),
                         bootstrap_reps=50)
  assert res["stats"] == {"computed": 6, "cached": 0}  # 3 Adam + x0.1, x1, x10
  t = res["tasks"]["NoisyQuadratic_10_cond1000@12"]
  tuned, plain = t["optimizers"]["la+lr"], t["optimizers"]["la"]
  assert list(tuned["runs"]) == ["x0.1", "x1", "x10"]
  valid = {k: r["final_valid_mean"] for k, r in tuned["runs"].items()}
  assert tuned["best"] == min(valid, key=valid.get)
  assert tuned["lr_mult"] == float(tuned["best"][1:])
  assert len(set(valid.values())) == 3  # the multiplier changes the run
  np.testing.assert_array_equal(tuned["test_loss"], tuned["runs"][tuned["best"]]["test_loss"])
  assert set(res["aggregates"]) == {"la", "la+lr", "tuned Adam"}
  # x1 inside the multiplier grid equals the learned optimizer's own (unwrapped) program
  entry = suite.tasks[0]
  keys = jax.random.split(jax.random.fold_in(
      S.suite_key(0), zlib.crc32(entry.name.encode()) & 0x7FFFFFFF), suite.seeds)
  own = runner._program(entry, lopt, suite.eval_batches)(
      jax.tree.map(lambda x: x[None], theta), keys)
  np.testing.assert_allclose(plain["test_loss"], np.asarray(own["eval/test/loss"])[0],
                             rtol=1e-6)
  assert plain["test_loss"] == tuned["runs"]["x1"]["test_loss"]
  # one cache file per multiplier; a new grid reuses the multipliers it shares
  assert len(list((tmp_path / "cache").rglob("*.json"))) == 6
  again = runner.run_suite(dataclasses.replace(suite, lopt_lr_mults=(0.1,)),
                           [("la", "s", lopt, theta)], str(tmp_path), bootstrap_reps=50)
  assert again["stats"] == {"computed": 0, "cached": 5}


def test_scaled_update_of_adam_is_adam_at_the_scaled_learning_rate():
  lopt = LearnableAdam()
  theta = lopt.init(jax.random.key(0))
  params = {"w": jnp.asarray([1.0, -2.0, 0.5])}
  grads = [{"w": jnp.asarray(g)} for g in ([0.3, -1.0, 2.0], [0.1, 0.4, -0.2])]
  for m in (0.1, 3.0):
    scaled = lr_scaled.ScaledUpdateOptimizer(lopt.opt_fn(theta), m)
    ref = lopt.opt_fn(dict(theta, log_lr=theta["log_lr"] + np.log(m)))
    s1, s2 = scaled.init(params), ref.init(params)
    for g in grads:
      s1, s2 = scaled.update(s1, g), ref.update(s2, g)
    np.testing.assert_allclose(scaled.get_params(s1)["w"], ref.get_params(s2)["w"],
                               rtol=1e-5)


def test_scaled_update_with_decay_of_adam_is_adamw():
  """``m (p' - p) - m decay p`` on Adam(lr) with ``decay = wd lr`` is AdamW(m lr, wd)."""
  from spmd_lopt.optimizers.base import AdamW  # pylint: disable=import-outside-toplevel
  params = {"w": jnp.asarray([1.0, -2.0, 0.5]), "b": jnp.asarray(0.7)}
  grads = [{"w": jnp.asarray(g), "b": jnp.asarray(b)}
           for g, b in (([0.3, -1.0, 2.0], 0.2), ([0.1, 0.4, -0.2], -0.5))]
  lr, wd = 1e-2, 0.5
  for m in (1.0, 3.0):
    scaled = lr_scaled.ScaledUpdateOptimizer(Adam(lr), m, wd * lr)
    ref = AdamW(m * lr, weight_decay=wd)
    s1, s2 = scaled.init(params), ref.init(params)
    for g in grads:
      s1, s2 = scaled.update(s1, g), ref.update(s2, g)
    for k in params:
      np.testing.assert_allclose(scaled.get_params(s1)[k], ref.get_params(s2)[k], rtol=1e-6)
    # and the decay moved them: not the decay-free run
    plain = lr_scaled.ScaledUpdateOptimizer(Adam(lr), m)
    s3 = plain.init(params)
    for g in grads:
      s3 = plain.update(s3, g)
    assert not np.allclose(scaled.get_params(s1)["w"], plain.get_params(s3)["w"], rtol=1e-6)


def test_learned_optimizer_weight_decay_row_is_tuned_over_all_points(tmp_path):
  suite = dataclasses.replace(_tiny_suite(lopt_lr_mults=(10.0,)), lopt_weight_decays=(0.0, 300.0),
                              lopt_wd_mults=(10.0,))
  lopt = LearnableAdam()
  theta = lopt.init(jax.random.key(0))
  res = runner.run_suite(suite, [("la", "s", lopt, theta)], str(tmp_path), bootstrap_reps=50)
  # 3 Adam + x1, x10 + (x1, x10) with wd 300 (wd 0 is the decay-free grid, not run twice)
  assert res["stats"] == {"computed": 7, "cached": 0}
  t = res["tasks"]["NoisyQuadratic_10_cond1000@12"]
  row = t["optimizers"]["la+lr+wd"]
  assert list(row["runs"]) == ["x1", "x10", "x1,wd=300", "x10,wd=300"]
  valid = {k: r["final_valid_mean"] for k, r in row["runs"].items()}
  assert row["best"] == min(valid, key=valid.get)
  assert (row["lr_mult"], row["weight_decay"]) == {
      "x1": (1.0, 0.0), "x10": (10.0, 0.0), "x1,wd=300": (1.0, 300.0),
      "x10,wd=300": (10.0, 300.0)}[row["best"]]
  # decay-free points are the +lr row's own runs; the decayed ones differ from them
  assert row["runs"]["x10"] == t["optimizers"]["la+lr"]["runs"]["x10"]
  assert valid["x10,wd=300"] != valid["x10"]
  assert "la+lr+wd" in res["aggregates"]
  again = runner.run_suite(suite, [("la", "s", lopt, theta)], str(tmp_path), bootstrap_reps=50)
  assert again["stats"] == {"computed": 0, "cached": 7}
  with pytest.raises(ValueError, match="weight decays must be non-negative"):
    runner.weight_decay_grid((-1.0,))


def test_suite_select_and_multiplier_grid_errors():
  full = S.get_suite("full")
  part = S.select(full, ["TransformerLM_Copy8x8"], [300])
  assert [e.label for e in part.tasks] == ["TransformerLM_Copy8x8@300"]
  by_label = S.select(full, ["TransformerLM_Copy8x8@300", "ImageMLP_Digits8_Relu32"])
  assert sorted(e.label for e in by_label.tasks) == [
      "ImageMLP_Digits8_Relu32@1500", "ImageMLP_Digits8_Relu32@300",
      "TransformerLM_Copy8x8@300"]
  with pytest.raises(ValueError, match="has no task 'TransformerLM_Copy8x8@7'"):
    S.select(full, ["TransformerLM_Copy8x8@7"])
  assert len(S.select(full, [], [1500]).tasks) == len(full.tasks) // 2
  with pytest.raises(ValueError, match="has no task 'Nope'"):
    S.select(full, ["Nope"])
  with pytest.raises(ValueError, match="has no horizon 7"):
    S.select(full, [], [7])
  assert runner.lr_mult_grid((3.0, 0.1)) == (0.1, 1.0, 3.0)
  with pytest.raises(ValueError, match="multipliers must be positive"):
    runner.lr_mult_grid((0.0,))


def _cli(args, timeout=900):
  return run_module("spmd_lopt.evaluate", args, timeout=timeout)


@pytest.mark.parametrize("args,message", [
    (["--suite=nope"], "unknown suite 'nope'; known: full, quick."),
    (["--suite=quick", "--lopt=a=init:no_such_lopt"], "Unknown learned optimizer"),
    (["--suite=quick", "--lopt=a=missing.lopt"], "checkpoint 'missing.lopt' does not exist"),
    (["--suite=quick", "--lopt=a=init:learnable_adam,a=init:nn_adam"], "labels must be"),
    (["--suite=quick", "--task=ImageMLP_Digits8_Relu32"], "exactly one of --suite"),
    (["--suite=full", "--horizons=300,x"], "--horizons must be a list of numbers"),
    (["--suite=quick", "--lopt=a=init:learnable_adam", "--lopt_weight_decays=0.1,-1"],
     "weight decays must be non-negative and finite"),
], ids=["suite", "lopt_name", "lopt_path", "labels", "both_modes", "horizons",
        "weight_decays"])
def test_cli_bad_suite_or_lopt_is_one_line(tmp_path, args, message):
  proc = _cli([*args, f"--out={tmp_path}/out"], timeout=120)
  assert proc.returncode == 2, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("spmd_lopt.evaluate: error:"), proc.stderr
  assert message in lines[0]
  assert not os.path.exists(tmp_path / "out")


@pytest.mark.slow  # the quick suite itself: ~1 minute on a quiet 2-core machine
def test_cli_quick_suite_writes_every_output_and_resumes(tmp_path):
  out = tmp_path / "out"
  args = ["--suite=quick", "--lopt=init=init:learnable_adam", f"--out={out}"]
  proc = _cli(args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stderr.strip() == ""  # quiet: no progress bar off a terminal, no INFO
  res = json.loads((out / "suite.json").read_text(),
                   parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
  assert set(res["tasks"]) == {t.label for t in S.get_suite("quick").tasks}
  assert set(res["aggregates"]) == {"init", "init+lr", "tuned Adam", "tuned AdamW",
                                    "tuned SGDM"}
  assert (out / "summary.png").stat().st_size > 5_000
  assert len(list((out / "curves").glob("*.png"))) == len(res["tasks"])
  assert "| optimizer | horizon |" in (out / "suite.md").read_text()
  assert "loss ratio IQM" in proc.stdout
  again = _cli(args)
  assert again.returncode == 0 and "0 runs computed" in again.stdout
