"""The per-entry MLP alone: the fused CPU kernel against the same math as XLA products, at
MLPLOpt's shapes (``docs/PERFORMANCE.md``, round eight).

  PYTHONPATH=$PWD taskset -c 1 python scripts/per_entry_mlp_rate.py

``--lanes`` lanes (tasks; 64 = one device's PES lanes with 32 tasks) of ``--entries``
entries (2,442: the 8x8 digits MLP's parameters) with 8 features each, through
``8 -> hidden -> ... -> 2`` (``--hidden``, ``--layers``), per-lane weights as under PES;
each implementation timed alone (median of ``--reps`` calls) and as a rate against the
best ``n x n`` f32 matmul on the same device (``--peak_n``). Pin it to one core to read
one core's rate.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from spmd_lopt.bench import cost_model
from spmd_lopt.kernels import per_entry_mlp


def inputs(lanes: int, entries: int, hidden: int, layers: int, key=None):
  """Features ``[g, p, m]`` (``[lanes, entries, 1 | 1 | 6]``) and per-lane weights."""
  k = jax.random.split(key if key is not None else jax.random.key(0), 6)
  feats = [jax.random.normal(k[0], (lanes, entries, 1)),
           jax.random.normal(k[1], (lanes, entries, 1)),
           jax.random.normal(k[2], (lanes, entries, 6))]
  kernel0 = jax.random.normal(k[3], (lanes, 8, hidden)) / 8 ** 0.5
  bias0 = jnp.zeros((lanes, hidden))
  tail = jax.random.normal(k[4], (lanes, per_entry_mlp.tail_size(hidden, layers, 2)))
  return feats, kernel0, bias0, 0.1 * tail


def timed(f, args, reps: int) -> float:
  """Median seconds of one call of the jitted ``f``."""
  jax.block_until_ready(f(*args))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def build(implementation: str, layers: int):
  one = lambda f, k0, b0, tail: per_entry_mlp.apply(
      f, k0, b0, tail, hidden_layers=layers, num_out=2, implementation=implementation)
  return jax.jit(jax.vmap(one))


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--lanes", type=int, default=64)
  ap.add_argument("--entries", type=int, default=2442)
  ap.add_argument("--hidden", type=int, default=32)
  ap.add_argument("--layers", type=int, default=2)
  ap.add_argument("--reps", type=int, default=15)
  ap.add_argument("--peak_n", type=int, default=1024)
  args = ap.parse_args()
  feats, k0, b0, tail = inputs(args.lanes, args.entries, args.hidden, args.layers)
  h = args.hidden
  flops = 2 * args.lanes * args.entries * (8 * h + (args.layers - 1) * h * h + 2 * h)
  peak = cost_model.measure_peak_matmul(args.peak_n)["flops_per_s"]
  print(f"{args.lanes} lanes x {args.entries} entries, 8 -> {h} x {args.layers} -> 2: "
        f"{flops / 1e6:.1f} MFLOP per call; matmul peak {peak / 1e9:.1f} GFLOP/s", flush=True)
  for impl in ("kernel", "reference"):
    s = timed(build(impl, args.layers), (feats, k0, b0, tail), args.reps)
    print(f"{impl:9s}: {s * 1e3:8.2f} ms  {flops / s / 1e9:6.1f} GFLOP/s  "
          f"{100 * flops / s / peak:5.1f}% of peak", flush=True)


if __name__ == "__main__":
  main()
