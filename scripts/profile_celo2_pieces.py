"""One inner step of the Celo2 recipe (8 synthetic 8x8 image-MLP tasks, per-task theta as
under PES) split into pieces, each jitted alone: XLA FLOPs / bytes, top-level fusions and
interleaved wall times, for ``celo2.py`` now and at git revision ``--rev``.

  PYTHONPATH=$PWD python scripts/profile_celo2_pieces.py --rev 4e17453 --reps 40
  PYTHONPATH=$PWD python scripts/profile_celo2_pieces.py --ops 30   # + per-op profile

``--ops N`` also traces N calls of the current whole inner step with ``jax.profiler`` and
prints the CPU runtime's per-op (thunk) times, summed over threads, read back with jax's
own ``ProfileData`` (no TensorBoard needed).
"""

from __future__ import annotations

import argparse
import collections
import glob
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time


def load_rev(rev: str):
  """``spmd_lopt/learned_optimizers/celo2.py`` at ``rev`` as a module."""
  src = subprocess.run(["git", "show", f"{rev}:spmd_lopt/learned_optimizers/celo2.py"],
                       check=True, capture_output=True, text=True).stdout
  path = os.path.join(tempfile.mkdtemp(prefix="celo2_rev_"), "celo2_old.py")
  with open(path, "w") as f:
    f.write(src)
  spec = importlib.util.spec_from_file_location("celo2_old", path)
  mod = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = mod  # flax dataclasses look their module up there
  spec.loader.exec_module(mod)
  return mod


def op_times(fn, args, reps: int):
  """``{op name: ns per call}`` from a ``jax.profiler`` trace of ``reps`` calls."""
  import jax  # pylint: disable=import-outside-toplevel
  from jax._src.lib import _profile_data  # pylint: disable=import-outside-toplevel,protected-access
  out = tempfile.mkdtemp(prefix="celo2_trace_")
  jax.block_until_ready(fn(*args))
  with jax.profiler.trace(out):
    for _ in range(reps):
      jax.block_until_ready(fn(*args))
  data = _profile_data.ProfileData.from_file(
      glob.glob(f"{out}/**/*.xplane.pb", recursive=True)[0])
  tot = collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      if "XLAEigen" not in line.name:  # the CPU runtime's worker threads
        continue
      for ev in line.events:
        if "ThunkExecutor" not in ev.name:
          tot[ev.name] += ev.duration_ns / reps
  return tot


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--rev", default=None, help="also time celo2.py at this git revision")
  ap.add_argument("--tasks", type=int, default=8)
  ap.add_argument("--reps", type=int, default=40)
  ap.add_argument("--ops", type=int, default=0, help="per-op profile over this many calls")
  args = ap.parse_args()
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from spmd_lopt import inner_step, sharding, xla_options  # pylint: disable=C0415
  from spmd_lopt.bench import cost_model, workloads  # pylint: disable=C0415
  from spmd_lopt.learned_optimizers import celo2, common  # pylint: disable=C0415

  n = args.tasks
  fam, _ = workloads.make_family("synthetic8", 64)
  theta = celo2.init_theta(jax.random.key(0))
  thetas = jax.tree.map(lambda t: t[None] + 0.01 * jax.random.normal(
      jax.random.key(3), (n,) + t.shape), theta)
  keys = jax.random.split(jax.random.key(1), n)
  tps = jax.vmap(fam.sample)(keys)
  ost = jax.vmap(lambda th, tp, k: celo2.Celo2().opt_fn(th).init(
      *fam.task_fn(tp).init_with_state(k), num_steps=100))(thetas, tps, keys)

  def grads_fn(tp, p, k):
    task = fam.task_fn(tp)
    batch = task.sample_batch(k, "train")
    return jax.value_and_grad(lambda q: task.loss_with_state(q, None, k, batch)[0])(p)

  grads = jax.tree.leaves(jax.vmap(grads_fn)(tps, ost.params, keys)[1])
  params = jax.tree.leaves(ost.params)  # the learned rule's state is over the leaf list

  def accumulators(acc, g):
    g = [jnp.clip(x, -celo2.GRAD_CLIP, celo2.GRAD_CLIP) for x in g]
    return (common.momentum_update(acc.momentum, g, celo2.MOMENTUM_DECAYS),
            common.rms_update(acc.rms, g, (celo2.RMS_DECAY,)),
            common.factored_update(acc.factored, g, celo2.ADAFACTOR_DECAYS))

  pieces = {
      "batch draw": (jax.vmap(lambda tp, k: fam.task_fn(tp).sample_batch(k, "train")),
                     (tps, keys)),
      "task fwd+bwd (incl. batch)": (jax.vmap(grads_fn), (tps, ost.params, keys)),
      "accumulators": (jax.vmap(accumulators), (ost.learned, grads)),
      "newton-schulz": (jax.vmap(lambda g: [celo2.newton_schulz(x) for x in g
                                            if x.ndim >= 2]), (grads,)),
  }
  versions = {"new": celo2}
  if args.rev:
    versions = {"old": load_rev(args.rev), "new": celo2}
  for tag, mod in versions.items():
    for ortho, what in ((False, "celo2-base rule"), (True, "celo2 rule")):
      pieces[f"{tag} {what}"] = (jax.vmap(
          lambda th, a, g, p, mod=mod, o=ortho: mod.accumulate_and_step(th, a, g, p, o)),
          (thetas, ost.learned, grads, params))
    pieces[f"{tag} inner step"] = (jax.vmap(
        lambda th, o, tp, k, mod=mod: inner_step.train_step(
            fam.task_fn(tp), mod.Celo2().opt_fn(th), o, k)[0]), (thetas, ost, tps, keys))

  # As the learner compiles Celo2's meta step (Celo2.cpu_library_graphs).
  opts = xla_options.step_options(sharding.make_mesh(num_devices=1),
                                  library_graphs=celo2.Celo2.cpu_library_graphs)
  compiled = {}
  for name, (fn, fargs) in pieces.items():
    c = jax.jit(fn).lower(*fargs).compile(opts)
    cost = cost_model.xla_cost(c)
    fusions = c.as_text().split("ENTRY")[1].count(" fusion(")
    compiled[name] = (c, fargs)
    print(f"{name:28s} {cost['flops'] / 1e6:7.2f} MFLOP {cost['bytes'] / 1e6:7.2f} MB "
          f"top-level fusions {fusions}")
  times = {name: [] for name in compiled}
  for rep in range(args.reps + 1):
    for name, (c, fargs) in compiled.items():
      t0 = time.perf_counter()
      jax.block_until_ready(c(*fargs))
      if rep:  # the first call may still allocate
        times[name].append(time.perf_counter() - t0)
  for name, ts in times.items():
    print(f"{name:28s} median {1e3 * statistics.median(ts):7.3f} ms  min {1e3 * min(ts):7.3f}")
  print(f"(loaded: load average {os.getloadavg()[0]:.1f})")
  if args.ops:
    c, fargs = compiled["new inner step"]
    tot = op_times(c, fargs, args.ops)
    total = sum(tot.values())
    print(f"per-op time of the new inner step: {total / 1e3:.1f} us per call, summed over "
          "threads")
    for name, ns in tot.most_common(30):
      print(f"{ns / 1e3:9.1f} us {100 * ns / total:5.1f}%  {name}")


if __name__ == "__main__":
  main()
