"""The outer optimizer of theta from the ``outer_opt`` and ``frozen`` config sections.

``outer_opt`` = ``{name, learning_rate, b1, b2, eps, weight_decay, momentum, clip_value,
clip_global_norm, schedule}`` becomes one optax chain::

  clip(clip_value)? -> clip_by_global_norm(clip_global_norm)? -> adam | adamw | sgd(lr_t)

with ``lr_t = schedule(t)`` (``t`` = outer step). ``frozen`` (a regex) wraps the chain in
``freeze``: leaves whose '/'-joined theta path matches get a zero update and keep no
optimizer state; the rest see exactly the chain above (their global norm ignores frozen
leaves). The learner needs no change: it still calls ``theta_opt.update``.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import optax

from spmd_lopt.config import checks
from spmd_lopt import tree_utils
from spmd_lopt.optimizers import base as opt_base

OPTIMIZERS = ("adam", "adamw", "sgd")

# schedule name -> (optax factory, the argument the learning rate fills, the argument
# that defaults to config.outer_steps)
SCHEDULES = {
    "constant": (optax.constant_schedule, "value", None),
    "cosine": (optax.cosine_decay_schedule, "init_value", "decay_steps"),
    "warmup_cosine": (optax.warmup_cosine_decay_schedule, "peak_value", "decay_steps"),
    "linear": (optax.linear_schedule, "init_value", "transition_steps"),
    "exponential": (optax.exponential_decay, "init_value", "transition_steps"),
}
_SCHEDULE_DEFAULTS = {"warmup_cosine": {"init_value": 0.0, "warmup_steps": 0},
                      "linear": {"end_value": 0.0}, "exponential": {"decay_rate": 0.5}}


def theta_paths(theta) -> list[str]:
  return [tree_utils.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(theta)[0]]


def freeze(tx: optax.GradientTransformation, pattern: str) -> optax.GradientTransformation:
  """``tx`` on the leaves whose path does not match ``pattern`` (``re.search``); zero
  updates (and no state) on those that do, i.e. their meta-gradient is masked to 0."""
  regex = re.compile(pattern)

  def labels(params):
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    return jax.tree_util.tree_unflatten(
        treedef, ["frozen" if regex.search(tree_utils.path_str(p)) else "train" for p, _ in flat])

  return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def schedule(sec: Mapping[str, Any], lr: float, outer_steps: int):
  where = "config.outer_opt.schedule"
  sched = dict(sec)
  name = sched.pop("name", "constant")
  if not isinstance(name, str) or name not in SCHEDULES:
    raise ValueError(f"{where}.name must be one of {', '.join(SCHEDULES)}, got {name!r}."
                     f"{checks.did_you_mean(name, SCHEDULES)}")
  fn, lr_arg, steps_arg = SCHEDULES[name]
  checks.check_kwargs(where, fn, sched, f"schedule {name!r}", skip=(lr_arg,))
  kwargs = dict(_SCHEDULE_DEFAULTS.get(name, {}), **sched)
  kwargs[lr_arg] = lr
  if steps_arg is not None:
    kwargs.setdefault(steps_arg, outer_steps)
  for k, v in kwargs.items():
    if k.endswith("_steps") or k == "transition_begin":
      checks.as_int(f"{where}.{k}", v, low=0 if k in ("warmup_steps", "transition_begin")
                    else 1)
    elif checks.is_real(v):
      checks.as_float(f"{where}.{k}", v)
  if name == "warmup_cosine" and kwargs["warmup_steps"] > kwargs["decay_steps"]:
    raise ValueError(f"{where}.warmup_steps ({kwargs['warmup_steps']}) must not exceed "
                     f"decay_steps ({kwargs['decay_steps']}).")
  if name == "exponential":
    checks.as_float(f"{where}.decay_rate", kwargs["decay_rate"], low=0.0, low_open=True)
  return fn(**kwargs)


def check_section(sec: Mapping[str, Any]) -> None:
  known = set(_defaults())
  checks.check_known_keys("config.outer_opt", sec, known, "outer_opt")
  name = sec["name"]
  if not isinstance(name, str) or name not in OPTIMIZERS:
    raise ValueError(f"config.outer_opt.name must be one of {', '.join(OPTIMIZERS)}, got "
                     f"{name!r}.{checks.did_you_mean(name, OPTIMIZERS)}")
  w = "config.outer_opt"
  checks.as_float(f"{w}.learning_rate", sec["learning_rate"], low=0.0, low_open=True)
  checks.as_float(f"{w}.b1", sec["b1"], low=0.0, high=1.0)
  checks.as_float(f"{w}.b2", sec["b2"], low=0.0, high=1.0)
  checks.as_float(f"{w}.eps", sec["eps"], low=0.0)
  checks.as_float(f"{w}.weight_decay", sec["weight_decay"], low=0.0)
  checks.as_float(f"{w}.momentum", sec["momentum"], low=0.0, high=1.0)
  checks.as_float(f"{w}.clip_value", sec["clip_value"], low=0.0)
  checks.as_float(f"{w}.clip_global_norm", sec["clip_global_norm"], low=0.0)
  if name != "adamw" and sec["weight_decay"] != 0:
    raise ValueError(f"{w}.weight_decay is only used by adamw (name is {name!r}).")
  if name != "sgd" and sec["momentum"] != 0:
    raise ValueError(f"{w}.momentum is only used by sgd (name is {name!r}).")
  if not isinstance(sec["schedule"], Mapping):
    raise ValueError(f"{w}.schedule must be a section with a name, got "
                     f"{sec['schedule']!r}.")


def _defaults():
  from spmd_lopt.config import schema  # pylint: disable=import-outside-toplevel
  return schema.outer_opt_defaults()


def make_outer_optimizer(sec: Mapping[str, Any], outer_steps: int,
                         frozen: str = "", theta=None) -> opt_base.Optimizer:
  """The ``Optimizer`` of theta that ``outer_opt`` and ``frozen`` describe. ``theta``
  (values or shapes) lets a ``frozen`` pattern that matches no leaf fail here."""
  sec = dict(_defaults(), **sec)
  check_section(sec)
  lr = schedule(sec["schedule"], float(sec["learning_rate"]), outer_steps)
  if sec["name"] == "sgd":
    tx = optax.sgd(lr, momentum=sec["momentum"] or None)
  elif sec["name"] == "adam":
    # eps_root as the reference's Adam (keeps sqrt differentiable at 0).
    tx = optax.adam(lr, b1=sec["b1"], b2=sec["b2"], eps=sec["eps"], eps_root=1e-8)
  else:
    tx = optax.adamw(lr, b1=sec["b1"], b2=sec["b2"], eps=sec["eps"], eps_root=1e-8,
                     weight_decay=sec["weight_decay"])
  parts = []
  if sec["clip_value"] > 0:
    parts.append(optax.clip(sec["clip_value"]))
  if sec["clip_global_norm"] > 0:
    parts.append(optax.clip_by_global_norm(sec["clip_global_norm"]))
  if parts:
    tx = optax.chain(*parts, tx)
  name = sec["name"]
  if frozen:
    checks.as_str("config.frozen", frozen)
    try:
      regex = re.compile(frozen)
    except re.error as e:
      raise ValueError(f"config.frozen is not a valid regex ({frozen!r}: {e}).") from None
    if theta is not None:
      paths = theta_paths(theta)
      if not any(regex.search(p) for p in paths):
        raise ValueError(f"config.frozen {frozen!r} matches no theta leaf; the leaves are: "
                         f"{', '.join(paths)}.")
    tx = freeze(tx, frozen)
    name += f"_frozen[{frozen}]"
  return opt_base.OptaxOptimizer(tx, name=name)
