"""Running the benchmark: ``run_bench`` (the whole study for one config) and the command
line of ``python -m spmd_lopt.bench``.

Usage::

  python -m spmd_lopt.bench --config configs/bench/tutorial.py [--config.KEY=VALUE ...] \
      [--outdir bench_results/<config.name>]

Writes ``results.json``, ``results.csv``, ``table.md`` and ``scaling.png`` into
``outdir`` and prints the table and summary. ``--worker SPEC`` is the internal entry point
of the subprocesses that ``orchestrate`` starts (one per device count on CPU, one per
process for the multi-process study).
"""

from __future__ import annotations

import json
import os
import platform
import socket
import sys
import time

from spmd_lopt.bench import config as bench_config
from spmd_lopt.bench import cost_model
from spmd_lopt.bench import measure
from spmd_lopt.bench import orchestrate
from spmd_lopt.bench import report
from spmd_lopt.bench import stats
from spmd_lopt.bench import summary as summary_lib


def memory_budget_bytes(bcfg, max_devices: int) -> float:
  """``memory_budget_gb``, else 90% of the accelerator's memory, else half the RAM per
  device."""
  import jax  # pylint: disable=import-outside-toplevel
  if bcfg.memory_budget_gb > 0:
    return bcfg.memory_budget_gb * 1e9
  dev = jax.local_devices()[0]
  mem = None
  try:
    mem = dev.memory_stats()
  except Exception:  # pylint: disable=broad-except  (CPU backends may have none)
    pass
  if mem and mem.get("bytes_limit"):
    return 0.9 * mem["bytes_limit"]
  try:
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (ValueError, OSError):
    ram = 8e9
  return 0.5 * ram / max(1, max_devices)


def run_bench(bcfg, outdir: str, log=print) -> dict:
  """The whole benchmark for ``bcfg``; writes into ``outdir`` and returns the JSON dict."""
  import jax  # pylint: disable=import-outside-toplevel
  from spmd_lopt.learned_optimizers import celo2, mlp_lopt  # pylint: disable=import-outside-toplevel
  os.makedirs(outdir, exist_ok=True)
  t_start = time.time()
  load_before = stats.load_average()
  platform_ = jax.devices()[0].platform
  # Accelerators need a bigger matmul to approach their peak.
  peak = cost_model.measure_peak_matmul(bcfg.peak_matmul_n if platform_ == "cpu"
                                        else max(bcfg.peak_matmul_n, 8192))
  log(f"[bench] {jax.devices()[0].device_kind}: f32 matmul peak "
      f"{peak['flops_per_s'] / 1e9:.1f} GFLOP/s (n={peak['n']}); load {load_before}")
  # Whether the learned optimizers' fused CPU kernels run here: without them MLPLOpt and
  # Celo2 points are slower, and a reader comparing runs must know.
  kernel = mlp_lopt.MLPLOpt().kernel_unavailable() or "available"
  celo2_kernel = celo2.Celo2().kernel_unavailable() or "available"
  log(f"[bench] fused CPU kernels: MLPLOpt's {kernel}; Celo2's {celo2_kernel}")
  by_n = orchestrate.plan(bcfg)
  results = orchestrate.run_points(bcfg, by_n, outdir, log)
  if int(bcfg.mp_processes) > 1 and platform_ != "cpu":
    log("[bench] multi-process skipped: it is a CPU experiment (one CPU device per process, "
        "gloo); on accelerators launch one process per host with jax.distributed instead.")
  elif int(bcfg.mp_processes) > 1:
    log(f"[bench] multi-process: 1 vs {bcfg.mp_processes} processes")
    results.extend(orchestrate.run_multiprocess(bcfg, outdir, log))
  budget = memory_budget_bytes(bcfg, max(by_n) if by_n else 1)
  summary = summary_lib.summarize(results, peak["flops_per_s"], platform_, budget)
  meta = {
      "config": bcfg.to_dict(), "device_kind": jax.devices()[0].device_kind,
      "platform": platform_, "num_local_devices": len(jax.local_devices()),
      "jax_version": jax.__version__, "python": platform.python_version(),
      "cpu_count": os.cpu_count(),
      "cpu_affinity": (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                       else None),
      "hostname": socket.gethostname(), "load_avg_before": load_before,
      "per_entry_mlp_kernel": kernel, "celo2_matrix_kernel": celo2_kernel,
      "load_avg_after": stats.load_average(), "wall_s": time.time() - t_start,
      "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
  }
  out = {"meta": meta, "peak_matmul": peak, "results": results, "summary": summary}
  report.write_json(out, os.path.join(outdir, "results.json"))
  report.write_csv(results, os.path.join(outdir, "results.csv"))
  if bcfg.plots:
    out["plots"] = report.write_plots(results, summary, outdir)
  table = report.format_table(results)
  with open(os.path.join(outdir, "table.md"), "w") as f:
    f.write(table + "\n\n" + report.format_summary(summary, results) + "\n")
  log(table)
  log(report.format_summary(summary, results))
  log(f"[bench] load average before {load_before}, after {meta['load_avg_after']}; "
      f"wrote {outdir}/results.json, results.csv, table.md"
      f"{', scaling.png' if bcfg.plots else ''}")
  return out


