"""Which points to measure and in which process: the scaling grid and its subprocesses.

On CPU every device count runs in a fresh subprocess (``python -m spmd_lopt.bench
--worker ...``), because the forced device count
(``XLA_FLAGS=--xla_force_host_platform_device_count=N``) is fixed when jax is imported.
With real accelerators the points run in-process on subsets of ``jax.devices()``.
Multi-process points start ``mp_processes`` workers that join one ``jax.distributed`` run
(one CPU device each, gloo collectives), each optionally pinned to its own core.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from typing import Optional

from spmd_lopt.bench import config as bench_config
from spmd_lopt.bench import measure
from spmd_lopt.bench import report


def plan(bcfg) -> dict[int, list[dict]]:
  """Points to measure, grouped by device count (one process per count on CPU).

  Per workload and estimator: weak scaling (each ``tasks_per_device`` over
  ``device_counts``), strong scaling (each ``strong_total_tasks``), and on one device at
  the smallest strong total the host baseline, host-fed ablation, ``steps_per_call``
  and ``reset_modes`` variants. Points shared by several studies are measured once and
  carry every tag in ``scaling``."""
  counts = bench_config.ints(bcfg.device_counts)
  points: dict[tuple, dict] = {}

  def add(kind, n, tpd, fams, est, spc, tag, reset_mode=""):
    key = (kind, n, tpd, tuple(fams), est, spc, reset_mode)
    p = points.setdefault(key, {"kind": kind, "num_devices": n, "tasks_per_device": tpd,
                                "families": list(fams), "estimator": est,
                                "steps_per_call": spc, "scaling": []})
    if reset_mode:
      p["reset_mode"] = reset_mode
    if tag not in p["scaling"]:
      p["scaling"].append(tag)

  strong = bench_config.ints(bcfg.strong_total_tasks)
  for fams in bench_config.workloads(bcfg.workloads):
    for est in bench_config.names(bcfg.estimators):
      for tpd in bench_config.ints(bcfg.tasks_per_device):
        for n in counts:
          add("fused", n, tpd, fams, est, 1, f"weak:{tpd}")
      for tot in strong:
        for n in counts:
          if tot % n == 0:
            add("fused", n, tot // n, fams, est, 1, f"strong:{tot}")
        if bcfg.host_baseline:
          add("host_baseline", 1, tot, fams, est, 1, f"host:{tot}")
        if bcfg.host_fed and any(f != "quadratic" for f in fams):
          add("host_fed", 1, tot, fams, est, 1, f"host_fed:{tot}")
      if strong:
        for spc in bench_config.ints(bcfg.steps_per_call):
          add("fused", 1, min(strong), fams, est, spc, f"spc:{min(strong)}")
        for mode in bench_config.names(bcfg.get("reset_modes", "")):
          add("fused", 1, min(strong), fams, est, 1, f"reset:{min(strong)}", mode)
  by_n: dict[int, list[dict]] = {}
  for p in points.values():
    by_n.setdefault(p["num_devices"], []).append(p)
  return dict(sorted(by_n.items()))


def _repo_root() -> str:
  return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _flags_without_device_count() -> str:
  return " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                  if "xla_force_host_platform_device_count" not in f)


def _spawn(bcfg, spec: dict, env_extra: dict, outfile: str, extra_args=(),
           affinity: Optional[int] = None, persistent_cache: bool = True):
  env = dict(os.environ)
  env.update(env_extra)
  if not persistent_cache:
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
  root = _repo_root()
  env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
  cmd = [sys.executable, "-m", "spmd_lopt.bench", "--worker", json.dumps(spec),
         "--worker_config", json.dumps(bcfg.to_dict()), "--worker_out", outfile,
         *extra_args]
  if affinity is not None and hasattr(os, "sched_getaffinity"):
    cpus = sorted(os.sched_getaffinity(0))
    cmd += ["--pin_cpu", str(cpus[affinity % len(cpus)])]  # the worker pins itself
  return subprocess.Popen(cmd, env=env, cwd=root, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _collect(proc, outfile, timeout) -> tuple[list[dict], str]:
  try:
    log, _ = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    log, _ = proc.communicate()
    return [], f"timeout after {timeout}s\n{log[-3000:]}"
  if proc.returncode != 0 or not os.path.exists(outfile):
    return [], f"exit {proc.returncode}\n{log[-3000:]}"
  with open(outfile) as f:
    return json.load(f), log


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_points(bcfg, by_n: dict[int, list[dict]], workdir: str, log=print) -> list[dict]:
  """Measure ``plan``'s points: a subprocess per device count on CPU, else in-process."""
  import jax  # pylint: disable=import-outside-toplevel
  results = []
  use_sub = bcfg.subprocess and jax.default_backend() == "cpu"
  for n, pts in by_n.items():
    log(f"[bench] {n} device(s): {len(pts)} point(s)"
        f"{' in a subprocess' if use_sub else ' in-process'}")
    if use_sub:
      out = os.path.join(workdir, f"worker_{n}dev.json")
      proc = _spawn(bcfg, {"points": pts}, {
          "XLA_FLAGS": f"{_flags_without_device_count()} {bcfg.xla_flags} "
                       f"--xla_force_host_platform_device_count={n}".strip(),
          "JAX_PLATFORMS": "cpu"}, out)
      recs, msg = _collect(proc, out, bcfg.worker_timeout_s)
      if not recs:
        recs = [{**p, "error": f"worker failed: {msg}"} for p in pts]
    elif n > len(jax.devices()):
      recs = [{**p, "error": f"only {len(jax.devices())} devices"} for p in pts]
    else:
      recs = measure.run_worker(bcfg, {"points": pts})
    for r in recs:
      log("  " + report.one_line(r))
    results.extend(recs)
  return results


