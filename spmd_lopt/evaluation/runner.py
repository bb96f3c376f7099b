"""Run a suite: every baseline grid point and every learned optimizer on every task,
with a resumable on-disk cache, then the per-task tuning and the suite metrics.

A *run* is one (task, optimizer, hyper-parameters or theta) with all the suite's seeds
in one jitted, seed-vmapped program (``sweep.sweep_fn``); its curves are written to
``<out>/cache/<task label>/<sha256 of the run's description>.json`` (strict JSON) as soon
as it finishes, and a later ``run_suite`` with the same out dir reads them instead of
recomputing, so an interrupted suite continues where it stopped. The description holds
everything the numbers depend on (task, steps, seeds, eval schedule, root seed, the
optimizer and its hyper-parameters, a learned optimizer's class, config and a digest of
theta), so a changed theta or grid is a new run, never a stale one.

Every learned optimizer also runs with its step scaled by each multiplier of
``suite.lopt_lr_mults`` (``lr_scaled.ScaledUpdateOptimizer``; x1 always), all multipliers
of one theta in one program (theta stacked along the grid axis, like a baseline's grid
points), each multiplier its own cache record. Its ``LABEL`` row is x1 (the optimizer as
shipped); ``LABEL+lr`` is the multiplier with the lowest validation loss (mean over seeds),
reported on the test split, exactly as the baselines are tuned. With
``suite.lopt_weight_decays`` (AdamW's grid in ``full``), every multiplier also runs with each
decoupled weight decay ``wd`` (``p -= m * wd * step_mult * p`` per step, Celo2's deployment;
one more program per theta; only the multipliers ``suite.lopt_wd_mults`` if given), and
``LABEL+lr+wd`` is tuned over all of them, ``wd = 0`` included: the learned rule gets the
tuning AdamW gets.

Per seed ``s`` and task, every optimizer sees the same task sample, init and batches
(common random numbers); seeds come from ``fold_in(suite_key(seed), crc32(task name))``,
so a task's numbers do not depend on which other tasks are in the suite.

Result (``run_suite``'s return, the CLI's JSON): ``suite``, ``seeds``, ``seed``,
``eval_batches``, ``tasks`` ``{label: {name, steps, kind, eval_every, eval_step i[E],
seconds, baselines {name: {best, runs {point label: curves}}}, optimizers {label:
curves (+ lr_mult; a ``+lr`` row also best and runs {x<m>: curves})}, metrics {label:
{loss_ratio f[S], speedup f[S], reached bool[S]}}}}``,
``aggregates`` ``{label: {horizon ("all", and "@<steps>" when there are several):
{loss_ratio, speedup: {iqm, ci_low, ci_high, n_tasks, n_seeds}, reached_fraction}}}``,
``stats`` ``{computed, cached}``. Curves:
``valid_loss``, ``test_loss`` f[S][E] (mean over ``eval_batches`` batches),
``train_loss`` f[S][E-1] (mean batch loss over each eval interval), and
``final_{valid,test}_mean``. The optimizers compared are the learned ones and every tuned
baseline (``Adam`` itself has ratio and speedup 1 by construction).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import time
import zlib
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from spmd_lopt.evaluation import lr_scaled
from spmd_lopt.evaluation import metrics
from spmd_lopt.evaluation import suite as suite_lib
from spmd_lopt.evaluation import training
from spmd_lopt.evaluation.sweep import sweep_fn
from spmd_lopt.learned_optimizers import checkpoint as lopt_checkpoint

SPLITS = (suite_lib.VALID_SPLIT, suite_lib.TEST_SPLIT)


def theta_digest(theta) -> str:
  """sha256 over theta's leaves (shapes, dtypes, bytes) in tree order."""
  h = hashlib.sha256()
  for leaf in jax.tree.leaves(jax.device_get(theta)):
    a = np.asarray(leaf)
    h.update(f"{a.shape}{a.dtype}".encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


class RunCache:
  """One strict-JSON file per finished run; counts what it computed and what it read."""

  def __init__(self, out_dir: Optional[str]):
    self.root = None if out_dir is None else os.path.join(out_dir, "cache")
    self.computed = 0
    self.cached = 0

  def _path(self, task_label: str, desc: dict) -> Optional[str]:
    if self.root is None:
      return None
    digest = hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:24]
    return os.path.join(self.root, task_label.replace("/", "_"), digest + ".json")

  def get_or_run(self, task_label: str, desc: dict, compute: Callable[[], dict]) -> dict:
    return self.get_or_run_many(task_label, [desc], lambda: [compute()])[0]

  def get_or_run_many(self, task_label: str, descs: Sequence[dict],
                      compute_all: Callable[[], Sequence[dict]]) -> list[dict]:
    """Runs computed together (one program for a grid): cached ones are read; if any is
    missing, ``compute_all()`` (one record per desc) runs once and every record is
    stored under its own desc."""
    found = [self._read(task_label, d) for d in descs]
    if all(f is not None for f in found):
      self.cached += len(found)
      return found
    recs = [metrics.strict_json(r) for r in compute_all()]
    self.computed += len(recs)
    for d, r in zip(descs, recs):
      self._write(task_label, d, r)
    return recs

  def _read(self, task_label: str, desc: dict) -> Optional[dict]:
    path = self._path(task_label, desc)
    if path is None or not os.path.exists(path):
      return None
    try:
      with open(path) as f:
        rec = json.load(f)
    except (OSError, ValueError):
      return None  # a file cut short by an interrupt: recompute it
    return rec["curves"] if rec.get("desc") == json.loads(json.dumps(desc)) else None

  def _write(self, task_label: str, desc: dict, curves: dict) -> None:
    path = self._path(task_label, desc)
    if path is None:
      return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump({"desc": desc, "curves": curves}, f, allow_nan=False)
    os.replace(tmp, path)  # atomic: a reader never sees half a run