def _arg(argv, name, default=None):
  if name in argv:
    return argv[argv.index(name) + 1]
  for a in argv:
    if a.startswith(name + "="):
      return a.split("=", 1)[1]
  return default


def _unknown_args(argv) -> list:
  """The arguments of ``argv`` that are not ``--config``, ``--config.KEY=VALUE`` or
  ``--outdir`` (each as ``--name VALUE`` or ``--name=VALUE``)."""
  unknown, i = [], 0
  while i < len(argv):
    a = argv[i]
    if a in ("--config", "--outdir"):
      i += 2
      continue
    if not (a.startswith(("--config=", "--outdir=")) or
            (a.startswith("--config.") and "=" in a)):
      unknown.append(a)
    i += 1
  return unknown


def worker_main(argv) -> None:
  """``--worker SPEC --worker_config CFG --worker_out FILE [--mp_* ...]``."""
  pin = _arg(argv, "--pin_cpu")
  if pin is not None and hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {int(pin)})  # before jax starts its threads
  import ml_collections  # pylint: disable=import-outside-toplevel
  nproc = int(_arg(argv, "--mp_num_processes", "1"))
  if nproc > 1:
    import jax  # pylint: disable=import-outside-toplevel
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(_arg(argv, "--mp_coordinator"), num_processes=nproc,
                               process_id=int(_arg(argv, "--mp_process_id")))
  bcfg = ml_collections.ConfigDict(json.loads(_arg(argv, "--worker_config")))
  spec = json.loads(_arg(argv, "--worker"))
  recs = measure.run_worker(bcfg, spec)
  for r in recs:
    r["load_avg_after"] = stats.load_average()
    r["cpu_affinity"] = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
        else None
    if nproc > 1:
      r["cpu_collectives"] = "gloo"
  report.write_json(recs, _arg(argv, "--worker_out"))


def main(argv=None) -> None:
  """``python -m spmd_lopt.bench``: see the module docstring."""
  argv = list(sys.argv[1:] if argv is None else argv)
  if "--worker" in argv or any(a.startswith("--worker=") for a in argv):
    worker_main(argv)
    return
  if "-h" in argv or "--help" in argv:
    print(__doc__)
    return
  unknown = _unknown_args(argv)
  if unknown:
    sys.exit(f"spmd_lopt.bench: unknown argument(s) {unknown}; usage: python -m "
             "spmd_lopt.bench --config FILE [--config.KEY=VALUE ...] [--outdir DIR]")
  path = _arg(argv, "--config")
  try:
    bcfg = bench_config.load_config(path)
    for a in argv:
      if a.startswith("--config.") and "=" in a:
        bench_config.apply_override(bcfg, *a[len("--config."):].split("=", 1))
  except ValueError as e:
    sys.exit(f"spmd_lopt.bench: {e}")
  outdir = _arg(argv, "--outdir") or os.path.join("bench_results", bcfg.name)
  run_bench(bcfg, outdir)
