"""``ParameterCheckpoint``: a trained learned optimizer as one small, versioned file.

The file is a msgpack map (written with ``flax.serialization``)::

  {"magic": "spmd_lopt.ParameterCheckpoint", "format_version": 1,
   "header": <UTF-8 JSON bytes>, "theta": <msgpack bytes of theta's state dict>,
   "sha256": <hex digest of len(header) as 8 bytes LE + header + theta>}

and the JSON header holds ``lopt_name`` (the class's name in ``registry``),
``lopt_class`` ("module:QualName", informational only), ``config`` (the constructor
arguments, ``LearnedOptimizer.config``), ``extra`` (caller metadata, JSON) and
``spmd_lopt_version``. Only the content hash is outside the hashed bytes, so any flipped
or missing byte is caught on load.

Loading never imports anything a file names: the class comes from ``registry.get``
(``lopt_name``); files written before names were stored carry only ``lopt_class``, which
is accepted only when it is the import path of a built-in registered class and mapped to
that class's name; anything else is refused with one line. The file is decoded as msgpack
data (no pickle). Theta is restored into the tree structure of the rebuilt optimizer's own
``init`` (traced abstractly, nothing is computed), after a leaf-by-leaf shape and dtype
check. Classes of your own must be registered (``registry.register``) to be saved or loaded.

Writes are atomic: a temporary file in the destination folder, fsync, ``os.replace``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
import tempfile
import warnings
from typing import Any, Dict, Mapping, Optional, Union

import flax
import jax
import jax.numpy as jnp
import numpy as np

import spmd_lopt
from spmd_lopt.learned_optimizers import base as lopt_base
from spmd_lopt.learned_optimizers import registry

MAGIC = "spmd_lopt.ParameterCheckpoint"
FORMAT_VERSION = 1
PathLike = Union[str, os.PathLike]


@dataclasses.dataclass(frozen=True)
class ParameterCheckpoint:
  """A loaded checkpoint.

  theta: the meta-parameters (jax arrays, in ``lopt.init``'s tree structure);
  lopt: the learned optimizer rebuilt as ``registry.get(lopt_name)(**config)``; config:
  its constructor arguments; lopt_class: the class's "module:QualName" path (information
  only); extra: the caller's metadata; format_version; sha256: the verified content hash;
  path; lopt_name: the registered name the class was resolved by.
  """
  theta: Any
  lopt: lopt_base.LearnedOptimizer
  config: Dict[str, Any]
  lopt_class: str
  extra: Dict[str, Any]
  format_version: int
  sha256: str
  path: str
  lopt_name: str = ""


def class_path(cls: type) -> str:
  """``"module:QualName"``, the import path stored in (and resolved from) checkpoints."""
  return f"{cls.__module__}:{cls.__qualname__}"


def builtin_class_paths() -> Dict[str, str]:
  """``{"module:QualName": registered name}`` for the package's own registered classes:
  the only import paths an old-format file may name."""
  out = {}
  for name in registry.names():
    cls = registry.factory_class(name)
    if cls is not None and cls.__module__.startswith("spmd_lopt."):
      if registry.get(name) is cls or class_path(cls) not in out:  # exact class wins
        out[class_path(cls)] = name
  return out


def registered_name(name_or_path: str) -> str:
  """The registry name for a registered name or a built-in class's "module:QualName"
  path; anything else is one ValueError. Nothing is imported."""
  if name_or_path in registry.names():
    return name_or_path
  known = builtin_class_paths()
  if name_or_path in known:
    return known[name_or_path]
  raise ValueError(f"refusing learned optimizer {name_or_path!r}: not a registered name "
                   f"(known: {', '.join(registry.names())}) nor a built-in class path; "
                   "register your class with spmd_lopt.learned_optimizers.registry.register.")


def _resolve_class(name_or_path: str) -> type:
  """The class for a registered name or a built-in class path (see ``registered_name``),
  resolved through the registry only."""
  name = registered_name(name_or_path)
  cls = registry.factory_class(name)
  if cls is None:
    raise ValueError(f"learned optimizer {name!r} is registered as a "
                     f"{type(registry.get(name)).__name__}, not a LearnedOptimizer class; "
                     "checkpoints need a registered class.")
  return cls


def _digest(header: bytes, theta: bytes) -> str:
  h = hashlib.sha256()
  h.update(struct.pack("<Q", len(header)))  # length prefix: no header/theta ambiguity
  h.update(header)
  h.update(theta)
  return h.hexdigest()


def _theta_template(lopt: lopt_base.LearnedOptimizer):
  """Shapes and dtypes of ``lopt.init``'s output, without computing it."""
  return jax.eval_shape(lopt.init, jax.random.key(0))


