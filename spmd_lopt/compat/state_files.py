"""``save_state`` / ``load_state``: a pytree as one flax-msgpack file, byte for byte as the
reference library writes it.

The file is ``flax.serialization.to_bytes(state)`` and nothing else: a msgpack document of
the tree's state dict (dicts by key; dataclasses and flax structs by field; lists and
tuples as maps ``{"0": ..., "1": ...}``), each array an ExtType holding
``[shape, dtype name, raw C-order bytes]``. Reading needs a template tree of the same
structure (``load_state(path, template)``); ``load_state_dict(path)`` returns the raw
nested dict when no template is at hand.

This is the reference's format for theta files (``theta.state``), ``ParameterCheckpoint``
and ``OptCheckpoint``. It is not the package's own ``learned_optimizers.checkpoint`` file
(which adds a header, the optimizer's class and config, and a content hash), nor the
orbax run checkpoints of ``spmd_lopt.checkpoints``.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, TypeVar, Union

import flax

PathLike = Union[str, os.PathLike]
T = TypeVar("T")


def save_state(path: PathLike, state: Any) -> None:
  """Write ``to_bytes(state)`` to ``path`` atomically (temporary file, then rename)."""
  data = flax.serialization.to_bytes(state)
  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_state_")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def _read(path: PathLike) -> bytes:
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"state file {path!r} does not exist.")
  with open(path, "rb") as f:
    return f.read()


def load_state_dict(path: PathLike) -> Any:
  """The file's raw nested state dict (numpy arrays, str keys), without a template."""
  try:
    return flax.serialization.msgpack_restore(_read(path))
  except FileNotFoundError:
    raise
  except Exception as e:  # msgpack raises several unrelated types on damaged input
    raise ValueError(f"state file {os.fspath(path)!r} is not a flax msgpack document: "
                     f"{e}") from e


def load_state(path: PathLike, state: T) -> T:
  """Read ``path`` into the structure of the template ``state`` (its values are ignored).

  Raises ``ValueError`` naming the file when the saved tree does not fit the template.
  """
  raw = load_state_dict(path)
  try:
    return flax.serialization.from_state_dict(state, raw)
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f"state file {os.fspath(path)!r} does not match the template "
                     f"{type(state).__name__}: {e}") from e
