"""The held-out suite runner (tuning, metrics, resumable cache) and its command line."""

import json
import os

import jax
import numpy as np
import pytest

from spmd_lopt.evaluation import metrics
from spmd_lopt.evaluation import runner
from spmd_lopt.evaluation import suite as S
from spmd_lopt.learned_optimizers import LearnableAdam
from spmd_lopt.optimizers.base import Adam

from helpers import run_module


def _tiny_suite():
  """One quadratic entry, 12 steps, 2 seeds, Adam over 3 rates: 4 runs with one lopt."""
  task = S.SuiteTask("NoisyQuadratic_10_cond1000", S.TASKS["NoisyQuadratic_10_cond1000"][0],
                     12, "other")
  adam = S.Baseline("Adam", Adam, ((1e-3,), (3e-2,), (3e-1,)), ("lr",))
  return S.Suite("tiny", (task,), seeds=2, baselines=(adam,), eval_batches=2)


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


def _cli(args, timeout=900):
  return run_module("spmd_lopt.evaluate", args, timeout=timeout)


@pytest.mark.parametrize("args,message", [
    (["--suite=nope"], "unknown suite 'nope'; known: full, quick."),
    (["--suite=quick", "--lopt=a=init:no_such_lopt"], "Unknown learned optimizer"),
    (["--suite=quick", "--lopt=a=missing.lopt"], "checkpoint 'missing.lopt' does not exist"),
    (["--suite=quick", "--lopt=a=init:learnable_adam,a=init:nn_adam"], "labels must be"),
    (["--suite=quick", "--task=ImageMLP_Digits8_Relu32"], "exactly one of --suite"),
], ids=["suite", "lopt_name", "lopt_path", "labels", "both_modes"])
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
  assert set(res["aggregates"]) == {"init", "tuned Adam", "tuned AdamW", "tuned SGDM"}
  assert (out / "summary.png").stat().st_size > 5_000
  assert len(list((out / "curves").glob("*.png"))) == len(res["tasks"])
  assert "| optimizer | horizon |" in (out / "suite.md").read_text()
  assert "loss ratio IQM" in proc.stdout
  again = _cli(args)
  assert again.returncode == 0 and "0 runs computed" in again.stdout