def _describe(x) -> str:
  if isinstance(x, Mapping):
    return f"a subtree with keys {sorted(x)}"
  return f"shape {tuple(np.shape(x))} {np.dtype(x.dtype).name}"


def first_theta_difference(expected, got, path: str = "",
                           got_name: str = "the checkpoint") -> Optional[str]:
  """The first leaf (sorted key order) where two theta state dicts differ in structure,
  shape or dtype, as a message; None when they match. ``expected`` may hold
  ``jax.ShapeDtypeStruct`` leaves."""
  where = path or "<root>"
  if isinstance(expected, Mapping) or isinstance(got, Mapping):
    if not (isinstance(expected, Mapping) and isinstance(got, Mapping)):
      return (f"at {where}: expected {_describe(expected)}, {got_name} has "
              f"{_describe(got)}")
    join = lambda k: f"{path}/{k}" if path else str(k)
    missing = sorted(set(expected) - set(got))
    if missing:
      return f"leaf {join(missing[0])} is missing from {got_name}"
    unexpected = sorted(set(got) - set(expected))
    if unexpected:
      return f"{got_name} has an unexpected leaf {join(unexpected[0])}"
    for k in sorted(expected):
      diff = first_theta_difference(expected[k], got[k], join(k), got_name)
      if diff:
        return diff
    return None
  if (tuple(np.shape(expected)) != tuple(np.shape(got))
      or np.dtype(expected.dtype) != np.dtype(got.dtype)):
    return f"leaf {where}: expected {_describe(expected)}, {got_name} has {_describe(got)}"
  return None


def _to_json(value, what: str) -> str:
  try:
    return json.dumps(value, sort_keys=True, allow_nan=False)
  except (TypeError, ValueError) as e:
    raise ValueError(f"save_parameter_checkpoint: {what} must be JSON-serialisable: {e}")


def save_parameter_checkpoint(path: PathLike, lopt: lopt_base.LearnedOptimizer, theta: Any,
                              extra: Optional[Mapping[str, Any]] = None) -> str:
  """Write ``theta`` of ``lopt`` to ``path`` atomically; returns the content hash.

  Raises ValueError when theta does not match ``lopt.init``'s structure/shapes, when the
  class cannot be re-imported (e.g. defined inside a function), or when config/extra are
  not JSON-serialisable.
  """
  cls = type(lopt)
  lopt_name = registry.name_of(cls)
  if lopt_name is None:
    raise ValueError(f"save_parameter_checkpoint: {cls.__qualname__} is not registered; "
                     "loading resolves classes by registered name only, so register it "
                     "first (spmd_lopt.learned_optimizers.registry.register(name, cls)).")
  got = flax.serialization.to_state_dict(jax.device_get(theta))
  expected = flax.serialization.to_state_dict(_theta_template(lopt))
  diff = first_theta_difference(expected, got, got_name="the given theta")
  if diff:
    raise ValueError(f"save_parameter_checkpoint: theta does not fit {cls.__name__} "
                     f"{lopt.config}: {diff}.")
  header = _to_json({"lopt_name": lopt_name, "lopt_class": class_path(cls),
                     "config": lopt.config,
                     "extra": dict(extra or {}),
                     "spmd_lopt_version": spmd_lopt.__version__}, "config/extra").encode()
  theta_bytes = flax.serialization.msgpack_serialize(
      jax.tree.map(np.asarray, got))
  digest = _digest(header, theta_bytes)
  blob = flax.serialization.msgpack_serialize({
      "magic": MAGIC, "format_version": FORMAT_VERSION, "header": header,
      "theta": theta_bytes, "sha256": digest})

  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-" + os.path.basename(path) + "-")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(blob)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)  # readers see the old file or the whole new one, never half
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
  return digest


