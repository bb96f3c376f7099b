"""Writing the benchmark's results: strict JSON, CSV, a PNG of scaling and roofline, a
markdown table and a plain-text summary, and one log line per point.

``results.json`` holds ``meta``, ``peak_matmul``, ``results`` (one record per point) and
``summary`` (``spmd_lopt.bench.summary``); it is strict JSON: a non-finite number is
written as ``null``.
"""

from __future__ import annotations

import csv
import json
import math
import os

import numpy as np


def _finite(x):
  """``x`` with every non-finite float replaced by ``None`` (strict JSON has no NaN)."""
  if isinstance(x, float):
    return x if math.isfinite(x) else None
  if isinstance(x, dict):
    return {k: _finite(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_finite(v) for v in x]
  return x


def write_json(obj, path: str) -> None:
  """Strict JSON (``allow_nan=False`` after mapping non-finite floats to ``null``)."""
  with open(path, "w") as f:
    json.dump(_finite(obj), f, indent=1, default=str, allow_nan=False)


def one_line(r: dict) -> str:
  """One log line for a record (skipped and failed points say why)."""
  if r.get("skipped"):
    return (f"{r.get('kind')} {'+'.join(r.get('families', []))} "
            f"dev={r.get('num_devices')} SKIPPED: {r['skipped']}")
  if r.get("error"):
    return (f"{r.get('kind')} dev={r.get('num_devices')} tpd={r.get('tasks_per_device')} "
            f"ERROR {r['error'].splitlines()[0][:200]}")
  st = r["step_time_s"]
  return (f"{r['kind']:<13} {'+'.join(r['families']):<20} dev={r['num_devices']} "
          f"proc={r.get('num_processes', 1)} tpd={r['tasks_per_device']:<4} "
          f"spc={r['steps_per_call']} step={st['median'] * 1e3:8.2f} ms "
          f"[{st['min'] * 1e3:.2f}-{st['max'] * 1e3:.2f}] "
          f"inner/s={r['inner_steps_per_s']:.3g} compile={r.get('compile_s', float('nan')):.2f}s")




def write_csv(results: list[dict], path: str) -> None:
  """One row per record; nested fields flattened (step time quantiles, memory total)."""
  cols = ["kind", "families", "estimator", "num_devices", "num_processes", "tasks_per_device",
          "total_tasks_per_estimator", "steps_per_call", "trunc_length", "compile_s",
          "first_call_s", "step_median_s", "step_q25_s", "step_q75_s", "step_min_s",
          "step_max_s", "meta_steps_per_s", "inner_steps_per_s",
          "inner_steps_per_s_per_device", "flops_per_step", "bytes_per_step",
          "achieved_flops_per_s", "roofline_fraction", "memory_total_bytes_per_device",
          "program_text_bytes", "program_constant_bytes", "reset_mode", "projected_wall_s",
          "scaling", "skipped", "error"]
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=cols)
    w.writeheader()
    for r in results:
      st = r.get("step_time_s") or {}
      row = {k: r.get(k) for k in cols}
      size = r.get("program_size") or {}
      row.update(families="+".join(r.get("families", [])),
                 scaling=";".join(r.get("scaling", [])),
                 step_median_s=st.get("median"), step_q25_s=st.get("q25"),
                 step_q75_s=st.get("q75"), step_min_s=st.get("min"), step_max_s=st.get("max"),
                 memory_total_bytes_per_device=(r.get("memory_per_device") or {}).get("total"),
                 program_text_bytes=size.get("text_bytes"),
                 program_constant_bytes=size.get("constant_bytes"),
                 error=(r.get("error") or "").splitlines()[0] if r.get("error") else "")
      w.writerow(row)


