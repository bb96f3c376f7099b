"""A/B: a baseline's 9-point grid as 9 calls of the H=1 program (what runner.run_all does)
vs one call of the same program with all 9 points stacked (H=9), interleaved.

usage: python scripts/ab_grid_batching.py TASK STEPS [ROUNDS]
"""
import sys
import time

import jax
import jax.numpy as jnp

from spmd_lopt.evaluation import runner, suite as suite_lib


def main():
  task, steps = sys.argv[1], int(sys.argv[2])
  rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 2
  entry = suite_lib.SuiteTask(task, suite_lib.TASKS[task][0], steps, suite_lib.TASKS[task][1])
  keys = jax.random.split(jax.random.key(0), 5)
  b = suite_lib.baselines()[0]
  fn = runner._program(entry, b, 5)
  singles = [jnp.asarray([pt], jnp.float32) for pt in b.grid]
  stacked = jnp.asarray(b.grid, jnp.float32)
  t0 = time.perf_counter()
  c1 = fn.lower(singles[0], keys).compile()
  t1 = time.perf_counter()
  c9 = fn.lower(stacked, keys).compile()
  t2 = time.perf_counter()
  print(f"{entry.label}: compile H=1 {t1 - t0:.1f} s, H=9 {t2 - t1:.1f} s", flush=True)
  for r in range(rounds):
    t, p = time.perf_counter(), time.process_time()
    outs1 = [jax.block_until_ready(c1(pt, keys)) for pt in singles]
    print(f"round {r} 9 calls H=1: {time.perf_counter() - t:.2f} s wall, "
          f"{time.process_time() - p:.2f} s CPU", flush=True)
    t, p = time.perf_counter(), time.process_time()
    out9 = jax.block_until_ready(c9(stacked, keys))
    print(f"round {r} 1 call  H=9: {time.perf_counter() - t:.2f} s wall, "
          f"{time.process_time() - p:.2f} s CPU", flush=True)
  for k in out9:
    d = max(float(jnp.nanmax(jnp.abs(o[k][0] - out9[k][i]))) for i, o in enumerate(outs1))
    print(k, "max |9 calls - stacked| =", d)


if __name__ == "__main__":
  main()
