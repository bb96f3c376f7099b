"""JAX-only reproducer: what a step costs when N CPU processes run it as one SPMD program.

No ``spmd_lopt`` import: plain ``jax.distributed`` on 127.0.0.1 with the gloo (or another)
CPU collective implementation, one CPU device per process, optionally each process pinned
to its own core. Every process times the same jitted steps, interleaved over ``--rounds``:

- ``local``: ``W`` (a ``lax.scan`` of ``--length`` small ``n x n`` matmuls + tanh) jitted on
  the process's own device only (a single-device program, no mesh);
- ``mesh``: the same ``W`` inside a ``jax.shard_map`` over the global 1-D mesh of every
  process's device, with NO collective;
- ``mesh_psum``: ``mesh`` + one ``psum`` of a 1,762-float vector at the end (the library's
  step: per-device work, one all-reduce of a theta-sized meta-gradient);
- ``psum``: the ``psum`` alone;
- ``mesh_psum_tree``, ``psum_tree``: the same floats (+ a scalar) psum'ed as a 7-leaf pytree
  (MLPLOpt's theta leaves + a loss): XLA makes it one tuple all-reduce, and its CPU runtime
  calls gloo once per operand, so this costs ~7 flat ``psum`` latencies.

Three run modes (``--modes``): ``one`` (a single process, no ``jax.distributed``),
``independent`` (N single processes at once, no ``jax.distributed``: the cores'
contention control) and ``spmd`` (N processes joined by ``jax.distributed``). Per call the
time is measured with ``block_until_ready`` ("call"), and per call of a stream of
``--stream`` back-to-back calls blocked once at the end ("stream").

Knobs, each a flag: ``--xla_flags``, ``--env KEY=VAL`` (e.g. ``OMP_NUM_THREADS=1``),
``--collectives`` (gloo, mpi), ``--async_dispatch`` (``jax_cpu_enable_async_dispatch``),
``--no_pin``. ``--sweep FILE.json`` runs a list of knob sets (each a dict of these flags'
names), alternated ``--sweep_repeats`` times so machine load hits all alike.

  python scripts/repro_two_process.py --lengths 20,1000
  python scripts/repro_two_process.py --modes spmd --env OMP_NUM_THREADS=1 --no_pin
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

THETA_SIZE = 1762  # MLPLOpt's default theta: the all-reduced meta-gradient's length
# The same 1,762 floats as MLPLOpt's 6 theta leaves plus the scalar loss: what a psum of the
# meta-gradient pytree all-reduces (one XLA tuple all-reduce of 7 operands).
THETA_LEAVES = (32, 19 * 32, 32, 32 * 32, 2, 32 * 2)
VARIANTS = ("local", "mesh", "mesh_psum", "psum", "mesh_psum_tree", "psum_tree")


# ----------------------------------------------------------------------------- child side

def _child(args) -> None:
  """One process: pin, start JAX (and jax.distributed for spmd), time every variant."""
  if args.pin_cpu is not None:
    os.sched_setaffinity(0, {args.pin_cpu})  # before JAX starts its threads
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from jax.sharding import NamedSharding  # pylint: disable=import-outside-toplevel
  from jax.sharding import PartitionSpec as P  # pylint: disable=import-outside-toplevel

  if args.async_dispatch is not None:
    jax.config.update("jax_cpu_enable_async_dispatch", args.async_dispatch == "true")
  if args.num_processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", args.collectives)
    jax.distributed.initialize(f"127.0.0.1:{args.port}", num_processes=args.num_processes,
                               process_id=args.process_id, initialization_timeout=120)
  pid, nproc = jax.process_index(), jax.process_count()
  n, lengths = args.n, [int(x) for x in args.lengths.split(",")]
  dev = jax.local_devices()[0]
  mesh = jax.make_mesh((len(jax.devices()),), ("p",), devices=jax.devices())
  sharded = NamedSharding(mesh, P("p"))

  def work(x, length):
    """(n, n) -> (n, n): ``length`` steps of x <- tanh(x @ x^T / n)."""
    def body(c, _):
      return jnp.tanh(c @ c.T * (1.0 / n)), None
    return jax.lax.scan(body, x, None, length=length)[0]

  def to_vec(x, acc):
    # a theta-sized vector that depends on the work, so XLA cannot drop either
    return 0.5 * acc + jnp.resize(x.ravel(), (THETA_SIZE,))

  def make(variant, length):
    if variant == "local":
      def f(x, acc):
        x = work(x, length)
        return x, to_vec(x, acc)
      return jax.jit(f), dev

    def body(x, acc):  # per-device blocks: x (n, n), acc (THETA_SIZE,)
      if not variant.startswith("psum"):
        x = work(x, length)
        acc = to_vec(x, acc)
      if variant in ("mesh_psum", "psum"):
        acc = jax.lax.psum(acc, "p") * (1.0 / nproc)
      elif variant in ("mesh_psum_tree", "psum_tree"):
        leaves = jnp.split(acc, np.cumsum(THETA_LEAVES)[:-1])
        leaves = jax.lax.psum((*leaves, jnp.sum(acc)), "p")
        acc = jnp.concatenate(leaves[:-1]) * (1.0 / nproc) + 0.0 * leaves[-1]
      return x, acc
    f = jax.shard_map(body, mesh=mesh, in_specs=(P("p"), P("p")), out_specs=(P("p"), P("p")))
    return jax.jit(f), None

  key = jax.random.fold_in(jax.random.key(0), pid)
  x_local = jax.random.normal(key, (n, n), jnp.float32)
  acc_local = jnp.zeros((THETA_SIZE,), jnp.float32)
  x_glob = jax.make_array_from_process_local_data(sharded, x_local, (nproc * n, n))
  acc_glob = jax.make_array_from_process_local_data(sharded, acc_local,
                                                    (nproc * THETA_SIZE,))

  def sync():
    if nproc > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      multihost_utils.sync_global_devices("repro")

  steps = {}
  for length in lengths:
    for v in args.variants.split(","):
      if v.startswith("psum") and length != lengths[0]:
        continue  # psum alone does not depend on W
      fn, _ = make(v, length)
      state = ((jax.device_put(x_local, dev), jax.device_put(acc_local, dev)) if v == "local"
               else (x_glob, acc_glob))
      state = jax.block_until_ready(fn(*state))  # compile + first run
      steps[(v, length)] = (fn, state)

  times = {k: {"call": [], "stream": []} for k in steps}
  for _ in range(args.rounds):
    for k, (fn, state) in steps.items():
      sync()
      for _ in range(args.warmup):
        state = jax.block_until_ready(fn(*state))
      for _ in range(args.calls):
        t0 = time.perf_counter()
        state = jax.block_until_ready(fn(*state))
        times[k]["call"].append(time.perf_counter() - t0)
      t0 = time.perf_counter()
      for _ in range(args.stream):
        state = fn(*state)
      jax.block_until_ready(state)
      times[k]["stream"].append((time.perf_counter() - t0) / max(1, args.stream))
      steps[k] = (fn, state)
  out = []
  for (v, length), t in times.items():
    out.append({"variant": v, "length": length, "process": pid, "num_processes": nproc,
                "call_ms": [1e3 * s for s in t["call"]],
                "stream_ms": [1e3 * s for s in t["stream"]],
                "affinity": sorted(os.sched_getaffinity(0))})
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump(out, f)
  if nproc > 1:
    sync()  # no process leaves while another still needs the coordinator


# ---------------------------------------------------------------------------- parent side

def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(knobs: dict, mode: str, base: argparse.Namespace, tmp: str) -> list[dict]:
  """Run one mode under one knob set; returns every process's records."""
  nproc = 1 if mode == "one" else base.num_processes
  joined = mode == "spmd"
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  env["JAX_PLATFORMS"] = "cpu"
  flags = knobs.get("xla_flags", "")
  if flags:
    env["XLA_FLAGS"] = flags
  for kv in knobs.get("env", []):
    k, _, v = kv.partition("=")
    env[k] = v
  cpus = sorted(os.sched_getaffinity(0))
  port = _free_port()
  procs = []
  for i in range(nproc):
    out = os.path.join(tmp, f"{mode}_{i}_{time.time_ns()}.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--out", out,
           "--n", str(base.n), "--lengths", base.lengths, "--variants", base.variants,
           "--rounds", str(base.rounds), "--calls", str(base.calls),
           "--warmup", str(base.warmup), "--stream", str(base.stream),
           "--num_processes", str(nproc if joined else 1), "--process_id",
           str(i if joined else 0), "--port", str(port),
           "--collectives", knobs.get("collectives", "gloo")]
    if knobs.get("async_dispatch") is not None:
      cmd += ["--async_dispatch", str(knobs["async_dispatch"]).lower()]
    if knobs.get("pin", True):
      cmd += ["--pin_cpu", str(cpus[i % len(cpus)])]
    log = open(out + ".log", "w", encoding="utf-8")  # pylint: disable=consider-using-with
    procs.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT),
                  out, log))
  recs = []
  for p, out, log in procs:
    try:
      rc = p.wait(timeout=base.timeout_s)
    except subprocess.TimeoutExpired:
      p.kill()
      rc = "timeout"
    log.close()
    if rc != 0 or not os.path.exists(out):
      with open(out + ".log", encoding="utf-8") as f:
        tail = f.read()[-1500:]
      print(f"[repro] {mode} process failed ({rc}):\n{tail}", file=sys.stderr)
      continue
    with open(out, encoding="utf-8") as f:
      for r in json.load(f):
        r["mode"] = mode
        recs.append(r)
  return recs


