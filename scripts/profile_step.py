"""Load-independent profile of one fused meta step, and interleaved A/B against an older
version of the step's modules.

  PYTHONPATH=$PWD python scripts/profile_step.py --workload quadratic --tasks 64
  PYTHONPATH=$PWD python scripts/profile_step.py --workload image_mlp --tasks 16 \\
      --baseline_rev HEAD~1 --reps 15

For the bench workload ``--workload`` (``quadratic``, ``image_mlp``, or ``a,b`` for one
learner with one estimator per family), PES with MLPLOpt, ``--tasks`` tasks per estimator
on ``--devices`` virtual CPU devices, trunc_length 50 (the tutorial bench's settings), it
prints for each version:

- XLA's cost analysis of the compiled ``update`` (FLOPs and bytes accessed, loop bodies
  counted once, as XLA does) and ``memory_analysis`` (temporaries, arguments);
- executed ops per inner step: the top-level HLO instructions of the truncation scan's
  body (on CPU each is one runtime thunk), a nested ``while`` counted ``trip count`` times
  and a ``conditional`` (the reset branch) by its larger branch;
- with ``--reps``: the step time, versions alternated call by call (A B A B ...): medians
  of wall time and of process CPU time (less sensitive to other jobs on a loaded machine)
  and the medians of the pairwise ratios old / new.

``--baseline_rev REV`` loads ``mlp_lopt.py``, ``lopt_truncated_step.py``,
``truncated_pes.py`` and ``inner_step.py`` as they were at git revision ``REV`` and builds
the same learner from them (the old classes swapped onto freshly built objects), so both
versions run in one process on the same machine load. The learner itself (and so its
compiler options, ``spmd_lopt.xla_options``) is the current one for both.
``--options k=v,...`` adds a version compiled with extra XLA compiler options (several
versions separated by ``;``);
``--also_lopts a,b`` adds the same workload with other learned optimizers (each with the
compile options the learner picks for it): a rule with no per-parameter work
(``learnable_sgd``) gives the step's floor, the estimator and the task alone;
``--unrolled_threefry`` one compiled with jax's non-CPU (unrolled) threefry lowering;
``--baseline_all_options`` compiles it with them whatever the tasks' tensor sizes (the
learner's behaviour before ``step_options``' size gate);
``--baseline_without_options`` compiles the old version without those options (with
``--baseline_rev HEAD``: an A/B of the options alone).
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

OLD_MODULES = {  # module name -> path in the repository
    "inner_step": "spmd_lopt/inner_step.py",
    "mlp_lopt": "spmd_lopt/learned_optimizers/mlp_lopt.py",
    "lopt_truncated_step": "spmd_lopt/outer_trainers/lopt_truncated_step.py",
    "truncated_pes": "spmd_lopt/outer_trainers/truncated_pes.py",
    "celo2": "spmd_lopt/learned_optimizers/celo2.py",
}


def build_parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--workload", default="quadratic")
  ap.add_argument("--tasks", type=int, default=64)
  ap.add_argument("--devices", type=int, default=1)
  ap.add_argument("--trunc_length", type=int, default=50)
  ap.add_argument("--lopt", default="mlp_lopt")
  ap.add_argument("--bench_config", default="configs/bench/tutorial.py",
                  help="the bench config whose settings build the learner (batch size, "
                       "lengths, std, stack_antithetic, ...); e.g. "
                       "configs/bench/celo2_recipe.py")
  ap.add_argument("--recipe", action="store_true",
                  help="the Celo2 recipe: --bench_config configs/bench/celo2_recipe.py, its "
                       "workloads (4 x synthetic8), its lopt (celo2) and 8 tasks per "
                       "estimator, unless given")
  ap.add_argument("--reps", type=int, default=0, help="timed calls per version")
  ap.add_argument("--calls", type=int, default=1, help="update calls per timed sample")
  ap.add_argument("--baseline_rev", default=None)
  ap.add_argument("--hlo_out", default=None, help="write each version's HLO here")
  ap.add_argument("--options", default=None,
                  help="a third version: ours compiled with these XLA compiler options, "
                       "'name=value,...' (e.g. xla_cpu_small_while_loop_byte_threshold=1e6); "
                       "';' separates several versions")
  ap.add_argument("--also_lopts", default=None,
                  help="more versions: the same workload with these learned optimizers "
                       "('a,b', registry names), e.g. learnable_sgd for the step's floor")
  ap.add_argument("--baseline_all_options", action="store_true",
                  help="compile the old version with spmd_lopt.xla_options' options whatever "
                       "the tasks' sizes (before the size gate of step_options)")
  ap.add_argument("--baseline_without_options", action="store_true",
                  help="compile the old version without spmd_lopt.xla_options' options")
  ap.add_argument("--stack_variant", action="store_true",
                  help="a version of the current code with the bench config's "
                       "stack_antithetic flipped (PES halves in one scan vs two)")
  ap.add_argument("--unrolled_threefry", action="store_true",
                  help="a version compiled with jax's unrolled (non-CPU) threefry lowering")
  return ap


def parse_args():
  ap = build_parser()
  args = ap.parse_args()
  apply_recipe(args, ap)
  return args


class unrolled_threefry:  # pylint: disable=invalid-name
  """Inside: jax lowers threefry2x32 on CPU as on other platforms (5 unrolled rounds)
  instead of its CPU rule (a rolled 5-trip ``while`` loop). Experiment only (private
  jax API)."""

  # pylint: disable=import-outside-toplevel,protected-access
  def __enter__(self):
    from jax._src.interpreters import mlir
    from jax._src.random import threefry2x32 as tf
    self._mlir, self._tf = mlir, tf
    mlir.register_lowering(tf.threefry2x32_p, tf._threefry2x32_lowering_rule,
                           platform="cpu")

  def __exit__(self, *exc):
    self._mlir.register_lowering(self._tf.threefry2x32_p,
                                 self._tf._threefry2x32_cpu_lowering_rule, platform="cpu")


def load_old_modules(rev: str):
  """The modules of ``OLD_MODULES`` at git revision ``rev``, cross-wired to each other."""
  tmp = tempfile.mkdtemp(prefix="profile_step_")
  mods = {}
  for name, path in OLD_MODULES.items():
    src = subprocess.run(["git", "show", f"{rev}:{path}"], check=True, capture_output=True,
                         text=True).stdout
    file = os.path.join(tmp, f"old_{name}.py")
    with open(file, "w") as f:
      f.write(src)
    spec = importlib.util.spec_from_file_location(f"old_{name}", file)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # flax dataclasses look their module up there
    spec.loader.exec_module(mod)
    mods[name] = mod
  # The old truncated step must call the old inner step.
  mods["lopt_truncated_step"].inner_step = mods["inner_step"]
  return mods


def build(args, mesh, old=None, flip_stack=False, lopt=None):
  """``(learner, state)`` for the workload; with ``old`` modules, the old classes; with
  ``lopt``, that learned optimizer instead of ``args.lopt``."""
  import jax  # pylint: disable=import-outside-toplevel
  from spmd_lopt import sharding  # pylint: disable=import-outside-toplevel
  from spmd_lopt.bench import config, workloads  # pylint: disable=import-outside-toplevel
  bcfg = config.load_config(args.bench_config)
  bcfg.trunc_length = args.trunc_length
  bcfg.lopt = lopt or args.lopt
  if flip_stack:
    bcfg.stack_antithetic = not bcfg.stack_antithetic
  lrn, _ = workloads.build_learner(bcfg, args.workload.split(","), "pes", args.tasks, mesh)
  if old is not None:
    lopt = lrn.learned_opt if hasattr(lrn, "learned_opt") else None
    lopts = {id(e.truncated_step.learned_opt): e.truncated_step.learned_opt
             for e in lrn.gradient_estimators}
    if lopt is not None:
      lopts[id(lopt)] = lopt
    for lo in lopts.values():
      if type(lo).__name__ == "MLPLOpt":
        lo.__class__ = old["mlp_lopt"].MLPLOpt
      elif type(lo).__name__ in ("Celo2", "Celo2Base"):
        lo.__class__ = getattr(old["celo2"], type(lo).__name__)
    for est in lrn.gradient_estimators:
      est.__class__ = getattr(old["truncated_pes"], type(est).__name__)
      step = est.truncated_step
      step.__class__ = getattr(old["lopt_truncated_step"], type(step).__name__)
  state = lrn.init(sharding.replicate(jax.random.key(0), mesh))
  return lrn, state


_FREE = {"parameter", "get-tuple-element", "tuple", "constant", "bitcast"}
_OPCODE = re.compile(r"\s([a-z][a-z0-9\-]*)\(")


def parse_hlo(text: str):
  """``{computation: [(opcode, line)]}`` of an optimized HLO module's text."""
  comps, name = {}, None
  for line in text.splitlines():
    m = re.match(r"^(?:ENTRY\s+)?%?([\w.\-]+) \(.*\{\s*$", line)
    if m:
      name = m.group(1)
      comps[name] = []
    elif line.startswith("}"):
      name = None
    elif name is not None and " = " in line:
      mo = _OPCODE.search(line.split(" = ", 1)[1])
      if mo:
        comps[name].append((mo.group(1), line))
  return comps