@dataclasses.dataclass(frozen=True)
class LearnedLRGrid:
  """A learned optimizer whose hyper-parameters are ``(theta, lr multiplier)``: grid point
  ``(theta, m)`` is ``ScaledUpdateOptimizer(lopt.opt_fn(theta), m)``, so every multiplier
  of one theta runs in one vmapped program (theta stacked along the grid axis)."""
  lopt: Any

  def make(self, theta, multiplier, decay=0.0):
    return lr_scaled.ScaledUpdateOptimizer(self.lopt.opt_fn(theta, is_training=False),
                                           multiplier, decay)


def nominal_lr(lopt) -> float:
  """The learning rate a rule's x1 step stands for: its ``step_mult`` (Celo2, MLPLOpt:
  1e-3), else 1e-3. Weight decay ``wd`` decays by ``m * wd * nominal_lr`` per step."""
  return float(getattr(lopt, "step_mult", 1e-3))


def lr_tuned_label(label: str) -> str:
  """The label of ``label``'s learning-rate-tuned row."""
  return f"{label}+lr"


def lr_wd_tuned_label(label: str) -> str:
  """The label of ``label``'s row tuned over step multiplier and weight decay."""
  return f"{label}+lr+wd"


def lr_mult_label(m: float, wd: float = 0.0) -> str:
  return f"x{m:g}" if wd == 0 else f"x{m:g},wd={wd:g}"


@functools.lru_cache(maxsize=16)
def _family(entry: suite_lib.SuiteTask):
  return entry.build()


@functools.lru_cache(maxsize=64)
def _program(entry: suite_lib.SuiteTask, optimizer, eval_batches: int):
  """The jitted ``(hparams[H, ...], keys[S]) -> curves`` of ``optimizer`` (a ``Baseline``:
  hparams are a grid point; a ``LearnedLRGrid``: ``(theta, multiplier)``; a learned
  optimizer: hparams are theta) on ``entry``; cached,
  so later suite runs in the same process (a resumed one, another theta) reuse it."""
  def make_opt(h):
    if isinstance(optimizer, (suite_lib.Baseline, LearnedLRGrid)):
      return optimizer.make(*h)
    return optimizer.opt_fn(h, is_training=False)

  return jax.jit(sweep_fn(_family(entry), make_opt, entry.steps, entry.eval_every,
                          eval_batches, SPLITS))


