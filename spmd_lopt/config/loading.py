"""Config files and command-line overrides.

A config file is Python with ``get_config()`` returning a ConfigDict (or dict) in either
form. ``--config.a.b=value`` overrides any key, also inside list entries
(``--config.estimators.0.num_tasks=16``, or ``estimators[0]``); the value is parsed as
the type of the value it replaces (a new key in an open section, e.g. a constructor
argument under ``lopt``, is parsed as true/false/none or a Python literal, else kept as
a string). Every
mistake is one ``ValueError`` line naming the key.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
from typing import Any, Optional, Sequence

import ml_collections

from spmd_lopt.config import builders
from spmd_lopt.config import checks
from spmd_lopt.config import schema

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(__file__)), "default_config.py")
PREFIX = "--config."

# Sections that take constructor kwargs: any key may be added (checked when built).
_OPEN = (("lopt",), ("outer_opt", "schedule"), ("estimators", "*", "options"),
         ("estimators", "*", "task_kwargs"), ("estimators", "*", "augmentation"),
         ("estimators", "*", "truncation"))


def split_args(argv: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
  """``argv`` without the ``--config.KEY=VALUE`` (or ``--config.KEY VALUE``) overrides,
  and the overrides as ``(KEY, VALUE)`` in order."""
  rest, overrides = [], []
  i = 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith(PREFIX):
      body = arg[len(PREFIX):]
      if "=" in body:
        key, value = body.split("=", 1)
      elif i + 1 < len(argv):
        key, value = body, argv[i + 1]
        i += 1
      else:
        raise ValueError(f"--config.{body} needs a value (--config.{body}=VALUE).")
      overrides.append((key, value))
    else:
      rest.append(arg)
    i += 1
  return rest, overrides


def key_parts(key: str) -> list[str]:
  """``"estimators[0].std"`` and ``"estimators.0.std"`` -> ``["estimators", "0", "std"]``."""
  parts = [p for p in re.sub(r"\[(\d+)\]", r".\1", key).split(".")]
  if not key or any(not p for p in parts):
    raise ValueError(f"Bad config override key {key!r}.")
  return parts


def parse_value(key: str, raw: str, like: Any) -> Any:
  """``raw`` (command-line text) as the type of ``like``."""
  if isinstance(like, bool):
    low = raw.strip().lower()
    if low in ("true", "1", "yes"):
      return True
    if low in ("false", "0", "no"):
      return False
    raise ValueError(f"config.{key} must be true or false, got {raw!r}.")
  if checks.is_int(like):
    try:
      return int(raw)
    except ValueError:
      raise ValueError(f"config.{key} must be an integer, got {raw!r}.") from None
  if isinstance(like, float):
    try:
      return float(raw)
    except ValueError:
      raise ValueError(f"config.{key} must be a number, got {raw!r}.") from None
  if isinstance(like, str):
    return raw
  words = {"true": True, "false": False, "none": None, "null": None}
  if raw.strip().lower() in words:
    return words[raw.strip().lower()]
  try:
    return ast.literal_eval(raw)
  except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
    return raw


def _template(path: tuple[str, ...], nested: bool):
  """The defaults of the section at ``path`` (``None`` = no schema) and whether it is
  open (takes any constructor kwarg)."""
  generic = tuple("*" if p.isdigit() else p for p in path)
  if generic in _OPEN:
    return None, True
  if not nested:
    return (schema.to_plain(schema.base_config()) if not path else None), False
  if not path:
    top = schema.to_plain(schema.base_config())
    return dict({k: top[k] for k in schema.LOOP_KEYS},
                lopt={}, outer_opt={}, frozen="", estimators=[]), False
  if generic == ("outer_opt",):
    return schema.outer_opt_defaults(), False
  if generic == ("estimators", "*"):
    return schema.estimator_defaults(), False
  return None, False


def apply_override(cfg: dict, key: str, raw: str) -> None:
  """Set ``key`` (dotted, list indices allowed) of the plain config ``cfg`` from text."""
  parts = key_parts(key)
  nested = schema.is_nested(cfg)
  node, path = cfg, ()
  for depth, part in enumerate(parts):
    last = depth == len(parts) - 1
    where = ".".join(parts[:depth + 1])
    if isinstance(node, list):
      if not part.isdigit() or int(part) >= len(node):
        raise ValueError(f"config.{where}: {'.'.join(parts[:depth]) or 'config'} is a list "
                         f"of {len(node)}; use an index in 0..{len(node) - 1}.")
      idx = int(part)
      if last:
        node[idx] = parse_value(where, raw, node[idx])
        return
      node, path = node[idx], path + (part,)
      continue
    if not isinstance(node, dict):
      raise ValueError(f"config.{'.'.join(parts[:depth])} is a value ({node!r}), not a "
                       f"section: cannot set config.{key}.")
    template, is_open = _template(path, nested)
    if part not in node:
      if template is not None and part in template:
        node[part] = schema.to_plain(template[part])
      elif is_open and last:
        node[part] = parse_value(where, raw, None)
        return
      else:
        known = sorted(set(node) | set(template or {}))
        raise ValueError(f"Unknown config key {where!r} (in --config.{key}={raw})."
                         f"{checks.did_you_mean(part, known)} Known keys here: "
                         f"{', '.join(known)}.")
    if last:
      node[part] = parse_value(where, raw, node[part])
      return
    node, path = node[part], path + (part,)


def load_file(path: str):
  """``get_config()`` of the Python file ``path``."""
  if not isinstance(path, str) or not path:
    raise ValueError(f"--config needs a config file path, got {path!r}.")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path!r} does not exist.")
  spec = importlib.util.spec_from_file_location("spmd_lopt_user_config", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except SyntaxError as e:
    raise ValueError(f"config file {path!r} has a syntax error at line {e.lineno}: "
                     f"{e.msg}.") from None
  if not hasattr(module, "get_config"):
    raise ValueError(f"config file {path!r} must define get_config().")
  return module.get_config()


def finish(plain: dict) -> ml_collections.ConfigDict:
  """A checked, locked ConfigDict of either form (the full form gets its section
  defaults filled in; list entries stay plain dicts so the config is JSON-able)."""
  if schema.is_nested(plain):
    builders.resolve(plain)
    cfg = ml_collections.ConfigDict(builders._fill(plain))  # pylint: disable=protected-access
  else:
    cfg = schema.validate_flat(plain)
    builders.resolve(cfg)
  cfg.lock()
  return cfg


def load(path: Optional[str] = None,
         overrides: Sequence[tuple[str, str]] = ()) -> ml_collections.ConfigDict:
  """The config of file ``path`` (default: the packaged default), with command-line
  ``overrides`` applied, checked and locked."""
  plain = schema.to_plain(load_file(path or DEFAULT_CONFIG))
  if not isinstance(plain, dict):
    raise ValueError(f"get_config() of {path!r} must return a ConfigDict or dict.")
  for key, raw in overrides:
    parts = key_parts(key)
    if not schema.is_nested(plain) and (parts[0] in ("estimators", "frozen") or (
        parts[0] in ("lopt", "outer_opt") and len(parts) > 1)):
      plain = schema.to_nested(plain)  # a full-form override of a short-form config
    apply_override(plain, key, raw)
  return finish(plain)


def format_config(cfg) -> str:
  """The full resolved config (full form, every default written out) as YAML-like text."""
  return str(ml_collections.ConfigDict(builders.resolve(cfg, fill_defaults=True)))