def executed_ops(comps, name: str, seen=(), pick=max) -> collections.Counter:
  """Top-level ops one run of computation ``name`` executes (free ones excluded): each
  nested ``while`` counts its condition and body ``known_trip_count`` times, and a
  ``conditional`` the branch that ``pick`` (``max`` or ``min``, by op count) chooses (on
  CPU each top-level op is one runtime thunk)."""
  out = collections.Counter()
  for op, line in comps.get(name, []):
    if op in _FREE:
      continue
    out[op] += 1
    if op == "while" and name not in seen:
      trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
      n = int(trips.group(1)) if trips else 1
      for part in ("condition", "body"):
        mc = re.search(part + r"=%?([\w.\-]+)", line)
        if mc:
          for k, v in executed_ops(comps, mc.group(1), seen + (name,), pick).items():
            out[k] += n * v
    elif op == "conditional":
      branches = re.findall(r"%([\w.\-]+)", line.split("branch_computations=")[-1]
                            if "branch_computations=" in line else
                            " ".join(re.findall(r"(?:true|false)_computation=%?[\w.\-]+",
                                                line)))
      best = pick((executed_ops(comps, b, seen + (name,), pick) for b in branches
                   if b in comps), key=lambda c: sum(c.values()), default=None)
      if best:
        out.update(best)
  return out


