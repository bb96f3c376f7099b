"""Interleaved A/B: the Conv_Digits8_16x32 suite programs with the former nn.Conv ConvPool
(A) and the patch-matmul one (B), same process, alternating.

usage: python scripts/ab_conv.py STEPS EVAL_EVERY [adam|celo2] [ROUNDS]
The programs are the suite's (sweep_fn over 5 seeds; Adam one grid point, lr 1e-3; or
pretrained:celo2_digits x the 11 lr multipliers); eval_every 10 is the @300 entries' ratio.
"""
import sys
import time

import jax
import jax.numpy as jnp

from spmd_lopt import datasets as ds_lib
from spmd_lopt.evaluation import runner, suite as suite_lib
from spmd_lopt.evaluation.sweep import sweep_fn
from spmd_lopt.learned_optimizers import specs
from spmd_lopt.tasks import base as tasks_base
from spmd_lopt.tasks.fixed import conv
from spmd_lopt.tasks.fixed.classification import ImageClassificationTask


def main():
  steps, every = int(sys.argv[1]), int(sys.argv[2])
  which = sys.argv[3] if len(sys.argv) > 3 else "adam"
  rounds = int(sys.argv[4]) if len(sys.argv) > 4 else 2
  ds = ds_lib.digits8_datasets(128)
  fams = {"A nn.Conv": tasks_base.single_task_to_family(
              ImageClassificationTask(conv.ConvPool((16, 32), 10, patches=False), ds, name="convA")),
          "B patches": tasks_base.single_task_to_family(
              ImageClassificationTask(conv.ConvPool((16, 32), 10), ds, name="convB"))}
  keys = jax.random.split(jax.random.key(0), 5)
  if which == "adam":
    b = suite_lib.baselines()[0]
    make, point = (lambda h: b.make(*h)), jnp.asarray([[1e-3]], jnp.float32)
  else:
    lopt, theta = specs.resolve("pretrained:celo2_digits")
    mults = runner.lr_mult_grid(suite_lib.LOPT_LR_MULTS)
    grid = runner.LearnedLRGrid(lopt)
    make = lambda h: grid.make(*h)
    point = (jax.tree.map(lambda x: jnp.broadcast_to(jnp.asarray(x), (len(mults),)
                                                     + jnp.shape(x)), theta),
             jnp.asarray(mults, jnp.float32))
  compiled, outs = {}, {}
  for name, fam in fams.items():
    t0 = time.perf_counter()
    compiled[name] = jax.jit(sweep_fn(fam, make, steps, every, 5, runner.SPLITS)).lower(
        point, keys).compile()
    print(f"{which} {name}: compile {time.perf_counter() - t0:.1f} s", flush=True)
  for r in range(rounds):
    for name, c in compiled.items():
      t0, p0 = time.perf_counter(), time.process_time()
      outs[name] = jax.block_until_ready(c(point, keys))
      dt, dp = time.perf_counter() - t0, time.process_time() - p0
      print(f"{which} round {r} {name}: run {dt:.2f} s wall ({1e3 * dt / steps:.1f} "
            f"ms/step), {dp:.2f} s process CPU", flush=True)
  a, b = outs.values()
  for k in a:
    d = jnp.abs(a[k] - b[k]).reshape(a[k].shape[0], -1)
    print(k, "max |A - B| per grid point:", [f"{float(x):.2g}" for x in jnp.max(d, 1)],
          "| A final mean per grid point:",
          [f"{float(x):.3g}" for x in a[k].reshape(a[k].shape[0], -1, a[k].shape[-1])
           [:, :, -1].mean(1)])


if __name__ == "__main__":
  main()
