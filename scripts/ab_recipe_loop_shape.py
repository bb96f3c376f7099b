"""Interleaved A/B of the Celo2 recipe's loop shape on one CPU device.

The bench's recipe (``configs/bench/celo2_recipe.py``) is four PES estimators of 8 tasks on
the same ``synthetic8`` family, so one estimator of 32 tasks is exactly the "one scan over
all tasks" program. This builds the variants side by side in one process and calls them in
turn, so machine load hits all alike; it prints each one's median wall and CPU time per
outer iteration (3,200 inner steps).

  variants: A 4 estimators x 8 tasks, antithetic halves unstacked (the recipe);
            B 4 x 8, halves stacked; C 1 x 32 stacked; D 1 x 32 unstacked.

Command (docs/PERFORMANCE.md, round three):

  XLA_FLAGS=--xla_force_host_platform_device_count=1 PYTHONPATH=$PWD \\
      python scripts/ab_recipe_loop_shape.py --variants A,C,D --rounds 10
"""

import argparse
import time

import jax
import numpy as np

from spmd_lopt import sharding
from spmd_lopt.bench import config as bconfig
from spmd_lopt.bench import workloads

VARIANTS = {"A": (4, 8, False), "B": (4, 8, True), "C": (1, 32, True), "D": (1, 32, False)}


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--variants", default="A,B,C,D")
  ap.add_argument("--rounds", type=int, default=10)
  args = ap.parse_args()
  cfg = bconfig.load_config("configs/bench/celo2_recipe.py")
  mesh = sharding.make_mesh(num_devices=1)
  runs = {}
  for name in args.variants.split(","):
    num_estimators, num_tasks, stack = VARIANTS[name]
    cfg.stack_antithetic = stack
    learner, _ = workloads.build_learner(cfg, ["synthetic8"] * num_estimators, "pes",
                                         num_tasks, mesh)
    state = learner.init(sharding.replicate(jax.random.key(0), mesh))
    t0 = time.perf_counter()
    state = learner.update(state, sharding.replicate(jax.random.key(1), mesh))[0]
    jax.block_until_ready(state)
    print(f"{name}: {num_estimators} x {num_tasks} tasks, stacked={stack}: first call "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    runs[name] = [learner, state]
  times = {n: [] for n in runs}
  for r in range(args.rounds):
    for name, run in runs.items():
      key = sharding.replicate(jax.random.key(100 + r), mesh)
      jax.block_until_ready(key)
      t0, c0 = time.perf_counter(), time.process_time()
      run[1] = run[0].update(run[1], key)[0]
      jax.block_until_ready(run[1])
      times[name].append((time.perf_counter() - t0, time.process_time() - c0))
  for name, t in times.items():
    w = np.asarray(t)
    print(f"{name}: wall median {np.median(w[:, 0]):.3f} s [min {w[:, 0].min():.3f}], "
          f"CPU median {np.median(w[:, 1]):.3f} s")


if __name__ == "__main__":
  main()