def hlo_op_counts(text: str, pick=max):
  """Per ``while`` loop of the module: ``(body name, trip count, executed ops of one
  iteration)``, largest first (the truncation's inner step is the scan of
  trip count trunc_length); conditionals counted by ``pick``'s branch (see
  ``executed_ops``)."""
  return while_loop_ops(parse_hlo(text), pick)


def while_loop_ops(comps, pick=max):
  """``hlo_op_counts`` of a module already parsed by ``parse_hlo``."""
  out = []
  for instrs in comps.values():
    for op, line in instrs:
      if op == "while":
        mb = re.search(r"body=%?([\w.\-]+)", line)
        trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
        out.append((mb.group(1), int(trips.group(1)) if trips else -1,
                    executed_ops(comps, mb.group(1), pick=pick)))
  out.sort(key=lambda x: -sum(x[2].values()))
  return out


def parse_options(text):
  out = {}
  for item in filter(None, (text or "").split(",")):
    k, v = item.split("=", 1)
    try:
      out[k] = int(float(v)) if float(v) == int(float(v)) else float(v)
    except ValueError:
      out[k] = {"true": True, "false": False}.get(v.lower(), v)
  return out


def option_versions(text):
  """``--options``' versions: ``{tag: options}``, one per ``;``-separated item; the tag is
  ``opts`` for a single item (as before) and ``opts:<item>`` for several."""
  items = [item for item in (text or "").split(";") if item.strip()]
  if len(items) == 1:
    return {"opts": parse_options(items[0])}
  return {f"opts:{item}": parse_options(item) for item in items}


def describe(tag, lrn, state, args, options=None):
  """Prints the XLA figures of ``lrn``'s compiled update; returns the executable."""
  import jax  # pylint: disable=import-outside-toplevel
  from spmd_lopt.bench import cost_model  # pylint: disable=import-outside-toplevel
  compiled = lrn.lower_update(state, jax.random.key(1)).compile(options)
  c = cost_model.xla_cost(compiled)
  mem = cost_model.memory(compiled)
  text = compiled.as_text()
  if args.hlo_out:
    with open(f"{args.hlo_out}.{tag}.hlo", "w") as f:
      f.write(text)
  comps = parse_hlo(text)
  top = collections.Counter(op for instrs in comps.values() for op, _ in instrs)
  print(f"[{tag}] XLA (loop bodies once): {c['flops'] / 1e6:.2f} MFLOP, "
        f"{c['bytes'] / 1e6:.2f} MB accessed; memory temp {mem.get('temp', 0) / 1e6:.2f} MB, "
        f"args {mem.get('argument', 0) / 1e6:.2f} MB; HLO: {top['fusion']} fusions, "
        f"{top['while']} whiles, {top['dot']} dots, {top['custom-call']} custom-calls, "
        f"{top['conditional']} conditionals, {len(text.splitlines())} lines")
  least = {body: sum(cnt.values()) for body, _, cnt in while_loop_ops(comps, pick=min)}
  for body, trips, cnt in while_loop_ops(comps)[:2]:
    n = sum(cnt.values())
    named = ("fusion", "dot", "custom-call", "while", "conditional", "copy")
    other = n - sum(cnt[k] for k in named)
    # A step whose common branch is cheap (no task resets) runs the smaller count.
    fewest = (f"; {least[body]} when every conditional takes its smallest branch"
              if least.get(body, n) != n else "")
    print(f"[{tag}]   loop x{trips}: {n} ops executed per iteration ("
          + ", ".join(f"{k} {cnt[k]}" for k in named) + f", other {other}){fewest}")
  return compiled