def _curves_to_record(curves: dict, eval_every: int, index: int = 0) -> dict:
  """Device curves of grid point ``index`` ([H, S, ...]) -> the stored record (lists)."""
  c = {k: np.asarray(v)[index] for k, v in curves.items()}
  train = c["train/loss"]
  e = train.shape[1] // eval_every
  blocks = [train[:, i * eval_every:(i + 1) * eval_every].mean(1) for i in range(e)]
  if train.shape[1] % eval_every:
    blocks.append(train[:, e * eval_every:].mean(1))
  valid, test = c[f"eval/{SPLITS[0]}/loss"], c[f"eval/{SPLITS[1]}/loss"]
  return {"train_loss": np.stack(blocks, 1), "valid_loss": valid, "test_loss": test,
          "final_valid_mean": float(np.mean(valid[:, -1])),
          "final_test_mean": float(np.mean(test[:, -1]))}


def _score(rec: dict) -> float:
  v = rec["final_valid_mean"]
  return math.inf if v is None or not math.isfinite(v) else v


def _tuned_row(info: dict, runs: dict, hparams: dict) -> dict:
  """A tuned learned-optimizer row: of ``runs`` ({point label: record}) the one with the
  lowest validation score, with its hyper-parameters ``hparams[label]`` ({name: value})."""
  best = min(runs, key=lambda k: _score(runs[k]))
  return {**info, **hparams[best], **runs[best], "best": best, "runs": runs}


def _finals(rec) -> np.ndarray:
  return np.asarray([np.nan if r[-1] is None else r[-1] for r in rec["test_loss"]], float)


def _curve_array(rows) -> np.ndarray:
  return np.asarray([[np.nan if x is None else x for x in r] for r in rows], np.float64)


def task_metrics(eval_step, adam: dict, other: dict) -> dict:
  """Per-seed loss ratio and speedup of ``other`` against tuned ``adam`` (records)."""
  sp, reached = metrics.speedups(eval_step, _curve_array(adam["test_loss"]),
                                 _curve_array(other["test_loss"]))
  return {"loss_ratio": metrics.loss_ratio(_finals(other), _finals(adam)),
          "speedup": sp, "reached": reached}


