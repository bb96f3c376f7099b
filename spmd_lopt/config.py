"""The run configuration: one ``ml_collections.ConfigDict`` schema with every key and its
default, and the builders that turn a config into a learner.

Config files in ``configs/`` are Python files with ``get_config()`` returning overrides of
``base_config()``; ``load_config`` checks every key against the schema, so a typo is an
error that names the key and the known ones, not a silently ignored setting.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
from typing import Optional

import ml_collections

from spmd_lopt import sharding
from spmd_lopt.learned_optimizers import base as lopt_base
from spmd_lopt.learned_optimizers import mlp_lopt
from spmd_lopt.optimizers import base as opt_base
from spmd_lopt.outer_trainers import full_es
from spmd_lopt.outer_trainers import gradient_learner
from spmd_lopt.outer_trainers import lopt_truncated_step
from spmd_lopt.outer_trainers import truncated_grad
from spmd_lopt.outer_trainers import truncated_nres
from spmd_lopt.outer_trainers import truncated_pes
from spmd_lopt.outer_trainers import truncation_schedule
from spmd_lopt.tasks import base as tasks_base
from spmd_lopt.tasks import quadratics
from spmd_lopt.tasks import registry


def base_config() -> ml_collections.ConfigDict:
  """Every config key, with its default (the default job: PES on 10-d quadratics plus the
  embedded 8x8-digits image MLP, 8 tasks each)."""
  c = ml_collections.ConfigDict()
  c.name = "default"
  c.seed = 0
  c.outer_steps = 300
  c.log_every = 10
  c.steps_per_call = 1          # meta steps per dispatch (lax.scan over update)
  c.num_devices = 0             # 0: all global devices on the task axis
  # Checkpoints (<workdir>/checkpoints): every N outer steps and/or every S seconds, and
  # at the end of the run; 0 and 0 = only on SIGTERM/SIGINT. See spmd_lopt.checkpoints.
  c.checkpoint_every = 0
  c.checkpoint_every_secs = 600.0
  c.keep_checkpoints = 3
  # Inner problems: comma-separated task-family names, one estimator each.
  c.tasks = "quadratic,ImageMLP_Digits8_Relu32"
  c.quadratic_dim = 10
  c.data_dir = ""               # real data sets; "" = $SPMD_LOPT_DATA or ~/.cache/spmd_lopt
  c.num_tasks = 8               # per estimator, across the whole mesh
  # Truncations.
  c.truncation = "log_uniform"  # or "constant" (then max_length is the length)
  c.min_length = 100
  c.max_length = 300
  c.random_initial_iteration_offset = 300
  c.trunc_length = 20
  # Gradient estimator.
  c.estimator = "pes"           # or "nres", "full_es", "truncated_grad"
  c.std = 0.01
  # Learned optimizer.
  c.lopt = "mlp_lopt"
  c.lopt_hidden_size = 32
  c.lopt_hidden_layers = 2
  c.lopt_step_mult = 0.001
  c.lopt_exp_mult = 0.001
  # Outer optimizer.
  c.outer_opt = "adam"
  c.outer_lr = 1e-3
  c.outer_grad_clip = 0.0       # > 0: clip theta-gradient entries to [-c, c]
  # --- periodic evaluation (spmd_lopt.evaluate.PeriodicEvaluator) ---
  c.eval_every = 0              # outer steps between evaluations; 0 = off
  c.eval_tasks = ""             # comma-separated task (family) names; "" = c.tasks
  c.eval_steps = 300            # inner steps per evaluation run
  c.eval_seeds = 4              # runs (held-out task samples) per task
  # --- end periodic evaluation ---
  return c


def _load_file(path: str) -> ml_collections.ConfigDict:
  if not os.path.exists(path):
    raise FileNotFoundError(f"Config file {path!r} does not exist.")
  spec = importlib.util.spec_from_file_location("spmd_lopt_user_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"Config file {path!r} must define get_config().")
  return module.get_config()


def validate(overrides, base: Optional[ml_collections.ConfigDict] = None):
  """Merge ``overrides`` into the schema; unknown keys raise a ValueError naming them."""
  base = base or base_config()
  unknown = sorted(set(overrides.keys()) - set(base.keys()))
  if unknown:
    raise ValueError(f"Unknown config key(s) {unknown}. Known keys: {sorted(base.keys())}.")
  merged = base_config()
  merged.update(dict(overrides))
  return merged


def load_config(path: Optional[str] = None) -> ml_collections.ConfigDict:
  """``base_config()`` updated with ``path``'s ``get_config()``, validated and locked."""
  cfg = base_config() if path is None else validate(_load_file(path))
  cfg.lock()
  return cfg


def check_values(cfg) -> None:
  """Reject settings that would otherwise fail deep inside tracing."""
  for key in ("outer_steps", "num_tasks", "trunc_length", "log_every", "steps_per_call",
              "min_length", "max_length", "quadratic_dim"):
    if int(cfg[key]) <= 0:
      raise ValueError(f"config.{key} must be a positive integer, got {cfg[key]!r}.")
  if cfg.checkpoint_every < 0 or cfg.checkpoint_every_secs < 0:
    raise ValueError("config.checkpoint_every and config.checkpoint_every_secs must be "
                     ">= 0 (0 turns that trigger off).")
  if cfg.keep_checkpoints < 1:
    raise ValueError(f"config.keep_checkpoints must be >= 1, got {cfg.keep_checkpoints}.")
  if cfg.random_initial_iteration_offset < 0:
    raise ValueError("config.random_initial_iteration_offset must be >= 0.")
  if cfg.outer_steps % cfg.steps_per_call:
    raise ValueError(f"config.outer_steps ({cfg.outer_steps}) must be a multiple of "
                     f"config.steps_per_call ({cfg.steps_per_call}).")
  if cfg.checkpoint_every % cfg.steps_per_call:
    raise ValueError(f"config.checkpoint_every ({cfg.checkpoint_every}) must be a multiple "
                     f"of config.steps_per_call ({cfg.steps_per_call}).")
  if cfg.log_every % cfg.steps_per_call:
    raise ValueError(f"config.log_every ({cfg.log_every}) must be a multiple of "
                     f"config.steps_per_call ({cfg.steps_per_call}).")


