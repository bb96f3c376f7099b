"""Where one fused meta step's time goes, per XLA CPU thunk, from a ``jax.profiler`` trace.

  PYTHONPATH=$PWD python scripts/trace_step.py --workload image_mlp --tasks 16
  PYTHONPATH=$PWD python scripts/trace_step.py --recipe --hlo /tmp/celo2.hlo

Builds the bench learner of ``scripts/profile_step.py`` (same flags: ``--workload``,
``--tasks``, ``--devices``, ``--lopt``, ``--bench_config``, ``--recipe``), runs one update
to compile, then traces ``--calls`` updates with ``jax.profiler.trace`` and reads the
Perfetto JSON it writes. XLA's CPU runtime records one event per executed thunk (a fusion,
a library product, a copy, ...) on the thread that ran it, so summing the events by name
gives each HLO instruction's time per meta step and how many times it ran (``50x`` for an
instruction of a 50-step truncation's loop body). Printed: the instructions above
``--min_ms`` per step, the thread each ran on, and the total thunk time per step (over all
threads: it exceeds the wall time when two threads run thunks at once). ``--hlo FILE``
writes the compiled module's text, to look the names up.

Times under the profiler are a little longer than without it; use ``profile_step.py
--reps`` for step times and this for their breakdown.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import profile_step  # pylint: disable=wrong-import-position  (a sibling script, no jax at import)

# Names of the profiler's own and jax's host-side events, not thunks.
_NOT_THUNKS = ("$", "Pjit", "ThunkExecutor", "PjRt", "Cpu", "Codegen", "Jit", "Fusion",
               "backend", "Thunk", "HLO passes", "Lower", "lower_", "trace_to",
               "ExecuteReplicated", "shard_args", "ParseArguments")


def parse_args():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--workload", default="image_mlp")
  ap.add_argument("--tasks", type=int, default=16)
  ap.add_argument("--devices", type=int, default=1)
  ap.add_argument("--lopt", default="mlp_lopt")
  ap.add_argument("--bench_config", default="configs/bench/tutorial.py")
  ap.add_argument("--recipe", action="store_true",
                  help="the Celo2 recipe (profile_step.RECIPE), for the flags not given")
  ap.add_argument("--trunc_length", type=int, default=50)
  ap.add_argument("--calls", type=int, default=3, help="traced updates")
  ap.add_argument("--min_ms", type=float, default=0.4, help="print thunks above this")
  ap.add_argument("--hlo", default=None, help="write the compiled module's text here")
  ap.add_argument("--no_options", action="store_true",
                  help="compile without spmd_lopt.xla_options' options")
  args = ap.parse_args()
  profile_step.apply_recipe(args, ap)
  return args


def thunk_times(trace_dir: str):
  """``(per_name_us, per_name_count, per_name_thread_us)`` summed over the trace."""
  path = glob.glob(os.path.join(trace_dir, "**", "*perfetto_trace.json.gz"), recursive=True)[0]
  with gzip.open(path) as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  total, count = collections.Counter(), collections.Counter()
  by_thread = collections.defaultdict(collections.Counter)
  for e in events:
    if e.get("ph") != "X" or e["name"].startswith(_NOT_THUNKS) or "::" in e["name"]:
      continue
    total[e["name"]] += e.get("dur", 0)
    count[e["name"]] += 1
    by_thread[e["name"]][e.get("tid")] += e.get("dur", 0)
  return total, count, by_thread


def main():
  args = parse_args()
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={args.devices}")
  import jax  # pylint: disable=import-outside-toplevel
  from spmd_lopt import sharding  # pylint: disable=import-outside-toplevel
  mesh = sharding.make_mesh(num_devices=args.devices)
  lrn, state = profile_step.build(args, mesh)
  if args.no_options:
    lrn.compiler_options = {}  # read when the step is first jitted, below
  key = jax.random.key(1)
  state = lrn.update(state, key)[0]
  jax.block_until_ready(state)
  if args.hlo:
    with open(args.hlo, "w") as f:
      f.write(lrn.lower_update(state, sharding.replicate(key, mesh)).compile().as_text())
  trace_dir = tempfile.mkdtemp(prefix="trace_step_")
  keys = [sharding.replicate(jax.random.fold_in(key, i), mesh) for i in range(args.calls)]
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for k in keys:
      state = lrn.update(state, k)[0]
    jax.block_until_ready(state)
  total, count, by_thread = thunk_times(trace_dir)
  threads = sorted({t for c in by_thread.values() for t in c})
  tid = {t: i for i, t in enumerate(threads)}
  print(f"{'ms/step':>9} {'runs/step':>9}  threads (ms/step)  instruction")
  for name, us in total.most_common():
    ms = us / 1e3 / args.calls
    if ms < args.min_ms:
      break
    where = " ".join(f"t{tid[t]}:{d / 1e3 / args.calls:.1f}"
                     for t, d in by_thread[name].most_common(2))
    print(f"{ms:9.2f} {count[name] / args.calls:9.0f}  {where:17s}  {name[:90]}")
  print(f"thunk time per step, all threads: {sum(total.values()) / 1e3 / args.calls:.1f} ms "
        f"({len(threads)} threads ran thunks; load avg {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
  main()
