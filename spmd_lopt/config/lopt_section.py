"""The ``lopt`` section -> a learned optimizer: ``name`` from the registry, the other keys
checked against its constructor, and ``init_from`` (any ``learned_optimizers.resolve``
spec) as the theta the learner starts from, checked against the configured structure."""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax

from spmd_lopt import learned_optimizers
from spmd_lopt.config import checks
from spmd_lopt.config import outer_opt as outer_opt_lib
from spmd_lopt.learned_optimizers import base as lopt_base
from spmd_lopt.learned_optimizers import registry as lopt_registry

# A theta this large is a typo in a size argument, not a learned optimizer.
MAX_THETA_SIZE = 10**8


def lopt_factory(sec: Mapping[str, Any]):
  name = sec.get("name")
  known = lopt_registry.names()
  if not isinstance(name, str) or name not in known:
    raise ValueError(f"config.lopt.name must be a registered learned optimizer, got "
                     f"{name!r}.{checks.did_you_mean(name, known)} Known: {', '.join(known)}.")
  return lopt_registry.get(name)


def lopt_kwargs(sec: Mapping[str, Any]) -> dict[str, Any]:
  return {k: v for k, v in sec.items() if k not in ("name", "init_from")}


def check_lopt_kwargs(factory, kwargs: Mapping[str, Any], name: str) -> None:
  """Keys and types from the constructor's signature; ranges from the zoo's naming
  conventions (initial rates and epsilons positive, decays and betas in [0, 1), at most
  64 layers), so a theta never starts as NaN."""
  checks.check_kwargs("config.lopt", factory, kwargs, f"lopt {name!r}")
  for k, v in kwargs.items():
    key = f"config.lopt.{k}"
    if "layers" in k and checks.is_int(v) and v > 64:
      raise ValueError(f"{key} must be at most 64, got {v}.")
    if k.startswith("initial_") and ("lr" in k or "learning_rate" in k or "epsilon" in k):
      checks.as_float(key, v, low=0.0, low_open=True)
    if k.startswith("initial_beta"):
      checks.as_float(key, v, low=0.0, high=1.0)
      if v == 1.0:
        raise ValueError(f"{key} must be below 1, got {v!r}.")
    if k.endswith("_decays") and isinstance(v, (list, tuple)):
      for i, x in enumerate(v):
        checks.as_float(f"{key}[{i}]", x, low=0.0, high=1.0)
        if x == 1.0:
          raise ValueError(f"{key}[{i}] must be below 1, got {x!r}.")
    if checks.is_int(v) and ("hidden" in k or k.endswith("_size")) and v < 1:
      raise ValueError(f"{key} must be positive, got {v}.")


def make_lopt_from_section(sec: Mapping[str, Any]) -> lopt_base.LearnedOptimizer:
  """``registry.get(lopt.name)(**kwargs)``, kwargs checked against its signature; with
  ``lopt.init_from`` set, ``init`` returns that theta (see ``resolve_init_from``)."""
  factory = lopt_factory(sec)
  kwargs = lopt_kwargs(sec)
  check_lopt_kwargs(factory, kwargs, sec["name"])
  try:
    lopt = factory(**kwargs)
  except (TypeError, ValueError) as e:
    raise ValueError(f"config.lopt ({sec['name']}): {e}") from None
  shapes = _abstract_theta(lopt, sec["name"])
  init_from = sec.get("init_from", "")
  if init_from:
    theta = resolve_init_from(checks.as_str("config.lopt.init_from", init_from), shapes)
    lopt.init = lambda key, _theta=theta: _theta  # the learner starts from this theta
  return lopt


def _abstract_theta(lopt, name: str):
  try:
    shapes = jax.eval_shape(lopt.init, jax.random.key(0))
  except (TypeError, ValueError) as e:
    raise ValueError(f"config.lopt ({name}) cannot build its theta: {e}") from None
  size = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))
  if size > MAX_THETA_SIZE:
    raise ValueError(f"config.lopt ({name}) makes a theta of {size:,} entries (limit "
                     f"{MAX_THETA_SIZE:,}); check its size arguments.")
  return shapes


def resolve_init_from(spec: str, shapes):
  """The theta ``spmd_lopt.learned_optimizers.resolve(spec)`` names, checked against the
  configured optimizer's theta structure and shapes."""
  got = learned_optimizers.resolve(spec)
  theta = got[1] if isinstance(got, tuple) else got
  want = jax.tree.map(lambda s: (tuple(s.shape), str(s.dtype)), shapes)
  have = jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), theta)
  if jax.tree.structure(want) != jax.tree.structure(have) or want != have:
    raise ValueError(f"config.lopt.init_from {spec!r} is not a theta of the configured "
                     f"lopt: expected {outer_opt_lib.theta_paths(shapes)}, got "
                     f"{outer_opt_lib.theta_paths(theta)} (or other shapes).")
  return theta