def _summary(recs: list[dict]) -> list[dict]:
  """Median and min per (knobs, mode, variant, length) over every process, repeat and
  round, plus each process's own median (one per process and repeat)."""
  groups: dict = {}
  for r in recs:
    groups.setdefault((r["knobs"], r["mode"], r["variant"], r["length"]), []).append(r)
  rows = []
  for (knobs, mode, v, length), rs in groups.items():
    call = [t for r in rs for t in r["call_ms"]]
    stream = [t for r in rs for t in r["stream_ms"]]
    rows.append({"knobs": knobs, "mode": mode, "variant": v, "length": length,
                 "call_median_ms": statistics.median(call), "call_min_ms": min(call),
                 "stream_median_ms": statistics.median(stream),
                 "per_process_call_median_ms": [round(statistics.median(r["call_ms"]), 3)
                                                for r in rs]})
  return rows


def _print_table(rows: list[dict]) -> None:
  print("| knobs | mode | variant | scan length | call ms median [min] | stream ms/call "
        "| per-process call medians |")
  print("|---|---|---|---|---|---|---|")
  for r in sorted(rows, key=lambda r: (r["knobs"], r["length"], r["variant"], r["mode"])):
    print(f"| {r['knobs']} | {r['mode']} | {r['variant']} | {r['length']} | "
          f"{r['call_median_ms']:.2f} [{r['call_min_ms']:.2f}] | "
          f"{r['stream_median_ms']:.2f} | {r['per_process_call_median_ms']} |")