def run_suite(suite: suite_lib.Suite, lopts: Sequence[tuple[str, str, Any, Any]],
              out_dir: Optional[str], seed: int = 0, progress: bool = False,
              on_run: Optional[Callable[[int], None]] = None,
              bootstrap_reps: int = 2000) -> dict:
  """Run ``suite`` for learned optimizers ``lopts`` = ``[(label, spec, lopt, theta)]``.

  ``on_run(n)`` is called after each computed (not cached) run with the number computed
  so far (progress hooks; tests interrupt through it). Returns the dict described in the
  module doc (numpy arrays inside; ``metrics.strict_json`` makes it JSON).
  """
  labels = [l for l, *_ in lopts]
  if len(set(labels)) != len(labels):
    raise ValueError(f"learned optimizer labels must be unique, got {labels}.")
  reserved = {b.name for b in suite.baselines} & set(labels)
  if reserved:
    raise ValueError(f"learned optimizer labels {sorted(reserved)} clash with baselines.")
  mults = lr_mult_grid(suite.lopt_lr_mults)
  wds = weight_decay_grid(suite.lopt_weight_decays)
  tuned = [lr_tuned_label(l) for l in labels] if len(mults) > 1 else []
  tuned += [lr_wd_tuned_label(l) for l in labels] if wds else []
  if set(tuned) & set(labels):
    raise ValueError(f"learned optimizer labels {sorted(set(tuned) & set(labels))} clash "
                     "with the learning-rate-tuned rows of others.")
  cache = RunCache(out_dir)
  root = suite_lib.suite_key(seed)
  lopt_meta = [(label, spec, lopt, theta, {
      "class": lopt_checkpoint.class_path(type(lopt)), "config": lopt.config,
      "theta": theta_digest(theta)}) for label, spec, lopt, theta in lopts]
  tasks_out = {}
  bar = None
  if progress:
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel
    bar = tqdm(total=len(suite.tasks), desc=f"suite {suite.name}", unit="task")
  for entry in suite.tasks:
    t0, computed0 = time.time(), cache.computed
    if bar is not None:
      bar.set_postfix_str(entry.label)
    keys = jax.random.split(
        jax.random.fold_in(root, zlib.crc32(entry.name.encode()) & 0x7FFFFFFF), suite.seeds)
    base_desc = {"task": entry.name, "steps": entry.steps, "seeds": suite.seeds,
                 "seed": seed, "eval_every": entry.eval_every,
                 "eval_batches": suite.eval_batches, "splits": list(SPLITS)}

    def run_all(optimizer, points, descs, entry=entry, keys=keys, base_desc=base_desc):

      def compute(point):
        curves = jax.device_get(_program(entry, optimizer, suite.eval_batches)(point, keys))
        out = _curves_to_record(curves, entry.eval_every)
        if on_run is not None:
          on_run(cache.computed + 1)
        return out

      return [cache.get_or_run(entry.label, {**base_desc, **d},
                               lambda p=p: compute(p)) for p, d in zip(points, descs)]

    def run_lr_grid(lopt, theta, mults, descs, decays=None, entry=entry, keys=keys,
                    base_desc=base_desc):
      # every multiplier of one theta in one program: theta stacked along the grid axis;
      # the decayed points are a second program, so the decay-free one stays as it was
      grid = LearnedLRGrid(lopt)
      point = (jax.tree.map(lambda x: jnp.broadcast_to(jnp.asarray(x), (len(mults),)
                                                       + jnp.shape(x)), theta),
               jnp.asarray(mults, jnp.float32))
      if decays is not None:
        point += (jnp.asarray(decays, jnp.float32),)

      def compute_all():
        curves = jax.device_get(_program(entry, grid, suite.eval_batches)(point, keys))
        out = [_curves_to_record(curves, entry.eval_every, i) for i in range(len(mults))]
        if on_run is not None:
          on_run(cache.computed + len(out))
        return out

      return cache.get_or_run_many(entry.label, [{**base_desc, **d} for d in descs],
                                   compute_all)

    baselines_out = {}
    for b in suite.baselines:
      points = [jnp.asarray([pt], jnp.float32) for pt in b.grid]
      recs = run_all(b, points,
                     [{"optimizer": b.name, "hparams": list(pt)} for pt in b.grid])
      runs = {b.label(pt): r for pt, r in zip(b.grid, recs)}
      best = min(runs, key=lambda k: _score(runs[k]))
      baselines_out[b.name] = {"best": best, "runs": runs}
    opts_out = {}
    for label, spec, lopt, theta, meta in lopt_meta:
      recs = run_lr_grid(lopt, theta, mults, [{"optimizer": "learned", **meta,
                                               "lr_mult": m} for m in mults])
      runs = {lr_mult_label(m): r for m, r in zip(mults, recs)}
      info = {"spec": spec, "lopt_class": meta["class"], "lopt_config": meta["config"]}
      opts_out[label] = {**info, "lr_mult": 1.0, **runs[lr_mult_label(1.0)]}
      if len(mults) > 1:
        opts_out[lr_tuned_label(label)] = _tuned_row(
            info, runs, {lr_mult_label(m): {"lr_mult": m} for m in mults})
      if wds:
        wd_mults = lr_mult_grid(suite.lopt_wd_mults) if suite.lopt_wd_mults else mults
        points = [(m, wd) for wd in wds for m in wd_mults]
        lr0 = nominal_lr(lopt)
        recs = run_lr_grid(lopt, theta, [m for m, _ in points],
                           [{"optimizer": "learned", **meta, "lr_mult": m,
                             "weight_decay": wd, "nominal_lr": lr0} for m, wd in points],
                           decays=[wd * lr0 for _, wd in points])
        all_runs = {**runs, **{lr_mult_label(m, wd): r for (m, wd), r in zip(points, recs)}}
        opts_out[lr_wd_tuned_label(label)] = _tuned_row(
            info, all_runs, {lr_mult_label(m, wd): {"lr_mult": m, "weight_decay": wd}
                             for m, wd in [(m, 0.0) for m in mults] + points})
    eval_step = training.eval_step_schedule(entry.steps, entry.eval_every)
    adam_name = suite.baselines[0].name
    adam = baselines_out[adam_name]["runs"][baselines_out[adam_name]["best"]]
    compared = {**{l: r for l, r in opts_out.items()},
                **{f"tuned {n}": v["runs"][v["best"]] for n, v in baselines_out.items()}}
    tasks_out[entry.label] = {
        "name": entry.name, "steps": entry.steps, "kind": entry.kind,
        "eval_every": entry.eval_every, "eval_step": eval_step,
        "seconds": time.time() - t0, "runs_computed": cache.computed - computed0,
        "baselines": baselines_out, "optimizers": opts_out,
        "metrics": {l: task_metrics(eval_step, adam, r) for l, r in compared.items()}}
    if bar is not None:
      bar.update(1)
  if bar is not None:
    bar.close()
  return {"suite": suite.name, "seeds": suite.seeds, "seed": seed,
          "eval_batches": suite.eval_batches,
          "baseline_grids": {b.name: {"hparams": list(b.hparam_names),
                                      "grid": [list(p) for p in b.grid]}
                             for b in suite.baselines},
          "tasks": tasks_out,
          "aggregates": aggregates(tasks_out, reps=bootstrap_reps, seed=seed),
          "stats": {"computed": cache.computed, "cached": cache.cached}}


