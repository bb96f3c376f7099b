"""Learned optimizers by short name: the one place a name becomes a class.

Configs (``lopt.name = "celo2"``), ``evaluate --lopt init:NAME`` and parameter
checkpoints all resolve classes here and nowhere else, so loading a file never imports a
module the file names. Users register their own classes::

  @registry.register("my_lopt")
  class MyLOpt(LearnedOptimizer): ...

A registered class is stored with its name; ``name_of(cls)`` gives it back, which is
what checkpoints record.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

from spmd_lopt.learned_optimizers import base as lopt_base

_BY_NAME: dict[str, Callable] = {}


def register(name: str, factory: Optional[Callable] = None):
  """Register ``factory`` (a LearnedOptimizer subclass, or a ``functools.partial`` of one)
  under ``name``; usable as a decorator. Re-registering a name with another factory is an
  error (a silent replacement would change what old checkpoints load into)."""
  def add(f):
    old = _BY_NAME.get(name)
    if old is not None and old is not f:
      raise ValueError(f"learned optimizer name {name!r} is already registered to {old!r}.")
    _BY_NAME[name] = f
    return f
  return add if factory is None else add(factory)


def _ensure_builtins() -> None:
  # The package's own optimizers register on import; importing the package does that.
  import spmd_lopt.learned_optimizers  # noqa: F401  pylint: disable=import-outside-toplevel


def names() -> tuple[str, ...]:
  _ensure_builtins()
  return tuple(sorted(_BY_NAME))


def get(name: str) -> Callable:
  """The factory registered as ``name``; an unknown name is a ValueError listing the known."""
  _ensure_builtins()
  if name not in _BY_NAME:
    raise ValueError(f"Unknown learned optimizer {name!r}. Known: {', '.join(names())}.")
  return _BY_NAME[name]


def base_class(factory: Callable) -> type:
  """The class a factory builds (unwraps ``functools.partial``)."""
  while isinstance(factory, functools.partial):
    factory = factory.func
  return factory


def factory_class(name: str) -> Optional[type]:
  """The ``LearnedOptimizer`` subclass registered as ``name`` (through a partial if need
  be), or None when the factory is something else (e.g. a plain function)."""
  cls = base_class(get(name))
  if isinstance(cls, type) and issubclass(cls, lopt_base.LearnedOptimizer):
    return cls
  return None


def name_of(cls: type) -> Optional[str]:
  """The registered name of exactly ``cls`` (not of a partial of it), or None."""
  _ensure_builtins()
  for name, f in _BY_NAME.items():
    if f is cls:
      return name
  return None
