"""The two spellings of a run config and the map from the short one to the full one.

Full form (big_vision style): the loop keys at the top, plus sections::

  lopt:       name (learned_optimizers.registry), init_from, constructor kwargs
  outer_opt:  name (adam | adamw | sgd), learning_rate, b1, b2, eps, weight_decay,
              momentum, clip_value, clip_global_norm, schedule {name, kwargs}
  frozen:     regex on '/'-joined theta paths whose meta-gradient is masked to 0
  estimators: a list; each entry: name, task, task_kwargs, augmentation {name, kwargs},
              num_tasks, truncation {name, kwargs}, trunc_length, std,
              random_initial_iteration_offset, meta_loss_split, options (kwargs)

Short form (``base_config()``): one flat level, one estimator per name in ``tasks``, all
sharing ``num_tasks``, ``trunc_length``, ... . ``to_nested`` maps it onto the full form,
so both build the same learner.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping

import ml_collections

from spmd_lopt.config import checks

# Keys the launcher, checkpoints and evaluation read at the top level, in both forms.
LOOP_KEYS = ("name", "seed", "outer_steps", "log_every", "steps_per_call", "num_devices",
             "checkpoint_every", "checkpoint_every_secs", "keep_checkpoints", "data_dir",
             "eval_every", "eval_tasks", "eval_steps", "eval_seeds")
SECTIONS = ("lopt", "outer_opt", "frozen", "estimators")


def base_config() -> ml_collections.ConfigDict:
  """The short form with every key and its default (the default job: PES on 10-d
  quadratics plus the embedded 8x8-digits image MLP, 8 tasks each)."""
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
  c.estimator = "pes"           # or "nres", "full_es", "truncated_grad", "full_grad"
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


def outer_opt_defaults() -> dict[str, Any]:
  return dict(name="adam", learning_rate=1e-3, b1=0.9, b2=0.999, eps=1e-8,
              weight_decay=0.0, momentum=0.0, clip_value=0.0, clip_global_norm=0.0,
              schedule=dict(name="constant"))


def estimator_defaults() -> dict[str, Any]:
  """One estimator entry with every key; entries in a config may set only some."""
  return dict(name="pes", task="quadratic", task_kwargs={},
              augmentation=dict(name="none"), num_tasks=8,
              truncation=dict(name="log_uniform", min_length=100, max_length=300),
              trunc_length=20, std=0.01, random_initial_iteration_offset=300,
              meta_loss_split=None, options={})


def nested_config() -> ml_collections.ConfigDict:
  """The full form with the default job (the same learner as ``base_config()``)."""
  return ml_collections.ConfigDict(to_nested(base_config()))


def to_plain(tree) -> Any:
  """ConfigDicts (also inside lists) as plain dicts, tuples as lists: JSON-able."""
  if isinstance(tree, (ml_collections.ConfigDict, ml_collections.FrozenConfigDict)):
    tree = tree.to_dict()
  if isinstance(tree, Mapping):
    return {str(k): to_plain(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return [to_plain(v) for v in tree]
  return tree


def is_nested(cfg) -> bool:
  """True for the full form (it has an ``estimators`` list or section-valued keys)."""
  return ("estimators" in cfg or isinstance(cfg.get("lopt"), Mapping)
          or isinstance(cfg.get("outer_opt"), Mapping)
          or isinstance(cfg.get("lopt"), ml_collections.ConfigDict))


def validate_flat(overrides, base=None) -> ml_collections.ConfigDict:
  """Merge short-form ``overrides`` into ``base_config()``; unknown keys raise a
  ValueError naming them."""
  base = base or base_config()
  unknown = sorted(set(overrides.keys()) - set(base.keys()))
  if unknown:
    hint = checks.did_you_mean(unknown[0], base.keys())
    raise ValueError(f"Unknown config key(s) {unknown}.{hint} Known keys: "
                     f"{sorted(base.keys())}.")
  merged = base_config()
  merged.update(dict(overrides))
  return merged


_LOPT_FLAT = (("lopt_hidden_size", "hidden_size"), ("lopt_hidden_layers", "hidden_layers"),
              ("lopt_step_mult", "step_mult"), ("lopt_exp_mult", "exp_mult"))


def to_nested(flat) -> dict[str, Any]:
  """The full form of a short-form config (plain dicts).

  ``tasks`` becomes one estimator per name with the shared keys; ``quadratic_dim``
  becomes ``task_kwargs.dim`` of ``quadratic`` entries; ``lopt_*`` become ``lopt``
  kwargs where the optimizer takes them (for ``mlp_lopt`` always, for others only when
  changed from the short form's defaults); ``outer_lr``/``outer_grad_clip`` become
  ``outer_opt.learning_rate``/``clip_value``.
  """
  flat = to_plain(flat)
  base = to_plain(base_config())
  merged = validate_flat(flat).to_dict()
  out = {k: merged[k] for k in LOOP_KEYS}
  from spmd_lopt.learned_optimizers import registry  # pylint: disable=import-outside-toplevel
  lopt = {"name": merged["lopt"]}
  accepts = ()
  if merged["lopt"] in registry.names():
    accepts = checks.signature_defaults(registry.get(merged["lopt"])).keys()
  for fkey, kw in _LOPT_FLAT:
    if kw in accepts and (merged["lopt"] == "mlp_lopt" or merged[fkey] != base[fkey]):
      lopt[kw] = merged[fkey]
  out["lopt"] = lopt
  out["outer_opt"] = dict(outer_opt_defaults(), name=merged["outer_opt"],
                          learning_rate=merged["outer_lr"],
                          clip_value=merged["outer_grad_clip"])
  out["frozen"] = ""
  if merged["truncation"] == "constant":
    trunc = dict(name="constant", total_length=merged["max_length"])
  elif merged["truncation"] == "log_uniform":
    trunc = dict(name="log_uniform", min_length=merged["min_length"],
                 max_length=merged["max_length"])
  else:
    raise ValueError(f"config.truncation must be 'log_uniform' or 'constant', got "
                     f"{merged['truncation']!r}.")
  names = merged["tasks"].split(",") if isinstance(merged["tasks"], str) else None
  if names is None:
    raise ValueError(f"config.tasks must be a comma-separated string, got "
                     f"{merged['tasks']!r}.")
  names = [n.strip() for n in names if n.strip()]
  if not names:
    raise ValueError("config.tasks names no task family.")
  out["estimators"] = []
  for n in names:
    est = dict(estimator_defaults(), name=merged["estimator"], task=n,
               num_tasks=merged["num_tasks"], truncation=copy.deepcopy(trunc),
               trunc_length=merged["trunc_length"], std=merged["std"],
               random_initial_iteration_offset=merged["random_initial_iteration_offset"])
    if n == "quadratic":
      est["task_kwargs"] = {"dim": merged["quadratic_dim"]}
    out["estimators"].append(est)
  return out


def check_loop_keys(cfg: Mapping[str, Any]) -> None:
  """Types and ranges of the top-level loop keys (both forms)."""
  ck = checks
  g = lambda k: cfg[k]
  for key in ("outer_steps", "log_every", "steps_per_call", "keep_checkpoints",
              "eval_steps", "eval_seeds"):
    ck.as_int(f"config.{key}", g(key), low=1)
  for key in ("seed",):
    ck.as_int(f"config.{key}", g(key), low=-checks.MAX_INT)
  for key in ("num_devices", "checkpoint_every", "eval_every"):
    ck.as_int(f"config.{key}", g(key), low=0)
  ck.as_float("config.checkpoint_every_secs", g("checkpoint_every_secs"), low=0.0)
  for key in ("name", "data_dir", "eval_tasks"):
    ck.as_str(f"config.{key}", g(key))
  spc = g("steps_per_call")
  for key in ("outer_steps", "checkpoint_every", "log_every"):
    if g(key) % spc:
      raise ValueError(f"config.{key} ({g(key)}) must be a multiple of "
                       f"config.steps_per_call ({spc}).")
