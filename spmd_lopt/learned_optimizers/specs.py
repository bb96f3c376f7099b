"""``resolve(spec) -> (lopt, theta)``: the one place a user's text becomes a learned optimizer.

Grammar (``NAME`` is a name in ``registry``, e.g. ``celo2``, ``mlp_lopt``)::

  spec := "init:" NAME            a fresh ``registry.get(NAME)(**lopt_args).init(key)``
        | "pretrained:" FILE      ``<package>/pretrained/FILE.lopt``, a ParameterCheckpoint
                                  shipped with spmd_lopt (FILE: letters, digits, ``._-``)
        | NAME "=" PATH           a theta file in NAME's foreign layout, loaded into
                                  ``registry.get(NAME)(**lopt_args)``:
                                    celo2, celo2_base: the Celo2 authors' ``theta.state``;
                                    mlp_lopt, adafac_mlp_lopt: learned_optimization's
                                    ``checkpoints.save_state`` file
        | PATH                    a ParameterCheckpoint written here (``.lopt``); the
                                  optimizer is rebuilt from the file

Every file is decoded as msgpack data and every class comes from the registry: nothing a
file names is imported. Errors are one-line ValueErrors naming the spec.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping, Optional, Tuple

import jax

from spmd_lopt.learned_optimizers import base as lopt_base
from spmd_lopt.learned_optimizers import celo2 as celo2_lib
from spmd_lopt.learned_optimizers import checkpoint as ckpt_lib
from spmd_lopt.learned_optimizers import reference_thetas
from spmd_lopt.learned_optimizers import registry

PRETRAINED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "pretrained")
_PRETRAINED_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


def pretrained_names() -> Tuple[str, ...]:
  """Names usable as ``pretrained:NAME`` (the ``.lopt`` files shipped in the package)."""
  if not os.path.isdir(PRETRAINED_DIR):
    return ()
  return tuple(sorted(f[:-len(".lopt")] for f in os.listdir(PRETRAINED_DIR)
                      if f.endswith(".lopt")))


def build(name: str, lopt_args: Optional[Mapping[str, Any]] = None
          ) -> lopt_base.LearnedOptimizer:
  """``registry.get(name)(**lopt_args)``; bad arguments are one ValueError."""
  factory = registry.get(name)
  try:
    return factory(**dict(lopt_args or {}))
  except TypeError as e:
    raise ValueError(f"cannot build learned optimizer {name!r} from {dict(lopt_args or {})}"
                     f": {e}") from None


def is_parameter_checkpoint(path: str) -> bool:
  """Whether ``path`` holds a ParameterCheckpoint (by its marker; data decoding only)."""
  try:
    tree = reference_thetas.read_msgpack_tree(path, "file")
  except ValueError:
    return False
  return tree.get("magic") == ckpt_lib.MAGIC


def load_theta_file(path: str, lopt: lopt_base.LearnedOptimizer) -> Any:
  """Theta for ``lopt`` from a file in a layout ``lopt`` knows: a ParameterCheckpoint of
  the same class, the Celo2 release layout (``Celo2``), or learned_optimization's layout
  (``MLPLOpt``, ``AdafacMLPLOpt``)."""
  if is_parameter_checkpoint(path):
    return ckpt_lib.load_parameter_checkpoint(path, expect=lopt).theta
  if isinstance(lopt, celo2_lib.Celo2):
    return celo2_lib.load_released_weights(path, lopt.hidden_size, lopt.hidden_layers)
  return reference_thetas.load_reference_theta(path, lopt)


def resolve(spec: str, *, key: Optional[jax.Array] = None,
            lopt_args: Optional[Mapping[str, Any]] = None
            ) -> Tuple[lopt_base.LearnedOptimizer, Any]:
  """``(lopt, theta)`` for a spec of the grammar in the module docstring.

  Args:
    spec: the text.
    key: the PRNG key of ``init:NAME`` (default ``jax.random.key(0)``).
    lopt_args: constructor arguments for ``init:NAME`` and ``NAME=PATH`` (a file's own
      arguments are used for checkpoints).
  """
  if not isinstance(spec, str) or not spec:
    raise ValueError(f"learned optimizer spec must be a non-empty string, got {spec!r}.")
  if spec.startswith("init:"):
    lopt = build(spec[len("init:"):], lopt_args)
    return lopt, lopt.init(jax.random.key(0) if key is None else key)
  if spec.startswith("pretrained:"):
    name = spec[len("pretrained:"):]
    path = os.path.join(PRETRAINED_DIR, name + ".lopt")
    if not _PRETRAINED_NAME.match(name) or not os.path.isfile(path):
      shipped = ", ".join(pretrained_names()) or "none in this install"
      raise ValueError(f"{spec!r}: no pretrained learned optimizer {name!r} (shipped: "
                       f"{shipped}).")
    ckpt = ckpt_lib.load_parameter_checkpoint(path)
    return ckpt.lopt, ckpt.theta
  name, sep, path = spec.partition("=")
  if sep and name in registry.names():
    if not os.path.isfile(path):
      raise ValueError(f"{spec!r}: no such file {path!r}.")
    lopt = build(name, lopt_args)
    try:
      return lopt, load_theta_file(path, lopt)
    except ValueError as e:
      raise ValueError(f"{spec!r}: {e}") from None
  if not os.path.isfile(spec):
    raise ValueError(f"{spec!r} is neither a file nor a spec (init:NAME, pretrained:NAME, "
                     f"NAME=PATH with NAME in {', '.join(registry.names())}).")
  if not is_parameter_checkpoint(spec):
    raise ValueError(f"{spec!r} is not a spmd_lopt parameter checkpoint; for a foreign "
                     "theta file say whose it is, e.g. celo2=PATH or mlp_lopt=PATH.")
  ckpt = ckpt_lib.load_parameter_checkpoint(spec)
  return ckpt.lopt, ckpt.theta
