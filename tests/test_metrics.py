"""spmd_lopt.evaluation.metrics on synthetic curves and samples with known answers."""

import json

import numpy as np
import pytest

from spmd_lopt.evaluation import metrics as M

STEPS = np.arange(0, 301, 10)


def _line(shift=0.0):
  # a linear decrease: linear interpolation between grid points is exact
  return 1.0 - (STEPS + shift) / 1000.0


@pytest.mark.parametrize("k", [10, 25, 60])
def test_speedup_of_a_curve_shifted_k_steps_earlier(k):
  # the optimizer is where Adam will be k steps later: it reaches Adam's final loss
  # (at step 300) at step 300 - k
  s, reached = M.speedup(STEPS, _line(), _line(k))
  assert reached and s == pytest.approx(300 / (300 - k))
  assert M.steps_to_reach(STEPS, _line(k), _line()[-1]) == pytest.approx(300 - k)


def test_speedup_of_a_slower_curve_that_never_reaches_the_target():
  # Adam plateaus at step 150; the optimizer is k = 40 steps behind and never gets there
  adam = np.maximum(_line(), _line()[15])
  late = np.maximum(_line(-40), 0.99 * 2)  # stays above Adam's final loss
  s, reached = M.speedup(STEPS, adam, late)
  assert not reached and s == pytest.approx(150 / 300)  # t_A / T, an upper bound <= 1
  # a slower curve that does get there: (t_A) / (t_A + 40)
  s2, r2 = M.speedup(STEPS, adam, np.maximum(_line(-40), _line()[15]))
  assert r2 and s2 == pytest.approx(150 / 190)


def test_speedups_per_seed_and_diverged_runs():
  adam = np.stack([_line(), _line()])
  opt = np.stack([_line(30), np.full_like(STEPS, np.nan, dtype=float)])
  s, reached = M.speedups(STEPS, adam, opt)
  assert s[0] == pytest.approx(300 / 270) and reached.tolist() == [True, False]
  assert s[1] == pytest.approx(1.0)  # never reached: t_A / T with t_A = T
  r = M.loss_ratio([0.5, np.nan, 2.0], [1.0, 1.0, 4.0])
  assert r.tolist() == [0.5, np.inf, 0.5]


def test_iqm_on_known_samples():
  assert M.iqm(np.arange(100)) == pytest.approx(49.5)  # mean of 25..74
  assert M.iqm([1, 2, 3, 4]) == pytest.approx(2.5)
  assert M.iqm([1, 2, 3, 1e9]) == pytest.approx(2.5)  # an outlier does not move it
  # NaN dropped, 2-d flattened: sorted [1, 2, 2, 3, 4], one cut per end -> mean(2, 2, 3)
  assert M.iqm([[4, 1], [3, np.nan], [2, 2]]) == pytest.approx(7 / 3)
  assert M.iqm([1, 2, np.inf, 3, 4, 5, 6, 7]) == pytest.approx(np.mean([3, 4, 5, 6]))


def test_stratified_bootstrap_interval_on_known_samples():
  assert M.stratified_bootstrap_ci(np.full((5, 3), 2.0), reps=200) == (2.0, 2.0)
  rng = np.random.default_rng(0)
  wide = rng.normal(1.0, 0.5, size=(20, 5))
  narrow = rng.normal(1.0, 0.5, size=(20, 80))
  lo, hi = M.stratified_bootstrap_ci(wide, reps=1000)
  lo2, hi2 = M.stratified_bootstrap_ci(narrow, reps=1000)
  assert lo < M.iqm(wide) < hi and lo < 1.0 < hi
  assert lo2 < 1.0 < hi2 and (hi2 - lo2) < 0.5 * (hi - lo)  # more seeds, tighter
  # the standard error of a 20x5 IQM of N(1, 0.25) is ~0.06: a 95% interval is ~0.2 wide
  assert 0.1 < hi - lo < 0.45
  agg = M.aggregate(wide, reps=200)
  assert agg["n_tasks"] == 20 and agg["n_seeds"] == 5 and agg["ci_low"] < agg["iqm"]
  with pytest.raises(ValueError, match="tasks, seeds"):
    M.stratified_bootstrap_ci(np.ones(4))


def test_strict_json_has_no_nan_or_infinity():
  x = {"a": np.array([1.0, np.nan, np.inf]), "b": (np.float32(2), np.int64(3)),
       "c": np.bool_(True)}
  s = json.dumps(M.strict_json(x), allow_nan=False)
  assert json.loads(s) == {"a": [1.0, None, None], "b": [2.0, 3], "c": True}
