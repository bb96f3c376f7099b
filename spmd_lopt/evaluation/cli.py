"""The ``python -m spmd_lopt.evaluate`` command line: a held-out suite or one task.

Suite mode::

  python -m spmd_lopt.evaluate --suite quick --lopt trained=runs/default/theta.lopt,init:mlp_lopt \\
      --out eval_suite

runs ``spmd_lopt.evaluation.suite.get_suite(--suite)`` (``quick`` or ``full``) for every
``--lopt`` entry and every tuned baseline (``runner.run_suite``) and writes, under
``--out``: ``suite.json`` (every curve, the tuning, per-seed metrics and the aggregates;
strict JSON), ``suite.md`` (the table, also printed), ``curves/<task>.png`` and
``summary.png`` (loss-ratio and speedup IQMs with 95% intervals). Finished runs are cached
in ``<out>/cache``: rerunning after an interrupt continues where it stopped. A progress bar
over tasks is shown on a terminal (``--progress`` forces it on or off). Each learned
optimizer is reported as shipped (``LABEL``) and with its step multiplier tuned on the
validation split (``LABEL+lr``, over ``--lopt_lr_mults``). ``--tasks`` and ``--horizons``
run a part of the suite (the cache makes parts add up).

Single-task mode::

  python -m spmd_lopt.evaluate --lopt runs/default/theta.lopt,init:mlp_lopt \\
      --task ImageMLP_Digits8_Relu32 --steps 300 --seeds 5 --out docs/eval

trains ``--task`` (a fixed task or task family of ``spmd_lopt.tasks.registry``) with every
learned optimizer and Adam at every ``--adam_lrs`` and writes ``<out>/<task>.json`` (the
curves, layout in ``sweep.compare``) and ``<out>/<task>.png``; the best Adam minimises the
mean final training loss.

``--lopt`` entries (comma-separated, each ``[LABEL=]SPEC``): a ``ParameterCheckpoint``
path (``launch`` writes ``<workdir>/theta.lopt``; with ``--expect NAME`` it must hold theta
of that class with the shapes of ``NAME(**--lopt_args)``), or ``init:NAME`` (an untrained
``NAME(**--lopt_args)`` from the key the launcher draws its starting theta from for
``config.seed = --init_seed``), or any spec ``spmd_lopt.learned_optimizers.resolve`` knows
(``celo2=PATH/theta.state``, ``mlp_lopt=PATH``, ``pretrained:NAME``, ...). Bad input ends the run with one line on stderr, exit code 2.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np

from spmd_lopt.evaluation import metrics
from spmd_lopt.evaluation import report
from spmd_lopt.evaluation import runner
from spmd_lopt.evaluation import suite as suite_lib
from spmd_lopt.evaluation.sweep import as_family, compare, make_lopt
from spmd_lopt import learned_optimizers
from spmd_lopt.learned_optimizers import checkpoint as lopt_checkpoint
from spmd_lopt.learned_optimizers import registry as lopt_registry
from spmd_lopt.train import keys as train_keys

_FLAGS = {}


def _define_flags():
  F = flags
  _FLAGS["lopt"] = F.DEFINE_list(
      "lopt", None, "Learned optimizers to evaluate, comma-separated, each [LABEL=]SPEC with "
      "SPEC a ParameterCheckpoint path or init:NAME (an untrained init).")
  _FLAGS["lopt_args"] = F.DEFINE_string(
      "lopt_args", "{}", "JSON constructor arguments for init:NAME and for --expect.")
  _FLAGS["expect"] = F.DEFINE_string(
      "expect", "", "If set (e.g. mlp_lopt): checkpoints must hold theta of this class with "
      "the shapes of NAME(**lopt_args); anything else is an error.")
  _FLAGS["init_seed"] = F.DEFINE_integer(
      "init_seed", 0, "init:NAME uses the theta the launcher starts from with this "
      "config.seed.")
  _FLAGS["suite"] = F.DEFINE_string(
      "suite", None, f"A held-out suite to run: {', '.join(suite_lib.SUITE_NAMES)}.")
  _FLAGS["tasks"] = F.DEFINE_list(
      "tasks", [], "Suite mode: only these task names of the suite (default: all).")
  _FLAGS["horizons"] = F.DEFINE_list(
      "horizons", [], "Suite mode: only these horizons (inner steps; default: all).")
  _FLAGS["lopt_lr_mults"] = F.DEFINE_list(
      "lopt_lr_mults", None, "Suite mode: multipliers of each learned optimizer's step "
      "tried on top of x1, the best on the validation split reported as LABEL+lr "
      f"(default: {','.join(f'{m:g}' for m in suite_lib.LOPT_LR_MULTS)}; empty: x1 only).")
  _FLAGS["lopt_weight_decays"] = F.DEFINE_list(
      "lopt_weight_decays", None, "Suite mode: decoupled weight decays each multiplier also "
      "runs with (decay m * wd * step_mult per step), all tuned together as LABEL+lr+wd "
      "(default: the suite's; empty: none).")
  _FLAGS["progress"] = F.DEFINE_bool(
      "progress", None, "Progress bar over suite tasks (default: when stderr is a terminal).")
  _FLAGS["task"] = F.DEFINE_string(
      "task", None, "A fixed task or task family name from spmd_lopt.tasks.registry.")
  _FLAGS["steps"] = F.DEFINE_integer("steps", 300, "Inner training steps.")
  _FLAGS["seeds"] = F.DEFINE_integer("seeds", 5, "Seeds (task sample, init, batches).")
  _FLAGS["adam_lrs"] = F.DEFINE_list(
      "adam_lrs", ["1e-3", "3e-3", "1e-2", "3e-2"], "Adam learning rates (empty: no Adam).")
  _FLAGS["eval_every"] = F.DEFINE_integer(
      "eval_every", 0, "Inner steps between test evaluations (0: steps // 20).")
  _FLAGS["eval_batches"] = F.DEFINE_integer("eval_batches", 5, "Batches per evaluation.")
  _FLAGS["seed"] = F.DEFINE_integer("seed", 0, "Seed of the evaluation runs.")
  _FLAGS["out"] = F.DEFINE_string("out", "eval_out", "Output folder.")


def _parse_spec(entry: str) -> tuple[str, str]:
  """``[LABEL=]SPEC`` -> (label, spec). ``NAME=PATH`` with NAME a registered learned
  optimizer (``celo2=theta.state``) is a spec of its own, labelled NAME."""
  label, sep, spec = entry.partition("=")
  if not sep:
    label, spec = entry, entry
  elif label in lopt_registry.names() and "=" not in spec:
    spec = entry
  if not spec or not label:
    raise ValueError(f"--lopt entry {entry!r} is empty.")
  return label, spec


def _load_lopts(entries, lopt_args, expect_name, init_seed):
  """[(label, spec, lopt, theta)] from the --lopt entries: ``init:NAME`` here (from the
  launcher's starting key), a ``.lopt`` file (checked against ``--expect``), anything else
  through ``learned_optimizers.resolve``."""
  try:
    kwargs = json.loads(lopt_args)
  except json.JSONDecodeError as e:
    raise ValueError(f"--lopt_args is not JSON: {e}") from e
  if not isinstance(kwargs, dict):
    raise ValueError("--lopt_args must be a JSON object.")
  expect = make_lopt(expect_name, kwargs) if expect_name else None
  out = []
  for entry in entries:
    label, spec = _parse_spec(entry)
    if spec.startswith("init:"):
      lopt = make_lopt(spec[len("init:"):], kwargs)
      theta = lopt.init(train_keys.theta_init_key(init_seed))
    elif os.path.isfile(spec):
      ckpt = lopt_checkpoint.load_parameter_checkpoint(spec, expect=expect)
      lopt, theta = ckpt.lopt, ckpt.theta
    elif "=" in spec or ":" in spec:
      try:
        lopt, theta = learned_optimizers.resolve(spec)
      except (KeyError, LookupError, OSError) as e:
        raise ValueError(f"--lopt {spec!r}: {e}") from e
    else:
      raise ValueError(f"checkpoint {spec!r} does not exist (use init:NAME for an "
                       "untrained learned optimizer).")
    out.append((label, spec, lopt, jax.device_get(theta)))
  return out


def _band(ax, x, runs, color, label, lw=1.6, alpha=0.2):
  runs = np.asarray(runs, np.float64)
  ax.plot(x, np.nanmean(runs, 0), color=color, lw=lw, label=label)
  ax.fill_between(x, np.nanmin(runs, 0), np.nanmax(runs, 0), color=color, alpha=alpha,
                  lw=0)


def plot(result: dict[str, Any], path: str):
  """Two panels, log loss: the per-step training (batch) loss and the test loss at the
  eval steps. Learned optimizers and the best Adam: mean over seeds with a min-max band;
  the other Adam learning rates: thin mean lines."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  steps = np.arange(result["steps"])
  ev = np.asarray(result["eval_step"])
  opts = result["optimizers"]
  learned = [k for k, v in opts.items() if v["kind"] == "learned"]
  adams = [k for k, v in opts.items() if v["kind"] == "adam"]
  # Adam lrs in their own (viridis) colours so that they never look like a learned curve.
  adam_colors = {k: plt.cm.viridis(i / max(1, len(adams) - 1)) for i, k in enumerate(adams)}
  finite = []
  for ax, key, x in ((axes[0], "train_loss", steps), (axes[1], "test_loss", ev)):
    for i, k in enumerate(learned):
      _band(ax, x, opts[k][key], ["C0", "C3", "C1", "C4", "C5", "C6"][i % 6], k)
      finite.append(np.asarray(opts[k][key]))
    for k in adams:
      if k == result["best_adam"]:
        _band(ax, x, opts[k][key], "k", f"best {k} (by final train loss)", alpha=0.15)
        finite.append(np.asarray(opts[k][key]))
      else:
        ax.plot(x, np.nanmean(np.asarray(opts[k][key], np.float64), 0), lw=0.7, ls="--",
                alpha=0.7, color=adam_colors[k], label=k)
    ax.set_yscale("log")
    ax.set_xlabel("inner step")
    ax.grid(alpha=0.3, which="both")
  vals = np.concatenate([np.ravel(v) for v in finite]) if finite else np.array([1.0])
  vals = vals[np.isfinite(vals) & (vals > 0)]
  if vals.size:  # the highlighted curves set the range; a diverged lr must not
    for ax in axes:
      ax.set_ylim(vals.min() * 0.8, vals.max() * 1.25)
  axes[0].set_ylabel("training loss (batch, before the step)")
  axes[1].set_ylabel(f"test loss (mean of {result['eval_batches']} batches)")
  axes[1].legend(fontsize=7)
  fig.suptitle(f"{result['task']}: {result['steps']} steps, {result['seeds']} seeds "
               "(mean, min-max band)", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


def _table(result) -> str:
  rows = [("optimizer", "final train loss", "final test loss")]
  for k, v in result["optimizers"].items():
    mark = " *" if k == result["best_adam"] else ""
    rows.append((k + mark,
                 f"{v['final_train_loss_mean']:.4g} ± {v['final_train_loss_std']:.2g}",
                 f"{v['final_test_loss_mean']:.4g} ± {v['final_test_loss_std']:.2g}"))
  w = [max(len(r[i]) for r in rows) for i in range(3)]
  lines = ["  ".join(c.ljust(w[i]) for i, c in enumerate(r)) for r in rows]
  lines.append(f"(mean ± std over {result['seeds']} seeds after {result['steps']} steps; "
               "* = best Adam by final train loss)")
  return "\n".join(lines)


def evaluate_main(lopt_entries, task: str, steps: int, seeds: int, adam_lrs, out: str,
                  lopt_args: str = "{}", expect: str = "", init_seed: int = 0,
                  eval_every: int = 0, eval_batches: int = 5, seed: int = 0
                  ) -> dict[str, Any]:
  """The CLI without flags: runs, writes ``<out>/<task>.{json,png}``, returns the dict."""
  if steps < 1 or seeds < 1 or eval_batches < 1 or eval_every < 0:
    raise ValueError(f"--steps, --seeds, --eval_batches must be >= 1 and --eval_every >= 0; "
                     f"got {steps}, {seeds}, {eval_batches}, {eval_every}.")
  if not lopt_entries and not adam_lrs:
    raise ValueError("nothing to evaluate: give --lopt and/or --adam_lrs.")
  try:
    lrs = [float(x) for x in adam_lrs]
  except ValueError as e:
    raise ValueError(f"--adam_lrs must be numbers: {e}") from e
  if any(not lr > 0 for lr in lrs):
    raise ValueError(f"--adam_lrs must be positive, got {lrs}.")
  lopts = _load_lopts(lopt_entries or [], lopt_args, expect, init_seed)
  labels = [l for l, *_ in lopts]
  if len(set(labels)) != len(labels):
    raise ValueError(f"--lopt labels must be unique, got {labels}; name them LABEL=SPEC.")
  family = as_family(task)
  eval_every = eval_every or max(1, steps // 20)
  t = time.time()
  result = {"task": task, "steps": steps, "seeds": seeds, "seed": seed,
            "eval_every": eval_every, "eval_batches": eval_batches,
            **compare(family, lopts, lrs, steps, jax.random.key(seed), seeds, eval_every,
                      eval_batches)}
  result["seconds"] = time.time() - t
  os.makedirs(out, exist_ok=True)
  base = os.path.join(out, task)
  with open(base + ".json", "w") as f:
    json.dump(metrics.strict_json(result), f, allow_nan=False)
  plot(result, base + ".png")
  result["files"] = [base + ".json", base + ".png"]
  return result


def _numbers(flag: str, values, kind):
  try:
    return tuple(kind(v) for v in values)
  except ValueError as e:
    raise ValueError(f"--{flag} must be a list of numbers: {e}") from None


def suite_main(suite_name: str, lopt_entries, out: str, lopt_args: str = "{}",
               expect: str = "", init_seed: int = 0, seed: int = 0,
               progress: bool = False, tasks=(), horizons=(),
               lopt_lr_mults=None, lopt_weight_decays=None) -> dict[str, Any]:
  """Suite mode without flags: runs (with the cache in ``out``), writes the files of the
  module doc, returns the strict-JSON result with ``files`` and ``seconds`` added.
  ``tasks``/``horizons`` select a part of the suite; ``lopt_lr_mults`` (None: the
  suite's) are the learned optimizers' step multipliers, ``lopt_weight_decays`` (None:
  the suite's) their extra weight decays."""
  suite = suite_lib.select(suite_lib.get_suite(suite_name), tuple(tasks),
                           _numbers("horizons", horizons, int))
  if lopt_lr_mults is not None:
    mults = _numbers("lopt_lr_mults", lopt_lr_mults, float)
    runner.lr_mult_grid(mults)  # bad values fail here, before anything runs
    suite = dataclasses.replace(suite, lopt_lr_mults=mults)
  if lopt_weight_decays is not None:
    wds = runner.weight_decay_grid(_numbers("lopt_weight_decays", lopt_weight_decays, float))
    suite = dataclasses.replace(suite, lopt_weight_decays=wds)
  lopts = _load_lopts(lopt_entries or [], lopt_args, expect, init_seed)
  labels = [l for l, *_ in lopts]
  if len(set(labels)) != len(labels):
    raise ValueError(f"--lopt labels must be unique, got {labels}; name them LABEL=SPEC.")
  t = time.time()
  result = runner.run_suite(suite, lopts, out, seed=seed, progress=progress)
  result = metrics.strict_json(result)
  result["seconds"] = time.time() - t
  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, "suite.json")
  with open(path, "w") as f:
    json.dump(result, f, allow_nan=False)
  result["files"] = [path] + report.write_all(result, out)
  return result


def _fail(message: str):
  print(f"spmd_lopt.evaluate: error: {message}", file=sys.stderr, flush=True)
  sys.exit(2)


def _parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _fail(f"bad flag: {e}")


def main(argv):
  if not flags.FLAGS["verbosity"].present:
    # absl logs INFO to stderr by default (e.g. jax's backend probing); keep stderr for
    # warnings and the one-line error.
    logging.set_verbosity(logging.WARNING)
  if len(argv) > 1:
    _fail(f"unexpected arguments: {argv[1:]}")
  F = {k: v.value for k, v in _FLAGS.items()}
  if bool(F["task"]) == bool(F["suite"]):
    _fail("give exactly one of --suite (a held-out suite) and --task (one task).")
  if F["suite"]:
    progress = sys.stderr.isatty() if F["progress"] is None else F["progress"]
    try:
      result = suite_main(F["suite"], F["lopt"], F["out"], F["lopt_args"], F["expect"],
                          F["init_seed"], F["seed"], progress, F["tasks"], F["horizons"],
                          F["lopt_lr_mults"], F["lopt_weight_decays"])
    except (ValueError, TypeError, FileNotFoundError) as e:
      _fail(str(e))
    st = result["stats"]
    print(f"suite {result['suite']}: {len(result['tasks'])} task entries, "
          f"{st['computed']} runs computed, {st['cached']} from the cache "
          f"({result['seconds']:.1f} s)")
    print(report.markdown_table(result))
    print(f"wrote: {', '.join(result['files'][:3])} and {len(result['files']) - 3} "
          "curve plots", flush=True)
    return
  try:
    result = evaluate_main(F["lopt"], F["task"], F["steps"], F["seeds"], F["adam_lrs"],
                           F["out"], F["lopt_args"], F["expect"], F["init_seed"],
                           F["eval_every"], F["eval_batches"], F["seed"])
  except (ValueError, TypeError, FileNotFoundError) as e:
    _fail(str(e))
  print(f"{result['task']}: {result['steps']} steps x {result['seeds']} seeds "
        f"({result['seconds']:.1f} s)")
  print(_table(result))
  print(f"wrote: {', '.join(result['files'])}", flush=True)


def run():
  _define_flags()
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
