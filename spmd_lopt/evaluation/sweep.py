"""Sweeps: one optimizer class, many hyper-parameters x seeds, one vmapped program.

``sweep_fn`` is the pure ``(hparams[H], keys[S]) -> curves[H, S, ...]`` program behind the
CLI, the held-out suite and the periodic evaluator; ``evaluate_theta`` is the cached,
jitted final-loss evaluation of a theta; ``compare`` runs learned optimizers against an
Adam learning-rate grid on one task (the CLI's ``--task`` mode). Seed ``s`` uses the same
key (task sample, init, batches) for every optimizer (common random numbers).
"""

from __future__ import annotations

import functools
import json
import math
import zlib
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from spmd_lopt.evaluation import training as eval_training
from spmd_lopt.learned_optimizers import base as lopt_base
from spmd_lopt.learned_optimizers import checkpoint as lopt_checkpoint
from spmd_lopt.learned_optimizers import registry as lopt_registry
from spmd_lopt.learned_optimizers import specs as lopt_specs
from spmd_lopt.optimizers import base as opt_base
from spmd_lopt.tasks import base as tasks_base
from spmd_lopt.tasks import registry

TaskLike = Union[str, tasks_base.Task, tasks_base.TaskFamily]


def lopt_classes() -> dict[str, Any]:
  """The registered learned optimizers (``learned_optimizers.registry``), by the short
  names ``--lopt init:NAME`` and ``--expect`` take."""
  return {n: lopt_registry.get(n) for n in lopt_registry.names()}


def make_lopt(name: str, kwargs: Optional[Mapping[str, Any]] = None
              ) -> lopt_base.LearnedOptimizer:
  """``NAME(**kwargs)`` for a registered name."""
  return lopt_specs.build(name, kwargs)


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
             num_steps: int, eval_every: int, eval_batches: int = 5,
             eval_splits: Sequence[str] = ("train", "test")):
  """The pure ``(hparams[H, ...], keys[S]) -> curves[H, S, ...]`` function.

  ``curves[h, s]`` trains, with ``make_opt(hparams[h])`` (a theta, a learning rate...),
  the task ``family.task_fn(family.sample(k_task))`` from ``keys[s]`` split into
  ``(k_task, k_run)``, as ``eval_training.training_curves_fn`` does: ``train/loss``
  f32[H, S, num_steps]; ``eval/<split>/loss`` f32[H, S, E] for each of ``eval_splits``
  (default ``train`` and ``test``). Every ``h``
  sees the same tasks, inits and batches for a given ``s``.
  """

  def one(h, key):
    k_task, k_run = jax.random.split(key)
    task = family.task_fn(family.sample(k_task))
    run = eval_training.training_curves_fn(task, make_opt(h), num_steps, eval_every,
                                           eval_batches, tuple(eval_splits))
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