def run_multiprocess(bcfg, workdir: str, log=print) -> list[dict]:
  """Weak scaling over processes: 1 process, then ``mp_processes``, each pinned to its own
  core with one CPU device, gloo collectives; ``mp_tasks_per_process`` tasks each."""
  fams = bench_config.workloads(bcfg.workloads)[0]
  est = bench_config.names(bcfg.estimators)[0]
  results = []
  for nproc in (1, int(bcfg.mp_processes)):
    port = int(bcfg.mp_port) or _free_port()
    spec = {"points": [{"kind": "fused", "num_devices": nproc,
                        "tasks_per_device": int(bcfg.mp_tasks_per_process),
                        "families": fams, "estimator": est, "steps_per_call": 1,
                        "scaling": [f"multiprocess:{bcfg.mp_tasks_per_process}"]}]}
    procs, outs = [], []
    for i in range(nproc):
      out = os.path.join(workdir, f"mp_{nproc}proc_{i}.json")
      outs.append(out)
      procs.append(_spawn(bcfg, spec, {
          "XLA_FLAGS": f"{_flags_without_device_count()} {bcfg.xla_flags}".strip(),
          "JAX_PLATFORMS": "cpu"}, out,
                          ["--mp_num_processes", str(nproc), "--mp_process_id", str(i),
                           "--mp_coordinator", f"127.0.0.1:{port}"],
                          affinity=i if bcfg.mp_pin else None,
                          # a cache the caller set: process 0 would load while process 1
                          # compiles, past gloo's connect timeout (README, the kill
                          # campaign); and compile times are part of the record
                          persistent_cache=False))
    got = [_collect(p, o, bcfg.worker_timeout_s) for p, o in zip(procs, outs)]
    recs, _ = got[0]
    if not recs:
      msgs = "\n---\n".join(f"process {i}: {m}" for i, (_, m) in enumerate(got))
      recs = [{**spec["points"][0], "num_processes": nproc, "error": f"failed: {msgs}"}]
    for r in recs:
      r["kind"] = "multiprocess"
      log("  " + report.one_line(r))
    results.extend(recs)
  return results
