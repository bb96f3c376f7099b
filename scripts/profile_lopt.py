"""Cost and time of one learned-optimizer step, per optimizer and parameter tree.

  PYTHONPATH=$PWD python scripts/profile_lopt.py                     # table
  PYTHONPATH=$PWD python scripts/profile_lopt.py --baseline old.py   # interleaved A/B

For each optimizer (Celo2, Celo2Base, MLPLOpt, AdafacMLPLOpt) and tree it prints XLA's
cost analysis of the jitted ``update`` (FLOPs, bytes accessed: load-independent) and the
median wall time of ``--reps`` calls. Trees: ``mlp`` (the 64-32-10 image MLP, 2,410
parameters), ``mlp_x16`` (that MLP vmapped over 16 tasks, as the truncated step runs it)
and ``big`` (~0.93M parameters: a 3x3x64x128 conv kernel, 512x1024, 1024x256, 128x512 and
256x10 matrices and their biases).

``--baseline FILE`` loads FILE as a second version of ``--module`` (default ``celo2``; e.g.
``git show HEAD~1:spmd_lopt/learned_optimizers/celo2.py``) and times old and new steps
alternately (A B A B ...), printing both medians and the median of the pairwise ratios.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from spmd_lopt.learned_optimizers import adafac_mlp_lopt, celo2, mlp_lopt


def make_tree(name: str, key: jax.Array):
  shapes = {
      "mlp": {"w0": (64, 32), "b0": (32,), "w1": (32, 10), "b1": (10,)},
      "big": {"conv": (3, 3, 64, 128), "conv_b": (128,), "fc1": (512, 1024),
              "fc1_b": (1024,), "fc2": (1024, 256), "fc2_b": (256,), "proj": (128, 512),
              "head": (256, 10), "head_b": (10,)},
  }[name]
  keys = jax.random.split(key, len(shapes))
  return {k: jax.random.normal(kk, s, jnp.float32) for kk, (k, s) in zip(keys, shapes.items())}


MODULES = {"celo2": celo2, "mlp_lopt": mlp_lopt, "adafac_mlp_lopt": adafac_mlp_lopt}


def optimizers(**modules):
  """Each optimizer from ``modules[name]`` when given (an older version), else ours."""
  mods = dict(MODULES, **modules)
  return {
      "Celo2": lambda: mods["celo2"].Celo2(),
      "Celo2Base": lambda: mods["celo2"].Celo2Base(),
      "MLPLOpt": lambda: mods["mlp_lopt"].MLPLOpt(),
      "AdafacMLPLOpt": lambda: mods["adafac_mlp_lopt"].AdafacMLPLOpt(),
  }


def build(lopt, tree_name: str):
  """A jitted ``(opt_state, grads) -> opt_state`` and its arguments."""
  key = jax.random.key(0)
  theta = lopt.init(key)
  opt = lopt.opt_fn(theta)
  base = "mlp" if tree_name == "mlp_x16" else tree_name
  params = make_tree(base, jax.random.key(1))
  grads = make_tree(base, jax.random.key(2))
  step = lambda s, g: opt.update(s, g)
  if tree_name == "mlp_x16":
    stack = lambda t: jax.tree.map(lambda x: jnp.stack([x * (1 + 0.01 * i) for i in range(16)]),
                                   t)
    params, grads = stack(params), stack(grads)
    state = jax.vmap(lambda p: opt.init(p, num_steps=100))(params)
    step = jax.vmap(step)
  else:
    state = opt.init(params, num_steps=100)
  # A few steps first, so the accumulators are not all zero.
  fn = jax.jit(step)
  for _ in range(3):
    state = fn(state, grads)
  return fn, state, grads


def cost(fn, *args):
  c = fn.lower(*args).compile().cost_analysis()
  c = c[0] if isinstance(c, (list, tuple)) else c
  return c.get("flops", float("nan")), c.get("bytes accessed", float("nan"))


def timeit(fn, args, reps):
  out = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    out.append(time.perf_counter() - t)
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--trees", default="mlp,mlp_x16,big")
  ap.add_argument("--opts", default="Celo2,Celo2Base,MLPLOpt,AdafacMLPLOpt")
  ap.add_argument("--reps", type=int, default=10)
  ap.add_argument("--baseline", default=None, help="an older module file to A/B against")
  ap.add_argument("--module", default="celo2", choices=sorted(MODULES),
                  help="which module --baseline is a version of")
  args = ap.parse_args()
  trees, names = args.trees.split(","), args.opts.split(",")

  if args.baseline is None:
    print(f"{'optimizer':14s} {'tree':8s} {'MFLOP':>10s} {'MB acc':>9s} {'ms (median)':>12s}")
    for name in names:
      for tree in trees:
        fn, state, grads = build(optimizers()[name](), tree)
        flops, nbytes = cost(fn, state, grads)
        ms = 1e3 * statistics.median(timeit(fn, (state, grads), args.reps))
        print(f"{name:14s} {tree:8s} {flops / 1e6:10.2f} {nbytes / 1e6:9.2f} {ms:12.3f}",
              flush=True)
    return

  spec = importlib.util.spec_from_file_location("celo2_baseline", args.baseline)
  old = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = old  # dataclasses look their module up there
  spec.loader.exec_module(old)
  print(f"{'optimizer':10s} {'tree':8s} {'MFLOP old/new':>17s} {'MB old/new':>15s} "
        f"{'ms old':>8s} {'ms new':>8s} {'ratio':>6s}")
  for name in names:
    for tree in trees:
      fa, sa, ga = build(optimizers(**{args.module: old})[name](), tree)
      fb, sb, gb = build(optimizers()[name](), tree)
      (fla, bya), (flb, byb) = cost(fa, sa, ga), cost(fb, sb, gb)
      ta, tb = [], []
      for _ in range(args.reps):
        ta += timeit(fa, (sa, ga), 1)
        tb += timeit(fb, (sb, gb), 1)
      ratio = statistics.median([a / b for a, b in zip(ta, tb)])
      print(f"{name:10s} {tree:8s} {pair_fmt(fla, flb):>17s} {pair_fmt(bya, byb):>15s} "
            f"{1e3 * statistics.median(ta):8.2f} {1e3 * statistics.median(tb):8.2f} "
            f"{ratio:6.2f}", flush=True)


def pair_fmt(a, b):
  return f"{a / 1e6:.1f}/{b / 1e6:.1f}"


if __name__ == "__main__":
  main()