def lr_mult_grid(mults: Sequence[float]) -> tuple[float, ...]:
  """The multipliers a learned optimizer runs with: ``mults`` sorted, with 1 (the shipped
  step) always included; positive and finite, else ValueError."""
  out = sorted({float(m) for m in mults} | {1.0})
  if any(not (math.isfinite(m) and m > 0) for m in out):
    raise ValueError(f"learning-rate multipliers must be positive and finite, got "
                     f"{list(mults)}.")
  return tuple(out)


def weight_decay_grid(wds: Sequence[float]) -> tuple[float, ...]:
  """The learned optimizers' extra weight decays: ``wds`` sorted, 0 dropped (the
  multiplier grid already is the decay-free point); non-negative and finite, else
  ValueError."""
  if any(not (math.isfinite(w) and w >= 0) for w in map(float, wds)):
    raise ValueError(f"weight decays must be non-negative and finite, got {list(wds)}.")
  return tuple(sorted({float(w) for w in wds} - {0.0}))


def aggregates(tasks_out: dict, reps: int = 2000, seed: int = 0) -> dict:
  """IQM and 95% stratified-bootstrap intervals of each optimizer's loss ratio and
  speedup, over all tasks ("all") and, when the suite has several horizons, per horizon
  ("@<steps>")."""
  labels = list(next(iter(tasks_out.values()))["metrics"]) if tasks_out else []
  horizons = sorted({t["steps"] for t in tasks_out.values()})
  out = {}
  for label in labels:
    out[label] = {}
    for h in ["all"] + ([f"@{h}" for h in horizons] if len(horizons) > 1 else []):
      sel = [t for t in tasks_out.values() if h == "all" or f"@{t['steps']}" == h]
      out[label][h] = {
          m: metrics.aggregate(np.stack([np.asarray(t["metrics"][label][m], float)
                                         for t in sel]), reps=reps, seed=seed)
          for m in ("loss_ratio", "speedup")}
      out[label][h]["reached_fraction"] = float(np.mean(
          [np.mean(t["metrics"][label]["reached"]) for t in sel]))
  return out
