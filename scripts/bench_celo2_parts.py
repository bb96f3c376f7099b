"""Where a vmapped Celo2 step's time goes on one task (the suite's 11 x 5 layout).

usage: python scripts/bench_celo2_parts.py [TASK] [N]
"""
import sys
import time

import jax
import jax.numpy as jnp

from spmd_lopt.evaluation import suite as suite_lib
from spmd_lopt.learned_optimizers import celo2, specs


def timeit(name, f, *args, reps=3):
  t0 = time.perf_counter()
  c = jax.jit(f).lower(*args).compile()
  t1 = time.perf_counter()
  jax.block_until_ready(c(*args))
  best = 1e9
  for _ in range(reps):
    t2 = time.perf_counter()
    jax.block_until_ready(c(*args))
    best = min(best, time.perf_counter() - t2)
  print(f"{name}: compile {t1 - t0:.1f} s, run {1e3 * best:.1f} ms", flush=True)


def main():
  task_name = sys.argv[1] if len(sys.argv) > 1 else "TransformerLM_Copy8x8"
  n = int(sys.argv[2]) if len(sys.argv) > 2 else 55
  fam = suite_lib.TASKS[task_name][0]()
  task = fam.task_fn(fam.sample(jax.random.key(0)))
  keys = jax.random.split(jax.random.key(1), n)
  params = jax.vmap(task.init)(keys)
  print({jax.tree_util.keystr(p): x.shape[1:] for p, x in
         jax.tree_util.tree_flatten_with_path(params)[0]})
  batch = jax.vmap(lambda k: task.sample_batch(k, "train"))(keys)
  lopt, theta = specs.resolve("pretrained:celo2_digits")

  def grads(p, b):
    return jax.vmap(jax.grad(lambda q, d: task.loss(q, None, d)))(p, b)

  timeit("grad x1", grads, params, batch)
  g = grads(params, batch)
  for orth in (True, False):
    opt = celo2.Celo2(orthogonalize=orth).opt_fn(theta)

    def upd(p, g, opt=opt):
      def one(pp, gg):
        return opt.update(opt.init(pp), gg).params
      return jax.vmap(one)(p, g)
    timeit(f"celo2 update orth={orth} x1", upd, params, g)

  def ns(g):
    return [celo2.newton_schulz(x) for x in jax.tree.leaves(g) if x.ndim >= 3]
  timeit("newton_schulz all >=2-D leaves x1", ns, g)


if __name__ == "__main__":
  main()
