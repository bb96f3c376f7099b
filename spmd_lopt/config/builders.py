"""Config sections -> objects: the learned optimizer, task families (with augmentation),
truncation schedules, gradient estimators and the learner.

``resolve(cfg)`` checks a config of either form and returns the full form with every
default filled in (what ``--print_config`` prints); ``make_learner`` builds from it. Each
section's keys are checked against the constructor it feeds, and each value against that
argument's type, before any constructor runs.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any, Mapping

import jax

from spmd_lopt import sharding
from spmd_lopt.config import checks
from spmd_lopt.config import outer_opt as outer_opt_lib
from spmd_lopt.config import schema
from spmd_lopt.config.lopt_section import (check_lopt_kwargs, lopt_factory, lopt_kwargs,
                                           make_lopt_from_section)
from spmd_lopt.outer_trainers import full_es
from spmd_lopt.outer_trainers import full_grad
from spmd_lopt.outer_trainers import gradient_learner
from spmd_lopt.outer_trainers import lopt_truncated_step
from spmd_lopt.outer_trainers import truncated_grad
from spmd_lopt.outer_trainers import truncated_nres
from spmd_lopt.outer_trainers import truncated_pes
from spmd_lopt.outer_trainers import truncation_schedule
from spmd_lopt.tasks import base as tasks_base
from spmd_lopt.tasks import registry as task_registry

ESTIMATORS = ("pes", "nres", "full_es", "truncated_grad", "full_grad")
TRUNCATIONS = {"log_uniform": truncation_schedule.LogUniformLengthSchedule,
               "constant": truncation_schedule.ConstantTruncationSchedule}
AUGMENTATIONS = {"none": None, "reparam_global": "global", "reparam_tensor": "tensor"}
# The estimator constructors' arguments that the config sets itself (not via options).
_SET_BY_CONFIG = ("truncated_step", "truncation_schedule", "trunc_length", "unroll_length",
                  "std", "task_family", "learned_opt", "trunc_sched", "num_tasks",
                  "random_initial_iteration_offset")
_ESTIMATOR_CLASSES = {"pes": truncated_pes.TruncatedPES, "nres": truncated_nres.TruncatedNRES,
                      "full_es": full_es.FullES, "truncated_grad": truncated_grad.TruncatedGrad,
                      "full_grad": full_grad.FullGrad}


# --- task families --------------------------------------------------------------------

def check_task_entry(where: str, est: Mapping[str, Any]):
  """``(task name, task_kwargs, constructor or None)`` of an entry, kwargs checked
  against the constructor when the registry names one."""
  name = checks.as_str(f"{where}.task", est["task"])
  kwargs = dict(est["task_kwargs"])
  ctor = task_registry.constructor(name)
  if ctor is not None:
    checks.check_kwargs(f"{where}.task_kwargs", ctor, kwargs, f"task {name!r}")
    for k, v in kwargs.items():
      if k in ("dim", "batch_size", "hidden_size") and checks.is_int(v):
        checks.as_int(f"{where}.task_kwargs.{k}", v, low=1, high=2**16)
  return name, kwargs, ctor


def make_task_family_from_entry(where: str, est: Mapping[str, Any],
                                data_dir: str = "") -> tasks_base.TaskFamily:
  """The entry's ``task`` (a ``tasks.registry`` name) with ``task_kwargs`` (checked
  against its constructor; ``data_dir`` comes from the top level when it takes one),
  wrapped by its ``augmentation``."""
  name, kwargs, ctor = check_task_entry(where, est)
  if ctor is not None and data_dir and "data_dir" in inspect.signature(ctor).parameters:
    kwargs.setdefault("data_dir", data_dir)
  try:
    family = task_registry.get_task_family(name, **kwargs)
  except TypeError as e:
    raise ValueError(f"{where}.task_kwargs for task {name!r}: {e}") from None
  except ValueError as e:
    if "Unknown task family" in str(e):
      raise ValueError(f"{where}.task: {e}") from None
    raise ValueError(f"{where} (task {name!r}): {e}") from None
  return make_augmentation(f"{where}.augmentation", est["augmentation"], family)


def make_augmentation(where: str, sec: Mapping[str, Any], family):
  """``none``: the family itself; ``reparam_global``/``reparam_tensor``:
  ``ReparamWeightsFamily(family, level, **kwargs)`` (e.g. ``param_scale_range``)."""
  name, sec = check_augmentation(where, sec)
  if name == "none":
    return family
  try:
    from spmd_lopt.tasks import augmentation  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ValueError(f"{where}.name {name!r} needs spmd_lopt.tasks.augmentation, which "
                     "this installation lacks.") from None
  cls = augmentation.ReparamWeightsFamily
  checks.check_kwargs(where, cls, {k: v for k, v in sec.items() if k != "param_scale_range"},
                      f"augmentation {name!r}", skip=("family", "level", "param_scale_range"))
  try:
    return cls(family, level=AUGMENTATIONS[name], **sec)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{where}: {e}") from None


def check_augmentation(where: str, sec: Mapping[str, Any]):
  """``(name, kwargs)`` of an augmentation section, name and ``param_scale_range``
  checked (the latter becomes a tuple)."""
  sec = dict(sec)
  name = sec.pop("name", "none")
  if not isinstance(name, str) or name not in AUGMENTATIONS:
    raise ValueError(f"{where}.name must be one of {', '.join(AUGMENTATIONS)}, got "
                     f"{name!r}.{checks.did_you_mean(name, AUGMENTATIONS)}")
  if name == "none":
    checks.check_known_keys(where, sec, (), "augmentation 'none'")
  if "param_scale_range" in sec:
    r = sec["param_scale_range"]
    if not isinstance(r, (list, tuple)) or len(r) != 2:
      raise ValueError(f"{where}.param_scale_range must be [low, high], got {r!r}.")
    lo = checks.as_float(f"{where}.param_scale_range[0]", r[0], low=0.0, low_open=True)
    checks.as_float(f"{where}.param_scale_range[1]", r[1], low=lo)
    sec["param_scale_range"] = tuple(float(x) for x in r)
  return name, sec


# --- truncations and estimators -------------------------------------------------------

def make_truncation(where: str, sec: Mapping[str, Any]):
  sec = dict(sec)
  name = sec.pop("name", None)
  if not isinstance(name, str) or name not in TRUNCATIONS:
    raise ValueError(f"{where}.name must be one of {', '.join(TRUNCATIONS)}, got "
                     f"{name!r}.{checks.did_you_mean(name, TRUNCATIONS)}")
  cls = TRUNCATIONS[name]
  checks.check_kwargs(where, cls, sec, f"truncation {name!r}")
  for k, v in sec.items():
    checks.as_int(f"{where}.{k}", v, low=1)
  missing = [n for n, p in inspect.signature(cls).parameters.items()
             if p.default is inspect.Parameter.empty and n not in sec]
  if missing:
    raise ValueError(f"{where} ({name}) needs {', '.join(missing)}.")
  if name == "log_uniform" and sec["min_length"] > sec["max_length"]:
    raise ValueError(f"{where}.min_length ({sec['min_length']}) must be <= max_length "
                     f"({sec['max_length']}).")
  return cls(**sec)


def check_estimator_entry(where: str, est: Mapping[str, Any]) -> None:
  """Keys and values of one ``estimators`` entry (defaults already filled)."""
  checks.check_known_keys(where, est, schema.estimator_defaults(), "an estimator")
  name = est["name"]
  if not isinstance(name, str) or name not in ESTIMATORS:
    raise ValueError(f"{where}.name: unknown estimator {name!r}."
                     f"{checks.did_you_mean(name, ESTIMATORS)} Known: {', '.join(ESTIMATORS)}.")
  checks.as_int(f"{where}.num_tasks", est["num_tasks"], low=1)
  checks.as_int(f"{where}.trunc_length", est["trunc_length"], low=1)
  checks.as_int(f"{where}.random_initial_iteration_offset",
                est["random_initial_iteration_offset"], low=0)
  checks.as_float(f"{where}.std", est["std"], low=0.0, low_open=True)
  split = est["meta_loss_split"]
  if split is not None:
    checks.as_str(f"{where}.meta_loss_split", split)
  for sec in ("task_kwargs", "augmentation", "truncation", "options"):
    if not isinstance(est[sec], Mapping):
      raise ValueError(f"{where}.{sec} must be a section (a dict), got {est[sec]!r}.")
  checks.check_kwargs(f"{where}.options", _ESTIMATOR_CLASSES[name], est["options"],
                      f"estimator {name!r}", skip=_SET_BY_CONFIG)
  for k, v in est["options"].items():
    if (k.startswith("steps_per") or k.endswith(("_samples", "_length", "_chunk"))
        and checks.is_int(v)):
      checks.as_int(f"{where}.options.{k}", v, low=1)


def _builder_options(est: Mapping[str, Any]) -> dict[str, Any]:
  """Options the builder sets unless the entry's ``options`` do: whole unrolls (full_es,
  full_grad) run in chunks of ``trunc_length`` steps."""
  if est["name"] in ("full_es", "full_grad"):
    return {"chunk_length": est["trunc_length"]}
  return {}


def make_estimator_from_entry(where: str, est: Mapping[str, Any], family, lopt):
  """One gradient estimator. Truncated estimators (pes, nres, truncated_grad) unroll
  ``trunc_length`` steps of trajectories whose lengths come from ``truncation``; the
  whole-unroll ones (full_es, full_grad) unroll trajectories of exactly those lengths in
  chunks of ``trunc_length`` steps."""
  check_estimator_entry(where, est)
  sched = make_truncation(f"{where}.truncation", est["truncation"])
  name, opts = est["name"], dict(est["options"])
  n, std, trunc = est["num_tasks"], est["std"], est["trunc_length"]
  try:
    if name in ("full_es", "full_grad"):
      step = lopt_truncated_step.VectorizedLOptTruncatedStep(
          family, lopt, truncation_schedule.NeverEndingTruncationSchedule(), num_tasks=n,
          meta_loss_split=est["meta_loss_split"])
      opts = dict(_builder_options(est), **opts)
      if name == "full_es":
        return full_es.FullES(step, sched, std=std, **opts)
      return full_grad.FullGrad(step, sched, **opts)
    step = lopt_truncated_step.VectorizedLOptTruncatedStep(
        family, lopt, sched, num_tasks=n,
        random_initial_iteration_offset=est["random_initial_iteration_offset"],
        meta_loss_split=est["meta_loss_split"])
    opts = dict(_builder_options(est), **opts)
    if name == "truncated_grad":
      return truncated_grad.TruncatedGrad(step, unroll_length=trunc, **opts)
    return _ESTIMATOR_CLASSES[name](truncated_step=step, trunc_length=trunc, std=std,
                                    **opts)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{where} ({name}): {e}") from None


# --- the whole config -----------------------------------------------------------------

def _fill(cfg) -> dict[str, Any]:
  """The full form of ``cfg`` (either form) with section defaults filled in."""
  plain = schema.to_plain(cfg)
  if not isinstance(plain, Mapping):
    raise ValueError(f"A config must be a ConfigDict or dict, got {type(cfg).__name__}.")
  if not schema.is_nested(plain):
    check_flat_values(plain)
    return _fill(schema.to_nested(plain))
  top = schema.to_plain(schema.base_config())
  known = set(schema.LOOP_KEYS) | set(schema.SECTIONS)
  flat_only = sorted(k for k in plain if k in top and k not in known)
  if flat_only:
    raise ValueError(f"config mixes short-form key(s) {flat_only} with sections; in the "
                     "full form set them inside lopt/outer_opt/estimators.")
  checks.check_known_keys("config", plain, known, "the full form")
  out = {k: plain.get(k, top[k]) for k in schema.LOOP_KEYS}
  lopt = plain.get("lopt", {"name": "mlp_lopt"})
  if not isinstance(lopt, Mapping):
    raise ValueError(f"config.lopt must be a section with a name, got {lopt!r}.")
  out["lopt"] = dict(lopt)
  oo = plain.get("outer_opt", {})
  if not isinstance(oo, Mapping):
    raise ValueError(f"config.outer_opt must be a section, got {oo!r}.")
  out["outer_opt"] = dict(schema.outer_opt_defaults(), **oo)
  out["frozen"] = plain.get("frozen", "")
  ests = plain.get("estimators")
  if not isinstance(ests, list) or not ests:
    raise ValueError(f"config.estimators must be a non-empty list of sections, got "
                     f"{ests!r}.")
  out["estimators"] = []
  for i, e in enumerate(ests):
    if not isinstance(e, Mapping):
      raise ValueError(f"config.estimators.{i} must be a section (a dict), got {e!r}.")
    checks.check_known_keys(f"config.estimators.{i}", e, schema.estimator_defaults(),
                            "an estimator")
    out["estimators"].append(dict(copy.deepcopy(schema.estimator_defaults()), **e))
  return out


def check_flat_values(cfg: Mapping[str, Any]) -> None:
  """Short-form values that would otherwise fail deep inside tracing."""
  for key in ("outer_steps", "num_tasks", "trunc_length", "log_every", "steps_per_call",
              "min_length", "max_length", "quadratic_dim"):
    v = cfg.get(key, 1)
    if not checks.is_int(v) or v <= 0 or v > checks.MAX_INT:
      raise ValueError(f"config.{key} must be a positive integer, got {v!r}.")
  if cfg.get("checkpoint_every", 0) < 0 or cfg.get("checkpoint_every_secs", 0) < 0:
    raise ValueError("config.checkpoint_every and config.checkpoint_every_secs must be "
                     ">= 0 (0 turns that trigger off).")
  if cfg.get("keep_checkpoints", 1) < 1:
    raise ValueError(f"config.keep_checkpoints must be >= 1, got {cfg['keep_checkpoints']}.")
  if cfg.get("random_initial_iteration_offset", 0) < 0:
    raise ValueError("config.random_initial_iteration_offset must be >= 0.")


def resolve(cfg, fill_defaults: bool = False) -> dict[str, Any]:
  """Check ``cfg`` (either form) without building anything heavy; return its full form.

  With ``fill_defaults`` the learned optimizer's and each estimator's constructor defaults
  are written out too, so the result lists every key that can be set.
  """
  out = _fill(cfg)
  schema.check_loop_keys(out)
  factory = lopt_factory(out["lopt"])
  check_lopt_kwargs(factory, lopt_kwargs(out["lopt"]), out["lopt"]["name"])
  outer_opt_lib.check_section(out["outer_opt"])
  checks.as_str("config.frozen", out["frozen"])
  outer_opt_lib.schedule(out["outer_opt"]["schedule"], 1.0, out["outer_steps"])
  for i, est in enumerate(out["estimators"]):
    where = f"config.estimators.{i}"
    check_estimator_entry(where, est)
    make_truncation(f"{where}.truncation", est["truncation"])
    check_task_entry(where, est)
    check_augmentation(f"{where}.augmentation", est["augmentation"])
  if fill_defaults:
    out["lopt"] = dict(checks.signature_defaults(factory), **out["lopt"])
    out["lopt"].setdefault("init_from", "")
    for i, est in enumerate(out["estimators"]):
      make_truncation(f"config.estimators.{i}.truncation", est["truncation"])  # checks it
      est["options"] = {**checks.signature_defaults(_ESTIMATOR_CLASSES[est["name"]],
                                                    skip=_SET_BY_CONFIG),
                        **_builder_options(est), **est["options"]}
  return out


def task_names(cfg) -> list[str]:
  """The training task names of a config (either form), in estimator order."""
  return [e["task"] for e in _fill(cfg)["estimators"]]


def make_learner(cfg, mesh=None) -> gradient_learner.SpmdGradientLearner:
  """Build the learner a config (either form) describes, over ``mesh`` (default:
  ``num_devices`` devices, 0 = all)."""
  full = resolve(cfg)
  if mesh is None:
    mesh = sharding.make_mesh(num_devices=full["num_devices"] or None)
  lopt = make_lopt_from_section(full["lopt"])
  ests = []
  for i, est in enumerate(full["estimators"]):
    where = f"config.estimators.{i}"
    family = make_task_family_from_entry(where, est, full["data_dir"])
    ests.append(make_estimator_from_entry(where, est, family, lopt))
  theta_opt = outer_opt_lib.make_outer_optimizer(
      full["outer_opt"], full["outer_steps"], full["frozen"],
      theta=jax.eval_shape(lopt.init, jax.random.key(0)))
  return gradient_learner.SpmdGradientLearner(lopt, ests, theta_opt, mesh=mesh)


def abstract_learner_state(cfg, mesh=None):
  """Build the learner and trace its init abstractly (no compute): the cheap end-to-end
  check of a config."""
  learner = make_learner(cfg, mesh=mesh)
  return learner, learner.abstract_state()