def write_plots(results: list[dict], summary: dict, outdir: str) -> list[str]:
  """``scaling.png``: throughput and efficiency over devices, and roofline fractions."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  paths = []
  ok = [r for r in results
        if not r.get("error") and not r.get("skipped") and r["kind"] == "fused"]
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
  for kind, ax_t in (("weak", axes[0]), ("strong", axes[0])):
    for name, by_n in summary[kind].items():
      ns = sorted(int(k) for k in by_n)
      thr = []
      for n in ns:
        rec = [r for r in ok if f"{kind}:{name.split('/')[-1]}" in r["scaling"] and
               "+".join(r["families"]) == name.split("/")[0] and r["num_devices"] == n]
        thr.append(rec[0]["inner_steps_per_s"] if rec else np.nan)
      ax_t.plot(ns, thr, "o-" if kind == "weak" else "s--", label=f"{kind} {name}")
      axes[1].plot(ns, [by_n[str(n)]["efficiency"] for n in ns],
                   "o-" if kind == "weak" else "s--", label=f"{kind} {name}")
  axes[0].set(xlabel="devices", ylabel="inner task-steps / s (total)", xscale="log",
              yscale="log", title="throughput")
  axes[1].set(xlabel="devices", ylabel="parallel efficiency", xscale="log",
              title="efficiency (weak T1/TN, strong T1/(N TN))")
  counts = sorted({r["num_devices"] for r in ok})
  for ax in axes[:2]:
    ax.set_xticks(counts)
    ax.set_xticklabels([str(n) for n in counts])
    ax.minorticks_off()
  axes[1].axhline(1.0, color="k", lw=0.5)
  roof = [r for r in ok if r.get("roofline_fraction")]
  labels = [f"{'+'.join(r['families'])}\n{r['num_devices']}d x {r['tasks_per_device']}t"
            for r in roof]
  axes[2].bar(range(len(roof)), [r["roofline_fraction"] for r in roof])
  axes[2].set_xticks(range(len(roof)))
  axes[2].set_xticklabels(labels, rotation=90, fontsize=6)
  axes[2].set(ylabel="achieved FLOP/s / f32 matmul peak", title="roofline fraction")
  for ax in axes[:2]:
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # nothing to label when every point skipped
      ax.legend(fontsize=6)
  fig.tight_layout()
  p = os.path.join(outdir, "scaling.png")
  fig.savefig(p, dpi=100)
  plt.close(fig)
  paths.append(p)
  return paths


def format_table(results: list[dict]) -> str:
  """A markdown table, one row per record."""
  head = (f"| {'kind':<13} | {'workload':<22} | dev | proc | tasks/dev | spc | "
          f"step ms (median [min-max]) | meta steps/s | inner steps/s | inner/s/dev | "
          f"compile s | GFLOP/s | roofline |")
  sep = "|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|"
  rows = [head, sep]
  for r in results:
    if r.get("skipped"):
      rows.append(f"| {r.get('kind', ''):<13} | {'+'.join(r.get('families', [])):<22} | "
                  f"{r.get('num_devices')} | | {r.get('tasks_per_device')} | | SKIPPED: "
                  f"{r['skipped'][:80]} | | | | | | |")
      continue
    if r.get("error"):
      rows.append(f"| {r.get('kind', ''):<13} | {'+'.join(r.get('families', [])):<22} | "
                  f"{r.get('num_devices')} | | {r.get('tasks_per_device')} | | ERROR: "
                  f"{r['error'].splitlines()[0][:80]} | | | | | | |")
      continue
    st = r["step_time_s"]
    gf = r.get("achieved_flops_per_s")
    rf = r.get("roofline_fraction")
    rows.append(
        f"| {r['kind']:<13} | {'+'.join(r['families']):<22} | {r['num_devices']:>3} | "
        f"{r.get('num_processes', 1):>4} | {r['tasks_per_device']:>9} | "
        f"{r['steps_per_call']:>3} | {st['median'] * 1e3:9.2f} [{st['min'] * 1e3:.2f}-"
        f"{st['max'] * 1e3:.2f}] | {r['meta_steps_per_s']:12.2f} | "
        f"{r['inner_steps_per_s']:13.4g} | {r['inner_steps_per_s_per_device']:11.4g} | "
        f"{r.get('compile_s') if r.get('compile_s') is not None else float('nan'):9.2f} | "
        f"{(gf or float('nan')) / 1e9:7.2f} | "
        f"{(rf if rf is not None else float('nan')):8.4f} |")
  return "\n".join(rows)


def format_summary(summary: dict, results=()) -> str:
  """The summary's figures in sentences (and projected wall times of the records)."""
  lines = []
  for kind, extra in (("weak", "throughput_speedup"), ("strong", "speedup")):
    for name, by_n in summary[kind].items():
      eff = ", ".join(f"{n}: {v['efficiency']:.2f}" for n, v in by_n.items())
      spd = ", ".join(f"{n}: {v[extra]:.2f}x" for n, v in by_n.items())
      lines.append(f"{kind} scaling {name}: efficiency by devices {{{eff}}}; "
                   f"{extra} {{{spd}}}")
  for name, v in summary["host_ratio"].items():
    lines.append(f"host round-trip baseline {name}: fused speedup {v['fused_speedup']:.2f}x "
                 f"(host {v['host_step_s'] * 1e3:.1f} ms, fused {v['fused_step_s'] * 1e3:.1f} ms "
                 "per meta step)")
  for name, v in summary.get("host_fed", {}).items():
    lines.append(f"batches drawn on device vs host-fed {name}: on-device "
                 f"{v['on_device_step_s'] * 1e3:.1f} ms, host-fed "
                 f"{v['host_fed_step_s'] * 1e3:.1f} ms per meta step "
                 f"({v['on_device_speedup']:.2f}x)")
  for name, v in summary["steps_per_call"].items():
    lines.append(f"steps_per_call {name}: " + ", ".join(
        f"{k}: {x['gain']:.2f}x" for k, x in v.items()))
  for name, v in summary["multiprocess"].items():
    lines.append(f"multi-process weak scaling {name}: " + ", ".join(
        f"{k} proc: eff {x['efficiency']:.2f}, throughput {x['throughput_speedup']:.2f}x"
        for k, x in v.items()))
  for name, v in summary.get("reset_mode", {}).items():
    lines.append(f"reset_mode {name}: " + ", ".join(
        f"{m}: {t * 1e3:.1f} ms ({v['ratio_to_fastest'][m]:.2f}x fastest)"
        for m, t in v["step_s"].items()))
  for r in results:
    if r.get("projected_wall_s") is not None and r["kind"] == "fused":
      lines.append(f"projected {r['projected_outer_iterations']} outer iterations "
                   f"{'+'.join(r['families'])} ({r['lopt']}, {r['num_devices']} dev x "
                   f"{r['tasks_per_device']} tasks): {r['projected_wall_s'] / 3600:.2f} h")
  for name, v in summary["memory"].items():
    lines.append(f"memory {name}: {v['bytes_per_task'] / 1e3:.1f} kB/task + "
                 f"{v['fixed_bytes'] / 1e6:.2f} MB fixed -> max {v['max_tasks_per_device']} "
                 f"tasks/device in {v['budget_bytes'] / 1e9:.1f} GB")
  return "\n".join(lines)