def _corrupt(path: str, why: str) -> ValueError:
  return ValueError(f"{path} is not a valid spmd_lopt parameter checkpoint: {why}")


def load_parameter_checkpoint(path: PathLike,
                              expect: Optional[lopt_base.LearnedOptimizer] = None
                              ) -> ParameterCheckpoint:
  """Read, verify and rebuild a checkpoint written by ``save_parameter_checkpoint``.

  With ``expect``, the file must hold theta for ``type(expect)`` with exactly the leaves,
  shapes and dtypes of ``expect.init`` (ValueError naming both classes, or the first
  differing leaf and its shapes); differing non-shape constructor arguments only warn, and
  ``lopt`` is always the optimizer rebuilt from the file. A damaged file (undecodable,
  wrong magic, hash mismatch, newer format) raises ValueError saying so.
  """
  path = os.fspath(path)
  with open(path, "rb") as f:
    blob = f.read()
  try:
    outer = flax.serialization.msgpack_restore(blob)
  except Exception as e:  # msgpack raises several unrelated types on bad input
    raise _corrupt(path, f"cannot decode msgpack ({type(e).__name__}: {e}); the file "
                   "is damaged or of another format.") from e
  if not isinstance(outer, dict) or outer.get("magic") != MAGIC:
    raise _corrupt(path, f"missing the {MAGIC!r} marker.")
  version = outer.get("format_version")
  if not isinstance(version, int) or version > FORMAT_VERSION:
    raise _corrupt(path, f"format version {version!r}; this spmd_lopt reads versions "
                   f"<= {FORMAT_VERSION} (upgrade spmd_lopt?).")
  header, theta_bytes, digest = outer.get("header"), outer.get("theta"), outer.get("sha256")
  if not (isinstance(header, bytes) and isinstance(theta_bytes, bytes)
          and isinstance(digest, str)):
    raise _corrupt(path, "header, theta or sha256 is missing.")
  actual = _digest(header, theta_bytes)
  if actual != digest:
    raise _corrupt(path, f"content hash mismatch (stored {digest[:12]}..., computed "
                   f"{actual[:12]}...): the file is corrupted.")
  try:
    meta = json.loads(header.decode())
    stored = meta["lopt_name"] if "lopt_name" in meta else meta["lopt_class"]
    config = meta["config"]
    extra = meta.get("extra", {})
    if not (isinstance(stored, str) and isinstance(config, dict) and isinstance(extra, dict)):
      raise TypeError("lopt_name/lopt_class, config or extra has the wrong type")
  except (ValueError, KeyError, TypeError) as e:
    raise _corrupt(path, f"unreadable header ({e}).") from e

  try:
    lopt_name = registered_name(stored)
    cls = _resolve_class(lopt_name)
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from None
  class_name = class_path(cls)
  if expect is not None and type(expect) is not cls:
    raise ValueError(f"{path} holds theta for {class_name}, but the expected learned "
                     f"optimizer is {class_path(type(expect))}.")
  try:
    lopt = cls(**config)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{path}: cannot build {lopt_name} from the stored arguments "
                     f"{config}: {e}") from None
  got = flax.serialization.msgpack_restore(theta_bytes)
  template = _theta_template(expect if expect is not None else lopt)
  diff = first_theta_difference(flax.serialization.to_state_dict(template), got)
  if diff:
    owner = (f"the expected {cls.__name__} {expect.config}" if expect is not None
             else f"{cls.__name__} {lopt.config}")
    raise ValueError(f"{path}: theta does not match {owner}: {diff}.")
  if expect is not None and expect.config != lopt.config:
    changed = sorted(k for k in set(expect.config) | set(lopt.config)
                     if expect.config.get(k) != lopt.config.get(k))
    warnings.warn(f"{path}: {cls.__name__} arguments differ from the expected optimizer's "
                  f"in {changed}; using the checkpoint's.")
  theta = flax.serialization.from_state_dict(template, got)
  theta = jax.tree.map(jnp.asarray, theta)
  return ParameterCheckpoint(theta=theta, lopt=lopt, config=lopt.config,
                             lopt_class=class_name, extra=extra, format_version=version,
                             sha256=digest, path=path, lopt_name=lopt_name)