# --recipe: the Celo2 recipe's bench config, workloads, learned optimizer and tasks.
RECIPE = {"bench_config": "configs/bench/celo2_recipe.py",
          "workload": "synthetic8,synthetic8,synthetic8,synthetic8",
          "lopt": "celo2", "tasks": 8}


_UNSET = object()


def apply_recipe(args, parser, argv=None) -> None:
  """With ``--recipe``, ``RECIPE``'s values for the flags not given on the command line
  (``argv``, default ``sys.argv[1:]``); a flag given with its default value is kept (an
  explicit ``--lopt mlp_lopt`` stays MLPLOpt)."""
  if not args.recipe:
    return
  defaults = {name: parser.get_default(name) for name in RECIPE}
  parser.set_defaults(**{name: _UNSET for name in RECIPE})
  try:
    given = parser.parse_args(argv)
  finally:
    parser.set_defaults(**defaults)
  for name, value in RECIPE.items():
    if getattr(given, name) is _UNSET:
      setattr(args, name, value)


def main():
  args = parse_args()
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={args.devices}")
  import jax  # pylint: disable=import-outside-toplevel
  from spmd_lopt import sharding  # pylint: disable=import-outside-toplevel
  mesh = sharding.make_mesh(num_devices=args.devices)
  versions = {}
  if args.baseline_rev:
    versions["old"] = build(args, mesh, load_old_modules(args.baseline_rev))
  versions["new"] = build(args, mesh)
  options = option_versions(args.options)
  for tag in options:
    versions[tag] = build(args, mesh)
  for name in filter(None, (args.also_lopts or "").split(",")):
    versions[f"lopt:{name}"] = build(args, mesh, lopt=name)
  if args.unrolled_threefry:
    versions["unrolled"] = build(args, mesh)
  if args.stack_variant:
    versions["stack_flipped"] = build(args, mesh, flip_stack=True)
  calls = {}
  for tag, (lrn, state) in versions.items():
    opts = options.get(tag)
    if tag == "unrolled":
      with unrolled_threefry():
        compiled = describe(tag, lrn, state, args, opts)
    elif tag == "old" and (args.baseline_without_options or args.baseline_all_options):
      from spmd_lopt import xla_options  # pylint: disable=import-outside-toplevel
      # The learner's jits are made (and kept) at the first compile, from this attribute.
      lrn.compiler_options = ({} if args.baseline_without_options
                              else xla_options.step_options(mesh))
      compiled = describe(tag, lrn, state, args, opts)
    else:
      compiled = describe(tag, lrn, state, args, opts)
    if opts or tag == "unrolled":
      ds = lrn._datasets  # pylint: disable=protected-access
      calls[tag] = lambda s, k, c=compiled, ds=ds, m=mesh: c(
          s, sharding.replicate(k, m), None, ds)[0]
    else:
      calls[tag] = lambda s, k, lrn=lrn: lrn.update(s, k)[0]
  if args.reps <= 0:
    return
  keys = jax.random.split(jax.random.key(2), args.reps + 2)
  states = {t: s for t, (_, s) in versions.items()}
  times = {t: [] for t in versions}
  cpu = {t: [] for t in versions}
  for i in range(args.reps + 1):
    for tag in versions:
      t0, c0 = time.perf_counter(), time.process_time()
      for _ in range(args.calls):
        states[tag] = calls[tag](states[tag], keys[i])
      jax.block_until_ready(states[tag])
      if i > 0:  # the first call may compile
        times[tag].append((time.perf_counter() - t0) / args.calls)
        cpu[tag].append((time.process_time() - c0) / args.calls)
  load = os.getloadavg()
  for tag, ts in times.items():
    print(f"[{tag}] step {1e3 * statistics.median(ts):.2f} ms median, "
          f"{1e3 * min(ts):.2f} min over {len(ts)}; process CPU time "
          f"{1e3 * statistics.median(cpu[tag]):.2f} ms median (loaded: load avg {load[0]:.1f})")
  base = "old" if "old" in times else "new"
  for tag in times:
    if tag == base:
      continue
    ratios = [a / b for a, b in zip(times[base], times[tag])]
    q = statistics.quantiles(ratios, n=4)
    print(f"{base}/{tag}: median of pairwise ratios {statistics.median(ratios):.3f} "
          f"(quartiles {q[0]:.3f}-{q[2]:.3f}), ratio of medians "
          f"{statistics.median(times[base]) / statistics.median(times[tag]):.3f}; CPU time: "
          f"median of pairwise ratios "
          f"{statistics.median([a / b for a, b in zip(cpu[base], cpu[tag])]):.3f}")

if __name__ == "__main__":
  main()
