"""Suite metrics as pure numpy functions: loss ratio, speedup, IQM, bootstrap intervals.

All curves are losses on a step grid: ``steps`` i[E] increasing, ``loss`` f[..., E].
Non-finite losses (a diverged run) count as ``+inf``.

* ``loss_ratio(l_opt, l_adam) = l_opt / l_adam`` per seed (final test losses; below 1: the
  optimizer ends lower than tuned Adam).
* ``steps_to_reach(steps, loss, target)``: the first step at which the curve is
  ``<= target``, linearly interpolated between the two grid points around the crossing
  (so a curve shifted by ``k`` steps reaches any level exactly ``k`` steps later);
  ``inf`` when it never does.
* ``speedup(steps, adam, opt)``: with ``target = adam[-1]`` (tuned Adam's final loss),
  ``t_A = steps_to_reach(adam, target)`` and ``t_O = steps_to_reach(opt, target)``,
  ``speedup = t_A / t_O``. An optimizer that never reaches the target within the horizon
  ``T = steps[-1]`` gets ``t_A / T`` (it needs more than ``T`` steps, so this is an upper
  bound, and it is ``<= 1``: a never-reaching optimizer can never show a win) and
  ``reached = False``. ``t_O = 0`` (the start is already below the target) gives ``inf``;
  the suite never has that since Adam's final loss is below the initial one.
* ``iqm(x)``: the mean of the middle 50% of the flattened, sorted samples: with ``n``
  samples, ``g = floor(n / 4)`` are cut at each end (``scipy.stats.trim_mean(x, 0.25)``).
* ``stratified_bootstrap_ci(scores[T, S])``: percentile interval of ``iqm`` over
  resamples that draw ``T`` tasks with replacement and, within each drawn task, ``S``
  seeds with replacement (two-level, so the interval reflects both which tasks are in the
  suite and seed noise).
"""

from __future__ import annotations

from typing import Optional

import numpy as np


def _clean(x) -> np.ndarray:
  x = np.asarray(x, np.float64)
  return np.where(np.isfinite(x), x, np.inf)


def loss_ratio(opt_final, adam_final) -> np.ndarray:
  """``opt_final / adam_final`` elementwise (non-finite losses are ``+inf``)."""
  a, b = _clean(opt_final), _clean(adam_final)
  with np.errstate(divide="ignore", invalid="ignore"):
    r = a / b
  return np.where(np.isnan(r), np.inf, r)


def steps_to_reach(steps, loss, target: float) -> float:
  """First (interpolated) step with ``loss <= target``; ``inf`` if none. 1-d curves."""
  steps = np.asarray(steps, np.float64)
  loss = _clean(loss)
  if steps.shape != loss.shape or steps.ndim != 1:
    raise ValueError(f"steps_to_reach: steps and loss must be equal-length 1-d arrays, got "
                     f"{steps.shape} and {loss.shape}.")
  if not np.isfinite(target):
    return float("inf")
  hit = np.nonzero(loss <= target)[0]
  if hit.size == 0:
    return float("inf")
  i = int(hit[0])
  if i == 0 or not np.isfinite(loss[i - 1]):
    return float(steps[i])
  l0, l1 = loss[i - 1], loss[i]
  frac = (l0 - target) / (l0 - l1)  # l0 > target >= l1
  return float(steps[i - 1] + frac * (steps[i] - steps[i - 1]))


def speedup(steps, adam_loss, opt_loss) -> tuple[float, bool]:
  """``(t_A / t_O, reached)`` for one seed's curves; see the module doc."""
  steps = np.asarray(steps, np.float64)
  target = float(_clean(adam_loss)[-1])
  t_a = steps_to_reach(steps, adam_loss, target)
  t_o = steps_to_reach(steps, opt_loss, target)
  if not np.isfinite(t_a):  # Adam itself diverged: no reference level
    return float("nan"), False
  if not np.isfinite(t_o):
    return t_a / float(steps[-1]), False
  return (t_a / t_o if t_o > 0 else float("inf")), True


def speedups(steps, adam_curves, opt_curves) -> tuple[np.ndarray, np.ndarray]:
  """``speedup`` per seed: curves f[S, E] -> (f64[S], bool[S])."""
  adam_curves, opt_curves = np.asarray(adam_curves), np.asarray(opt_curves)
  if adam_curves.shape != opt_curves.shape:
    raise ValueError(f"speedups: curve shapes differ: {adam_curves.shape} vs "
                     f"{opt_curves.shape}.")
  out = [speedup(steps, a, o) for a, o in zip(adam_curves, opt_curves)]
  return (np.asarray([s for s, _ in out], np.float64),
          np.asarray([r for _, r in out], bool))


def iqm(x) -> float:
  """Interquartile mean of all elements of ``x`` (NaNs dropped)."""
  x = np.asarray(x, np.float64).ravel()
  x = x[~np.isnan(x)]
  if x.size == 0:
    return float("nan")
  x = np.sort(x)
  g = x.size // 4
  mid = x[g:x.size - g]
  with np.errstate(invalid="ignore", over="ignore"):
    return float(np.mean(mid))  # +inf if a diverged run sits in the middle half


def stratified_bootstrap_ci(scores, reps: int = 2000, alpha: float = 0.05,
                            seed: int = 0, stat=iqm,
                            rng: Optional[np.random.Generator] = None
                            ) -> tuple[float, float]:
  """``(lo, hi)``: the ``alpha/2, 1 - alpha/2`` percentiles of ``stat`` over ``reps``
  two-level resamples of ``scores`` f[T, S] (tasks, then seeds within each task)."""
  scores = np.asarray(scores, np.float64)
  if scores.ndim != 2 or scores.size == 0:
    raise ValueError(f"stratified_bootstrap_ci: scores must be a non-empty [tasks, seeds] "
                     f"array, got shape {scores.shape}.")
  rng = rng or np.random.default_rng(seed)
  t, s = scores.shape
  tasks = rng.integers(0, t, size=(reps, t))
  seeds = rng.integers(0, s, size=(reps, t, s))
  samples = scores[tasks[..., None], seeds]  # [reps, T, S]
  vals = np.asarray([stat(x) for x in samples])
  vals = vals[~np.isnan(vals)]
  if vals.size == 0:
    return float("nan"), float("nan")
  lo, hi = np.percentile(vals, [100 * alpha / 2, 100 * (1 - alpha / 2)])
  return float(lo), float(hi)


def aggregate(scores, reps: int = 2000, seed: int = 0) -> dict:
  """``{"iqm", "ci_low", "ci_high", "n_tasks", "n_seeds"}`` for scores f[T, S]."""
  scores = np.asarray(scores, np.float64)
  lo, hi = stratified_bootstrap_ci(scores, reps=reps, seed=seed)
  return {"iqm": iqm(scores), "ci_low": lo, "ci_high": hi, "n_tasks": int(scores.shape[0]),
          "n_seeds": int(scores.shape[1])}


def strict_json(x):
  """``x`` with every non-finite float replaced by ``None`` (strict JSON has no NaN/inf),
  numpy scalars/arrays turned into Python values."""
  if isinstance(x, dict):
    return {str(k): strict_json(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [strict_json(v) for v in x]
  if isinstance(x, np.ndarray):
    return strict_json(x.tolist())
  if isinstance(x, (np.bool_,)):
    return bool(x)
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (float, np.floating)):
    x = float(x)
    return x if np.isfinite(x) else None
  return x