def _knob_name(k: dict) -> str:
  parts = [k.get("name")] if k.get("name") else []
  if not parts:
    if k.get("xla_flags"):
      parts.append(k["xla_flags"])
    parts += k.get("env", [])
    if k.get("collectives", "gloo") != "gloo":
      parts.append(k["collectives"])
    if k.get("async_dispatch") is not None:
      parts.append(f"async_dispatch={k['async_dispatch']}")
    if not k.get("pin", True):
      parts.append("unpinned")
  return " ".join(parts) or "default"


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--modes", default="one,independent,spmd")
  p.add_argument("--variants", default=",".join(VARIANTS))
  p.add_argument("--num_processes", type=int, default=2)
  p.add_argument("--n", type=int, default=64, help="matmul size of W")
  p.add_argument("--lengths", default="20,1000",
                 help="scan lengths of W (about 1 ms and 50 ms on one core of a 2-vCPU VM)")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--calls", type=int, default=10)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--stream", type=int, default=10)
  p.add_argument("--xla_flags", default="")
  p.add_argument("--env", action="append", default=[], metavar="KEY=VAL")
  p.add_argument("--collectives", default="gloo")
  p.add_argument("--async_dispatch", choices=("true", "false"), default=None)
  p.add_argument("--no_pin", action="store_true")
  p.add_argument("--sweep", default=None, help="JSON list of knob sets")
  p.add_argument("--sweep_repeats", type=int, default=1)
  p.add_argument("--json_out", default=None)
  p.add_argument("--timeout_s", type=float, default=900)
  # child-only
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--out", help=argparse.SUPPRESS)
  p.add_argument("--process_id", type=int, default=0, help=argparse.SUPPRESS)
  p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
  p.add_argument("--pin_cpu", type=int, default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.child:
    _child(args)
    return
  for kv in args.env:
    if "=" not in kv:
      raise ValueError(f"--env {kv!r} must be KEY=VAL")
  if args.sweep:
    with open(args.sweep, encoding="utf-8") as f:
      knob_sets = json.load(f)
  else:
    knob_sets = [{"xla_flags": args.xla_flags, "env": args.env,
                  "collectives": args.collectives, "async_dispatch": args.async_dispatch,
                  "pin": not args.no_pin}]
  modes = args.modes.split(",")
  bad = [m for m in modes if m not in ("one", "independent", "spmd")]
  if bad:
    raise ValueError(f"--modes: unknown {bad}; use one, independent, spmd")
  recs = []
  with tempfile.TemporaryDirectory() as tmp:
    for rep in range(args.sweep_repeats):
      for knobs in knob_sets:
        for mode in modes:
          t0 = time.time()
          got = _launch(knobs, mode, args, tmp)
          for r in got:
            r["knobs"], r["repeat"] = _knob_name(knobs), rep
          recs.extend(got)
          print(f"[repro] {_knob_name(knobs)} / {mode}: {len(got)} records, "
                f"{time.time() - t0:.0f} s; load {os.getloadavg()[0]:.1f}", file=sys.stderr)
  rows = _summary(recs)
  _print_table(rows)
  if args.json_out:
    with open(args.json_out, "w", encoding="utf-8") as f:
      json.dump({"rows": rows, "records": recs, "argv": sys.argv[1:]}, f, indent=1)


if __name__ == "__main__":
  main()
