"""Evaluate learned optimizers: against tuned Adam (a CLI) and during meta-training.

Command line::

  python -m spmd_lopt.evaluate --lopt runs/default/theta.lopt,init:mlp_lopt \\
      --task ImageMLP_Digits8_Relu32 --steps 300 --seeds 5 --out docs/eval

trains ``--task`` for ``--steps`` inner steps from ``--seeds`` seeds with every learned
optimizer in ``--lopt`` and with Adam at every learning rate in ``--adam_lrs``, and writes
``<out>/<task>.json`` (the curves) and ``<out>/<task>.png`` (loss vs step: each learned
optimizer's mean over seeds with a min-max band, the best Adam's band, the other Adam
learning rates as thin lines), and prints the final losses, mean ± std over seeds.

``--lopt`` entries (comma-separated, each optionally ``LABEL=SPEC``):
  * a ``ParameterCheckpoint`` path (``launch`` writes ``<workdir>/theta.lopt``); with
    ``--expect NAME`` it must hold theta of that class with the shapes of
    ``NAME(**--lopt_args)``, else the run stops with one line on stderr and exit code 2;
  * ``init:NAME`` (``mlp_lopt``, ``adafac_mlp_lopt``, ``nn_adam``, ``learnable_adam``,
    ``learnable_sgd``): ``NAME(**--lopt_args).init(k)``, untrained, with ``k`` the key the
    launcher draws its starting theta from for ``config.seed = --init_seed``; so
    ``init:mlp_lopt`` is the default job's own starting point.

``--task``: a fixed task (``registry.get_task``, e.g. ``ImageMLP_Digits8_Relu32``) or a
task family (``registry.get_task_family``, e.g. ``FixedDimQuadraticFamily_10``); for a
family every seed trains a fresh task sample. Seed ``s`` uses the same key (task sample,
init, batches) for every optimizer (common random numbers), so differences between
optimizers are not seed noise. A run is one ``jit`` per optimizer class: all learning
rates (or all thetas of one class) x all seeds are one ``vmap``-ed program.

JSON fields: ``task``, ``steps``, ``seeds``, ``seed``, ``eval_every``, ``eval_batches``,
``eval_step`` (i32[E]), ``best_adam`` (label or null), ``best_adam_lr``, ``optimizers``:
``{label: {kind ("learned" | "adam"), spec, lr (adam) or lopt_class/lopt_config
(learned), train_loss [S][steps] (the batch loss at each step, before its update),
eval_train_loss and test_loss [S][E] (mean over eval_batches fresh batches at each
eval_step), final_train_loss_{mean,std}, final_test_loss_{mean,std}}}``. "Final" losses
are the ``eval_step = steps`` evaluations; the best Adam minimises the mean final
training loss (non-finite counts as +inf).

During meta-training (``launch`` with ``config.eval_every > 0``): ``PeriodicEvaluator``
calls ``evaluate_theta`` every ``eval_every`` outer steps and the launcher logs
``eval/<task>/final_loss``; ``eval.png`` plots them at the end.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import time
import zlib
from typing import Any, Callable, Mapping, Optional, Sequence, Union

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from spmd_lopt import eval_training
from spmd_lopt.learned_optimizers import base as lopt_base
from spmd_lopt.learned_optimizers import checkpoint as lopt_checkpoint
from spmd_lopt.optimizers import base as opt_base
from spmd_lopt.tasks import base as tasks_base
from spmd_lopt.tasks import registry

TaskLike = Union[str, tasks_base.Task, tasks_base.TaskFamily]

# --------------------------------------------------------------------------- library


def lopt_classes() -> dict[str, type]:
  """Short names for learned optimizer classes, as ``--lopt init:NAME`` and ``--expect``
  take them (``module:QualName`` import paths are accepted too)."""
  from spmd_lopt import learned_optimizers as L  # pylint: disable=import-outside-toplevel
  return {"mlp_lopt": L.MLPLOpt, "adafac_mlp_lopt": L.AdafacMLPLOpt, "nn_adam": L.NNAdam,
          "learnable_adam": L.LearnableAdam, "learnable_sgd": L.LearnableSGD}


def make_lopt(name: str, kwargs: Optional[Mapping[str, Any]] = None
              ) -> lopt_base.LearnedOptimizer:
  """``NAME(**kwargs)`` for a short name or a ``module:QualName`` path."""
  classes = lopt_classes()
  if name in classes:
    cls = classes[name]
  elif ":" in name:
    cls = lopt_checkpoint._resolve_class(name)  # pylint: disable=protected-access
  else:
    raise ValueError(f"Unknown learned optimizer {name!r}. Known: {', '.join(classes)} "
                     "or a 'module:ClassName' path.")
  try:
    return cls(**dict(kwargs or {}))
  except TypeError as e:
    raise ValueError(f"cannot build {cls.__name__} from arguments {dict(kwargs or {})}: "
                     f"{e}") from e


def launcher_init_key(seed: int) -> jax.Array:
  """The key ``launch`` (via ``SpmdGradientLearner.init``) initialises theta from when
  ``config.seed = seed``: ``split(split(key(seed))[0])[0]``."""
  k_init, _ = jax.random.split(jax.random.key(seed))
  k_theta, _ = jax.random.split(k_init)
  return k_theta


def as_family(task: TaskLike, **kwargs) -> tasks_base.TaskFamily:
  """A registry name (fixed task first, then family), a ``Task`` or a ``TaskFamily``, as
  a family; a fixed task becomes the family whose every sample is that task."""
  if isinstance(task, tasks_base.TaskFamily):
    return task
  if isinstance(task, tasks_base.Task):
    return tasks_base.single_task_to_family(task)
  if not isinstance(task, str):
    raise TypeError(f"expected a task name, Task or TaskFamily, got {type(task).__name__}.")
  if task in registry.task_names():
    return tasks_base.single_task_to_family(registry.get_task(task, **kwargs), name=task)
  return registry.get_task_family(task, **kwargs)


def sweep_fn(family: tasks_base.TaskFamily, make_opt: Callable[[Any], opt_base.Optimizer],
             num_steps: int, eval_every: int, eval_batches: int = 5):
  """The pure ``(hparams[H, ...], keys[S]) -> curves[H, S, ...]`` function.

  ``curves[h, s]`` trains, with ``make_opt(hparams[h])`` (a theta, a learning rate...),
  the task ``family.task_fn(family.sample(k_task))`` from ``keys[s]`` split into
  ``(k_task, k_run)``, as ``eval_training.training_curves_fn`` does: ``train/loss``
  f32[H, S, num_steps]; ``eval/train/loss``, ``eval/test/loss`` f32[H, S, E]. Every ``h``
  sees the same tasks, inits and batches for a given ``s``.
  """

  def one(h, key):
    k_task, k_run = jax.random.split(key)
    task = family.task_fn(family.sample(k_task))
    run = eval_training.training_curves_fn(task, make_opt(h), num_steps, eval_every,
                                           eval_batches, ("train", "test"))
    return run(k_run)

  return jax.vmap(jax.vmap(one, in_axes=(None, 0)), in_axes=(0, None))


@functools.lru_cache(maxsize=64)
def _theta_eval_fn(lopt: lopt_base.LearnedOptimizer, task: TaskLike, num_steps: int,
                   seeds: int, eval_batches: int):
  """Jitted ``(theta, key) -> (f32[] final test loss, f32[] final train loss)``, means
  over ``seeds``; cached per (lopt object, task name or object, sizes) so that periodic
  calls with new thetas reuse one compiled program."""
  family = as_family(task)

  def f(theta, key):
    curves = sweep_fn(family, lambda th: lopt.opt_fn(th, is_training=False), num_steps,
                      eval_every=num_steps, eval_batches=eval_batches)(
                          jax.tree.map(lambda x: x[None], theta),
                          jax.random.split(key, seeds))
    return (jnp.mean(curves["eval/test/loss"][0, :, -1]),
            jnp.mean(curves["eval/train/loss"][0, :, -1]))

  return jax.jit(f)


def _task_key(key: jax.Array, name: str) -> jax.Array:
  # Keyed by the task's name, not its position, so adding a task changes no other number.
  return jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)


def evaluate_theta(lopt: lopt_base.LearnedOptimizer, theta: Any,
                   task_names: Union[Sequence[str], Mapping[str, TaskLike]],
                   num_steps: int, key: jax.Array, seeds: int = 4,
                   eval_batches: int = 5, with_train: bool = False) -> dict:
  """Mean final losses of ``lopt.opt_fn(theta)`` on held-out task samples.

  For each task (a registry name, or ``{name: Task | TaskFamily}``): ``seeds`` runs of
  ``num_steps`` inner steps, run ``s`` on a fresh task sample (for a family) from
  ``split(fold_in(key, crc32(name)), seeds)[s]``, a key chain meta-training never uses.
  Returns ``{name: mean over seeds of the loss on eval_batches fresh "test" batches at
  step num_steps}`` as Python floats (NaN if a run diverged); with ``with_train``,
  ``{name: (test, train)}``. One jitted, cached program per (lopt, task, sizes): theta is
  an argument, not a constant, so a new theta costs no compile.
  """
  if num_steps < 1 or seeds < 1:
    raise ValueError(f"evaluate_theta: num_steps and seeds must be >= 1, got {num_steps}, "
                     f"{seeds}.")
  items = (task_names.items() if isinstance(task_names, Mapping)
           else [(n, n) for n in task_names])
  out = {}
  for name, task in items:
    fn = _theta_eval_fn(lopt, task, int(num_steps), int(seeds), int(eval_batches))
    test, train = jax.device_get(fn(theta, _task_key(key, name)))
    out[name] = (float(test), float(train)) if with_train else float(test)
  return out


# ------------------------------------------------------------- during meta-training


class PeriodicEvaluator:
  """Runs ``evaluate_theta`` every ``every`` outer steps of a meta-training run.

  ``maybe_evaluate(step, state)`` is called at every logged step; it evaluates when a
  multiple of ``every`` was reached since the last evaluation (so with ``every`` not a
  multiple of ``log_every`` it runs at the next log step) and at the final step, and
  returns ``{"eval/<task>/final_loss": float, "eval/time_s": float}`` (``{}`` otherwise,
  or when disabled). Evaluation uses a fixed key, so every evaluation
  sees the same held-out tasks, inits and batches and the curve shows theta's change,
  not sampling noise. ``finish(workdir)`` plots the evaluations to ``eval.png``.
  The launcher runs it on every process (each on its first local device, from the
  replicated theta), so no process waits at the next collective for another's
  evaluation; its time counts in the launcher's steps/s; ``eval/time_s`` says how much.
  """

  def __init__(self, lopt, theta_fn: Callable[[Any], Any], tasks: Mapping[str, TaskLike],
               every: int, num_steps: int, seeds: int, key: jax.Array, final_step: int,
               enabled: bool = True):
    self.lopt, self.theta_fn, self.tasks = lopt, theta_fn, dict(tasks)
    self.every, self.num_steps, self.seeds = int(every), int(num_steps), int(seeds)
    self.key, self.final_step = key, int(final_step)
    self.enabled = enabled and self.every > 0
    self.history: list[dict[str, float]] = []
    self._last = 0

  @classmethod
  def from_config(cls, cfg, learner, enabled: bool = True) -> "PeriodicEvaluator":
    """From the config keys ``eval_every`` (0: off), ``eval_tasks`` (comma-separated;
    "" = ``cfg.tasks``), ``eval_steps`` and ``eval_seeds``; tasks are built as the
    launcher builds its training families (``quadratic_dim``, ``data_dir`` apply)."""
    from spmd_lopt import config as config_lib  # pylint: disable=import-outside-toplevel
    every = int(cfg.get("eval_every", 0))
    steps, seeds = int(cfg.get("eval_steps", 300)), int(cfg.get("eval_seeds", 4))
    if every < 0:
      raise ValueError(f"config.eval_every must be >= 0 (0 = off), got {every}.")
    tasks = {}
    if every > 0:
      if steps <= 0 or seeds <= 0:
        raise ValueError(f"config.eval_steps and config.eval_seeds must be positive, got "
                         f"{steps}, {seeds}.")
      names = [n.strip() for n in (cfg.get("eval_tasks", "") or cfg.tasks).split(",")
               if n.strip()]
      if not names:
        raise ValueError("config.eval_tasks names no task.")
      # Built now, so a bad name fails before meta-training starts, not at the first eval.
      tasks = {n: config_lib.make_task_family(n, cfg) for n in names}
    key = jax.random.fold_in(jax.random.key(cfg.seed), 0x5EED)  # not a training key
    return cls(learner.meta_init, learner.get_meta_params, tasks, every, steps, seeds, key,
               final_step=cfg.outer_steps, enabled=enabled)

  def maybe_evaluate(self, step: int, state) -> dict[str, float]:
    if not self.enabled:
      return {}
    due = step // self.every > self._last // self.every or (
        step == self.final_step and self._last < step)
    if not due:
      return {}
    self._last = step
    t = time.time()
    theta = jax.device_get(self.theta_fn(state))  # host copy: the eval runs off the mesh
    losses = evaluate_theta(self.lopt, theta, self.tasks, self.num_steps, self.key,
                            self.seeds)
    rec = {f"eval/{n}/final_loss": v for n, v in losses.items()}
    rec["eval/time_s"] = time.time() - t
    self.history.append({"step": step, **rec})
    return rec

  def finish(self, workdir: str) -> Optional[str]:
    """Write ``<workdir>/eval.png`` (final loss per task vs outer step); its path, or
    None when nothing was evaluated."""
    if not self.history:
      return None
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    names = list(self.tasks)
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.2), squeeze=False)
    steps = [h["step"] for h in self.history]
    for ax, n in zip(axes[0], names):
      ax.plot(steps, [h[f"eval/{n}/final_loss"] for h in self.history], "o-", ms=3)
      ax.set_title(f"{n}\n{self.num_steps} inner steps, {self.seeds} seeds", fontsize=9)
      ax.set_xlabel("outer step")
      ax.set_ylabel("final test loss")
      ax.grid(alpha=0.3)
    fig.tight_layout()
    path = os.path.join(workdir, "eval.png")
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------ CLI

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
  label, sep, spec = entry.partition("=")
  if not sep:
    label, spec = entry, entry
  if not spec:
    raise ValueError(f"--lopt entry {entry!r} is empty.")
  return label, spec


def _load_lopts(entries, lopt_args, expect_name, init_seed):
  """[(label, spec, lopt, theta)] from the --lopt entries."""
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
      theta = lopt.init(launcher_init_key(init_seed))
    else:
      if not os.path.exists(spec):
        raise ValueError(f"checkpoint {spec!r} does not exist (use init:NAME for an "
                         "untrained learned optimizer).")
      ckpt = lopt_checkpoint.load_parameter_checkpoint(spec, expect=expect)
      lopt, theta = ckpt.lopt, ckpt.theta
    out.append((label, spec, lopt, jax.device_get(theta)))
  return out


def _summary(curves) -> dict[str, Any]:
  fin_tr, fin_te = curves["eval/train/loss"][:, -1], curves["eval/test/loss"][:, -1]
  return {"train_loss": curves["train/loss"].tolist(),
          "eval_train_loss": curves["eval/train/loss"].tolist(),
          "test_loss": curves["eval/test/loss"].tolist(),
          "final_train_loss_mean": float(np.mean(fin_tr)),
          "final_train_loss_std": float(np.std(fin_tr)),
          "final_test_loss_mean": float(np.mean(fin_te)),
          "final_test_loss_std": float(np.std(fin_te))}


def compare(family, lopts, adam_lrs: Sequence[float], num_steps: int, key: jax.Array,
            num_seeds: int, eval_every: int, eval_batches: int = 5) -> dict[str, Any]:
  """Curves of every ``(label, spec, lopt, theta)`` in ``lopts`` and of Adam at every
  learning rate, ``num_seeds`` common seeds each; the JSON layout of the module doc."""
  keys = jax.random.split(key, num_seeds)
  results: dict[str, Any] = {}
  # One program per learned optimizer class+config: its thetas are stacked and vmapped.
  groups: dict[str, list] = {}
  for item in lopts:
    lopt = item[2]
    groups.setdefault(lopt_checkpoint.class_path(type(lopt)) + json.dumps(
        lopt.config, sort_keys=True), []).append(item)
  for items in groups.values():
    lopt = items[0][2]
    thetas = jax.tree.map(lambda *x: np.stack(x), *[it[3] for it in items])
    fn = jax.jit(sweep_fn(family, lambda th, lopt=lopt: lopt.opt_fn(th), num_steps,
                          eval_every, eval_batches))
    curves = jax.device_get(fn(thetas, keys))
    for i, (label, spec, lo, _) in enumerate(items):
      results[label] = {"kind": "learned", "spec": spec,
                        "lopt_class": lopt_checkpoint.class_path(type(lo)),
                        "lopt_config": lo.config,
                        **_summary({k: np.asarray(v[i]) for k, v in curves.items()})}
  best, best_lr = None, None
  if adam_lrs:
    fn = jax.jit(sweep_fn(family, opt_base.Adam, num_steps, eval_every, eval_batches))
    curves = jax.device_get(fn(jnp.asarray(adam_lrs, jnp.float32), keys))
    scores = []
    for i, lr in enumerate(adam_lrs):
      s = _summary({k: np.asarray(v[i]) for k, v in curves.items()})
      results[f"Adam lr={lr:g}"] = {"kind": "adam", "spec": f"adam:{lr:g}", "lr": lr, **s}
      m = s["final_train_loss_mean"]
      scores.append(m if math.isfinite(m) else math.inf)
    i = int(np.argmin(scores))
    best, best_lr = f"Adam lr={adam_lrs[i]:g}", adam_lrs[i]
  return {"eval_step": eval_training.eval_step_schedule(num_steps, eval_every).tolist(),
          "best_adam": best, "best_adam_lr": best_lr, "optimizers": results}


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
    json.dump(result, f)
  plot(result, base + ".png")
  result["files"] = [base + ".json", base + ".png"]
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
  if not F["task"]:
    _fail("--task is required.")
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
