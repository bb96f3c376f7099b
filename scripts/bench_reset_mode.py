"""Interleaved A/B timing of the truncated step's two reset modes ("cond" vs "select").

Times ``unroll`` of ``--steps`` inner steps of ``--num-tasks`` tasks (one jitted program
per mode, compiled first), alternating the modes ``--rounds`` times so machine load hits
both alike. Prints the median seconds per inner step of each mode, their ratio, and the
fraction of steps on which at least one task reset (when that is ~1, ``cond`` always
takes its reset branch).

  python scripts/bench_reset_mode.py --task ParametricImageMLP_Digits8 --num-tasks 8
"""

import argparse
import statistics
import time

import jax
import numpy as np

from spmd_lopt.learned_optimizers import mlp_lopt
from spmd_lopt.outer_trainers import estimator_base
from spmd_lopt.outer_trainers import lopt_truncated_step
from spmd_lopt.outer_trainers import truncation_schedule as ts
from spmd_lopt.tasks import registry


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  defaults = {"task": "ParametricImageMLP_Digits8", "num-tasks": 8, "steps": 50,
              "min-length": 10, "max-length": 50, "rounds": 7}
  for flag, default in defaults.items():
    p.add_argument(f"--{flag}", type=type(default), default=default)
  args = p.parse_args()

  lopt = mlp_lopt.MLPLOpt()
  theta = lopt.init(jax.random.key(0))
  outer = estimator_base.OuterState(np.int32(0))
  fns, states = {}, {}
  for mode in ("cond", "select"):
    step = lopt_truncated_step.VectorizedLOptTruncatedStep(
        registry.get_task_family(args.task), lopt,
        ts.LogUniformLengthSchedule(args.min_length, args.max_length),
        num_tasks=args.num_tasks, random_initial_iteration_offset=args.max_length,
        reset_mode=mode)
    states[mode] = step.init_step_state(theta, outer, jax.random.key(1))
    fns[mode] = jax.jit(
        lambda th, s, k, step=step: step.unroll(th, s, k, args.steps, outer))
    jax.block_until_ready(fns[mode](theta, states[mode], jax.random.key(2)))  # compile

  times = {"cond": [], "select": []}
  any_reset = None
  for r in range(args.rounds):
    order = ("cond", "select") if r % 2 == 0 else ("select", "cond")
    for mode in order:
      t0 = time.perf_counter()
      _, out = jax.block_until_ready(fns[mode](theta, states[mode], jax.random.key(3 + r)))
      times[mode].append((time.perf_counter() - t0) / args.steps)
      any_reset = float(np.mean(np.any(np.asarray(out.is_reset), axis=1)))
  med = {m: statistics.median(v) for m, v in times.items()}
  print(f"backend={jax.default_backend()} task={args.task} tasks={args.num_tasks} "
        f"steps={args.steps} lengths=[{args.min_length},{args.max_length}] "
        f"steps with a reset: {any_reset:.2f}")
  for m in ("cond", "select"):
    print(f"  {m:6s}: median {med[m] * 1e3:.3f} ms/step over {args.rounds} rounds")
  print(f"  select / cond = {med['select'] / med['cond']:.3f}")


if __name__ == "__main__":
  main()
