"""Timing statistics and scaling arithmetic of the benchmark (pure numpy, no jax).

With ``T_N`` the median time of one meta step on ``N`` devices:

- weak scaling (fixed work per device): efficiency ``T_1 / T_N``, throughput speedup
  ``N T_1 / T_N``;
- strong scaling (fixed total work): speedup ``T_1 / T_N``, efficiency ``T_1 / (N T_N)``;
- inner task-steps per meta step: ``sum(tasks) x trunc_length x 2`` (antithetic PES);
- memory: a least-squares line ``bytes = fixed + per_task x tasks`` and the largest task
  count that fits a budget.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np


def summarize_times(times: Sequence[float]) -> dict[str, float]:
  """Median, quartiles, min, max and count of per-step times (seconds)."""
  t = np.asarray(list(times), dtype=np.float64)
  if t.size == 0:
    raise ValueError("summarize_times needs at least one timing.")
  q25, med, q75 = np.percentile(t, [25, 50, 75])
  return {"median": float(med), "q25": float(q25), "q75": float(q75),
          "min": float(t.min()), "max": float(t.max()), "n": int(t.size)}


def weak_scaling(times_by_n: dict[int, float]) -> dict[int, dict[str, float]]:
  """Weak scaling (fixed work per device): efficiency ``T1 / TN``, speedup ``N * T1 / TN``
  in throughput. ``times_by_n``: device count -> time per meta step; needs ``1``."""
  if 1 not in times_by_n:
    raise ValueError("weak_scaling needs the 1-device time.")
  t1 = times_by_n[1]
  return {n: {"time_s": t, "efficiency": t1 / t, "throughput_speedup": n * t1 / t}
          for n, t in sorted(times_by_n.items())}


def strong_scaling(times_by_n: dict[int, float]) -> dict[int, dict[str, float]]:
  """Strong scaling (fixed total work): speedup ``T1 / TN``, efficiency ``T1 / (N TN)``."""
  if 1 not in times_by_n:
    raise ValueError("strong_scaling needs the 1-device time.")
  t1 = times_by_n[1]
  return {n: {"time_s": t, "speedup": t1 / t, "efficiency": t1 / (n * t)}
          for n, t in sorted(times_by_n.items())}


def inner_steps_per_meta_step(tasks_per_estimator: Sequence[int], trunc_length: int,
                              antithetic: int = 2) -> int:
  """Inner task-steps in one meta step: ``sum(tasks) x trunc_length x 2`` (PES)."""
  return int(sum(tasks_per_estimator)) * int(trunc_length) * int(antithetic)


def projected_wall_s(step_time_s: float, outer_iterations: int) -> float:
  """Wall time of ``outer_iterations`` meta steps at ``step_time_s`` each (compile and
  checkpoints excluded): a plain product, recorded so reports need not redo it."""
  return float(step_time_s) * int(outer_iterations)


def fit_memory(points: Sequence[tuple[int, float]]) -> tuple[float, float]:
  """Least-squares ``bytes = fixed + per_task * tasks`` over ``(tasks, bytes)`` points.

  With one distinct task count, ``fixed = 0`` and ``per_task = bytes / tasks`` (an upper
  bound on the per-task cost, so the fitted capacity is a lower bound)."""
  pts = sorted(set((int(n), float(b)) for n, b in points))
  if not pts:
    raise ValueError("fit_memory needs at least one point.")
  ns = np.array([p[0] for p in pts], np.float64)
  bs = np.array([p[1] for p in pts], np.float64)
  if len(set(ns)) < 2:
    return 0.0, float(np.max(bs / ns))
  per_task, fixed = np.polyfit(ns, bs, 1)
  return float(max(fixed, 0.0)), float(max(per_task, 1.0))


def max_tasks_within(budget_bytes: float, fixed: float, per_task: float,
                     multiple: int = 1) -> int:
  """Largest tasks/device (a multiple of ``multiple``) with ``fixed + per_task n <= budget``."""
  if per_task <= 0:
    raise ValueError("per_task must be positive.")
  # The fit's last-bit rounding must not cost a whole task (900 / 10.000000001 -> 89).
  n = int(np.floor((budget_bytes - fixed) / per_task * (1 + 1e-9)))
  return max(0, n - n % multiple)


def load_average() -> Optional[list[float]]:
  """The 1/5/15-minute load averages (rounded), or ``None`` where the OS has none."""
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return None
