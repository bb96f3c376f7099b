"""The Celo2 recipe's two product-bound pieces timed alone, as one device runs them: the
floor they set for an outer iteration (``docs/PERFORMANCE.md``, round seven).

  PYTHONPATH=$PWD taskset -c 1 python scripts/celo2_kernel_floor.py

Each piece runs ``--steps`` times inside one ``lax.scan`` (as in the truncation's loop) on
``--lanes`` lanes (on 2 devices the recipe gives each device 4 lanes per scan: 8 tasks per
estimator, split over the devices, one scan per antithetic half):

- Newton-Schulz (``celo2.newton_schulz``, 5 iterations) of the 8x8 image MLP's two
  kernels, ``[lanes, 64, 32]`` and ``[lanes, 32, 10]``;
- Celo2's per-parameter MLP, 18 -> 8 -> 8 -> 3 with ReLU, weights as the left operand (as
  ``celo2._mlp_direction`` runs it), on the 2,048 + 320 kernel entries;
- a loop of tiny ``[4, 4]`` products, for the runtime's cost per executed op (thunk).

It prints microseconds per step and what that would be per outer iteration of the recipe
(``4 x 8 x 2 x 50 = 3,200`` lane-steps) on ``--cores`` cores at that rate. Pin it to one
core to read one core's rate.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from spmd_lopt.learned_optimizers import celo2

HIGHEST = jax.lax.Precision.HIGHEST
LANE_STEPS = 4 * 8 * 2 * 50


def timed_scan(body, carry, steps: int, reps: int) -> float:
  """Median microseconds per scan step of ``body`` over ``reps`` timed calls."""
  run = jax.jit(lambda c: jax.lax.scan(lambda c, _: (body(c), None), c, None,
                                       length=steps)[0])
  jax.block_until_ready(run(carry))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(run(carry))
    times.append((time.perf_counter() - t0) / steps * 1e6)
  return statistics.median(times)


def mlp(w, x):
  """``[lanes, 3, e]`` from features ``x: [lanes, 18, e]``: Celo2's MLP layout."""
  w0, b0, w1, b1, w2, b2 = w
  dot = lambda a, b: jax.lax.dot_general(a, b, (((2,), (1,)), ((0,), (0,))),
                                         precision=HIGHEST)
  h = jax.nn.relu(dot(w0, x) + b0)
  h = jax.nn.relu(dot(w1, h) + b1)
  return dot(w2, h) + b2


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--lanes", type=int, default=4)
  ap.add_argument("--steps", type=int, default=50)
  ap.add_argument("--reps", type=int, default=9)
  ap.add_argument("--cores", type=int, default=2)
  args = ap.parse_args()
  keys = jax.random.split(jax.random.key(0), 8)
  n = args.lanes

  def report(name, us, per_lane=True):
    line = f"{name}: {us:.1f} us per step"
    if per_lane:
      per_iter = us / n * LANE_STEPS / args.cores / 1e3
      line += (f" ({us / n:.1f} us per lane-step; {per_iter:.1f} ms per outer iteration on "
               f"{args.cores} cores at this rate)")
    print(line, flush=True)

  kernels = [jax.random.normal(keys[0], (n, 64, 32)), jax.random.normal(keys[1], (n, 32, 10))]
  report("Newton-Schulz, both kernels",
         timed_scan(lambda c: [celo2.newton_schulz(x) * 1.0001 for x in c], kernels,
                    args.steps, args.reps))

  w = (jax.random.normal(keys[2], (n, 8, 18)), jnp.zeros((n, 8, 1)),
       jax.random.normal(keys[3], (n, 8, 8)), jnp.zeros((n, 8, 1)),
       jax.random.normal(keys[4], (n, 3, 8)), jnp.zeros((n, 3, 1)))
  feats = [jax.random.normal(keys[5], (n, 18, e)) for e in (2048, 320)]
  report("Celo2's MLP, 2,048 + 320 entries",
         timed_scan(lambda c: [x + 1e-3 * mlp(w, x)[:, :1] for x in c], feats,
                    args.steps, args.reps))

  ops = 40
  def tiny(x):
    for _ in range(ops):
      x = jnp.dot(x, x) * 0.5
    return x
  us = timed_scan(tiny, jnp.eye(4), args.steps * 4, args.reps)
  report(f"one [4, 4] product and a scale (2 thunks), x{ops}", us, per_lane=False)
  print(f"  -> {us / ops / 2:.2f} us per executed op")


if __name__ == "__main__":
  main()
