"""Time one suite entry's programs: compile and run separately.

usage: python scripts/bench_suite_entry.py TASK STEPS [adam|celo2|both] [seeds]
Prints, per program, the compile seconds (lower + compile) and the run seconds (one call,
blocked), for the Adam program (one grid point, lr 1e-3) and the pretrained:celo2_digits
program with all of the suite's lr multipliers (one vmapped program, as runner does).
"""
import sys
import time

import jax
import jax.numpy as jnp

from spmd_lopt.evaluation import runner, suite as suite_lib
from spmd_lopt.learned_optimizers import specs


def time_program(entry, optimizer, point, keys, eval_batches=5):
  fn = runner._program(entry, optimizer, eval_batches)
  t0 = time.perf_counter()
  compiled = fn.lower(point, keys).compile()
  t1, p1 = time.perf_counter(), time.process_time()
  jax.block_until_ready(compiled(point, keys))
  t2, p2 = time.perf_counter(), time.process_time()
  print(f"  (run: {p2 - p1:.1f} s process CPU)", flush=True)
  return t1 - t0, t2 - t1


def main():
  task, steps = sys.argv[1], int(sys.argv[2])
  which = sys.argv[3] if len(sys.argv) > 3 else "both"
  seeds = int(sys.argv[4]) if len(sys.argv) > 4 else 5
  entry = suite_lib.SuiteTask(task, suite_lib.TASKS[task][0], steps, suite_lib.TASKS[task][1])
  keys = jax.random.split(jax.random.key(0), seeds)
  if which in ("adam", "both"):
    b = suite_lib.baselines()[0]
    c, r = time_program(entry, b, jnp.asarray([[1e-3]], jnp.float32), keys)
    print(f"{task}@{steps} Adam x1 seeds={seeds}: compile {c:.1f} s, run {r:.1f} s "
          f"({1e3 * r / steps:.1f} ms/step)", flush=True)
  if which in ("celo2", "both"):
    lopt, theta = specs.resolve("pretrained:celo2_digits")
    mults = runner.lr_mult_grid(suite_lib.LOPT_LR_MULTS)
    point = (jax.tree.map(lambda x: jnp.broadcast_to(jnp.asarray(x), (len(mults),)
                                                     + jnp.shape(x)), theta),
             jnp.asarray(mults, jnp.float32))
    c, r = time_program(entry, runner.LearnedLRGrid(lopt), point, keys)
    print(f"{task}@{steps} celo2_digits x{len(mults)} seeds={seeds}: compile {c:.1f} s, "
          f"run {r:.1f} s ({1e3 * r / steps:.1f} ms/step)", flush=True)


if __name__ == "__main__":
  main()
