"""Figures derived from the measured records: scaling efficiencies, the host round-trip
and host-fed ratios, ``steps_per_call`` and ``reset_mode`` A/Bs, multi-process speedup,
roofline fractions and memory capacity.

Records with ``error`` or ``skipped`` are left out. Every entry is keyed
``"<families joined by +>/<estimator>/<tag value>"``.
"""

from __future__ import annotations

from typing import Any

from spmd_lopt.bench import stats


def _matching_fused(ok: list[dict], r: dict) -> list[dict]:
  """The plain fused 1-device point with ``r``'s workload, estimator and task count."""
  return [f for f in ok if f["kind"] == "fused" and f["num_devices"] == 1 and
          f["steps_per_call"] == 1 and not f.get("reset_mode") and
          f["families"] == r["families"] and f["estimator"] == r["estimator"] and
          f["tasks_per_device"] == r["tasks_per_device"]]


def summarize(results: list[dict], peak_flops: float, platform_: str,
              budget_bytes: float) -> dict:
  """The ``summary`` of ``results.json`` from the records (see the module docstring).
  Sets ``roofline_fraction`` on each record that has ``achieved_flops_per_s``."""
  ok = [r for r in results if not r.get("error") and not r.get("skipped")]
  summ: dict[str, Any] = {"weak": {}, "strong": {}, "host_ratio": {}, "steps_per_call": {},
                          "multiprocess": {}, "memory": {}, "host_fed": {},
                          "reset_mode": {}}
  for r in ok:
    if r["kind"] in ("fused", "multiprocess") and r.get("achieved_flops_per_s"):
      # CPU virtual devices share the host's cores: the peak is the machine's, not x N.
      peak = peak_flops if platform_ == "cpu" else peak_flops * r["num_devices"]
      r["roofline_fraction"] = r["achieved_flops_per_s"] / peak
  groups: dict[tuple, dict] = {}
  for r in ok:
    for tag in r.get("scaling", []):
      groups.setdefault((tag, "+".join(r["families"]), r["estimator"]), {}).setdefault(
          r["kind"], []).append(r)
  for (tag, wl, est), kinds in groups.items():
    kind, _, val = tag.partition(":")
    name = f"{wl}/{est}/{val}"
    if kind in ("weak", "strong") and "fused" in kinds:
      tn = {r["num_devices"]: r["step_time_s"]["median"] for r in kinds["fused"]}
      if 1 in tn:
        fn = stats.weak_scaling if kind == "weak" else stats.strong_scaling
        summ[kind][name] = {str(k): v for k, v in fn(tn).items()}
    elif kind == "spc" and "fused" in kinds:
      t = {r["steps_per_call"]: r["step_time_s"]["median"] for r in kinds["fused"]}
      if 1 in t:
        summ["steps_per_call"][name] = {str(k): {"time_per_step_s": v, "gain": t[1] / v}
                                        for k, v in sorted(t.items())}
    elif kind == "multiprocess" and "multiprocess" in kinds:
      t = {r["num_processes"]: r["step_time_s"]["median"] for r in kinds["multiprocess"]}
      if 1 in t:
        summ["multiprocess"][name] = {str(k): v for k, v in stats.weak_scaling(t).items()}
    elif kind == "reset" and "fused" in kinds:
      t = {r["reset_mode"]: r["step_time_s"]["median"] for r in kinds["fused"]}
      fastest = min(t, key=t.get)
      summ["reset_mode"][name] = {
          "step_s": t, "fastest": fastest,
          "ratio_to_fastest": {m: v / t[fastest] for m, v in t.items()}}
  for r in ok:
    fused = _matching_fused(ok, r) if r["kind"] in ("host_fed", "host_baseline") else []
    if not fused:
      continue
    name = f"{'+'.join(r['families'])}/{r['estimator']}/{r['tasks_per_device']}"
    t, t_fused = r["step_time_s"]["median"], fused[0]["step_time_s"]["median"]
    if r["kind"] == "host_fed":
      summ["host_fed"][name] = {"host_fed_step_s": t, "on_device_step_s": t_fused,
                                "on_device_speedup": t / t_fused}
    else:
      summ["host_ratio"][name] = {"host_step_s": t, "fused_step_s": t_fused,
                                  "fused_speedup": t / t_fused}
  mem_groups: dict[tuple, list] = {}
  for r in ok:
    if r["kind"] == "fused" and r.get("memory_per_device", {}).get("total") and \
        r["steps_per_call"] == 1 and r["num_processes"] == 1 and not r.get("reset_mode"):
      mem_groups.setdefault(("+".join(r["families"]), r["estimator"]), []).append(
          (r["tasks_per_device"], r["memory_per_device"]["total"]))
  for (wl, est), pts in mem_groups.items():
    fixed, per_task = stats.fit_memory(pts)
    summ["memory"][f"{wl}/{est}"] = {
        "points": [list(p) for p in sorted(set(pts))], "fixed_bytes": fixed,
        "bytes_per_task": per_task, "budget_bytes": budget_bytes,
        "max_tasks_per_device": stats.max_tasks_within(budget_bytes, fixed, per_task)}
  return summ