def make_task_family(name: str, cfg) -> tasks_base.TaskFamily:
  """A family by registry name; ``quadratic`` takes ``cfg.quadratic_dim`` and tasks on
  real data take ``cfg.data_dir``."""
  if name == "quadratic":
    return quadratics.FixedDimQuadraticFamily(cfg.quadratic_dim)
  kwargs = {}
  if cfg.data_dir and name in registry.task_names():
    if "data_dir" in inspect.signature(registry._TASKS[name]).parameters:  # pylint: disable=protected-access
      kwargs["data_dir"] = cfg.data_dir
  return registry.get_task_family(name, **kwargs)


def make_lopt(cfg) -> lopt_base.LearnedOptimizer:
  if cfg.lopt == "mlp_lopt":
    return mlp_lopt.MLPLOpt(exp_mult=cfg.lopt_exp_mult, step_mult=cfg.lopt_step_mult,
                            hidden_size=cfg.lopt_hidden_size,
                            hidden_layers=cfg.lopt_hidden_layers)
  if cfg.lopt == "learnable_adam":
    return lopt_base.LearnableAdam()
  if cfg.lopt == "learnable_sgd":
    return lopt_base.LearnableSGD()
  raise ValueError(f"Unknown lopt {cfg.lopt!r}. Known: mlp_lopt, learnable_adam, "
                   "learnable_sgd.")


def make_trunc_sched(cfg) -> truncation_schedule.TruncationSchedule:
  if cfg.truncation == "log_uniform":
    return truncation_schedule.LogUniformLengthSchedule(cfg.min_length, cfg.max_length)
  if cfg.truncation == "constant":
    return truncation_schedule.ConstantTruncationSchedule(cfg.max_length)
  raise ValueError(f"Unknown truncation {cfg.truncation!r}. Known: log_uniform, constant.")


def make_theta_opt(cfg) -> opt_base.Optimizer:
  if cfg.outer_opt == "adam":
    opt = opt_base.Adam(cfg.outer_lr)
  elif cfg.outer_opt == "sgd":
    opt = opt_base.SGD(cfg.outer_lr)
  else:
    raise ValueError(f"Unknown outer_opt {cfg.outer_opt!r}. Known: adam, sgd.")
  if cfg.outer_grad_clip > 0:
    opt = opt_base.GradientClipOptimizer(opt, cfg.outer_grad_clip)
  return opt


ESTIMATORS = ("pes", "nres", "full_es", "truncated_grad")


def make_estimator(family, lopt, cfg):
  """One estimator for ``family``. Truncated estimators (pes, nres, truncated_grad) unroll
  ``trunc_length`` steps of trajectories whose lengths come from ``config.truncation``;
  full_es unrolls whole trajectories with those lengths (its truncated step never ends
  a trajectory itself; its scan runs in chunks of ``trunc_length`` steps)."""
  if cfg.estimator not in ESTIMATORS:
    raise ValueError(f"Unknown estimator {cfg.estimator!r}. Known: {', '.join(ESTIMATORS)}.")
  sched = make_trunc_sched(cfg)
  if cfg.estimator == "full_es":
    step = lopt_truncated_step.VectorizedLOptTruncatedStep(
        family, lopt, truncation_schedule.NeverEndingTruncationSchedule(),
        num_tasks=cfg.num_tasks)
    return full_es.FullES(step, sched, std=cfg.std, chunk_length=cfg.trunc_length)
  step = lopt_truncated_step.VectorizedLOptTruncatedStep(
      family, lopt, sched, num_tasks=cfg.num_tasks,
      random_initial_iteration_offset=cfg.random_initial_iteration_offset)
  if cfg.estimator == "pes":
    return truncated_pes.TruncatedPES(truncated_step=step, trunc_length=cfg.trunc_length,
                                      std=cfg.std, steps_per_jit=None)
  if cfg.estimator == "nres":
    return truncated_nres.TruncatedNRES(truncated_step=step, trunc_length=cfg.trunc_length,
                                        std=cfg.std, steps_per_jit=None)
  return truncated_grad.TruncatedGrad(step, unroll_length=cfg.trunc_length,
                                      steps_per_jit=None)


def make_learner(cfg, mesh=None) -> gradient_learner.SpmdGradientLearner:
  """Build the learner a config describes, over ``mesh`` (default: ``num_devices``)."""
  check_values(cfg)
  if mesh is None:
    mesh = sharding.make_mesh(num_devices=cfg.num_devices or None)
  lopt = make_lopt(cfg)
  names = [n.strip() for n in cfg.tasks.split(",") if n.strip()]
  if not names:
    raise ValueError("config.tasks names no task family.")
  estimators = [make_estimator(make_task_family(n, cfg), lopt, cfg) for n in names]
  return gradient_learner.SpmdGradientLearner(lopt, estimators, make_theta_opt(cfg),
                                              mesh=mesh, num_steps=cfg.outer_steps)
