"""Config checks that end in one line: unknown keys (with "did you mean"), and values whose
type or range does not fit the constructor argument they feed.

Every check runs on plain Python values at build time, before anything is traced, so a bad
value is a ``ValueError`` naming its key (``config.estimators.0.std``), never an error from
inside JAX.
"""

from __future__ import annotations

import difflib
import inspect
import math
import numbers
from typing import Any, Callable, Iterable, Mapping

# Integers reach shapes and int32 counters; anything beyond int32 is a typo, not a setting.
MAX_INT = 2**31 - 1
# Floats reach float32 arrays; a larger magnitude would become inf there.
FLOAT32_MAX = 3.4028234e38


def did_you_mean(word: str, known: Iterable[str]) -> str:
  close = difflib.get_close_matches(str(word), [str(k) for k in known], n=1, cutoff=0.6)
  return f" Did you mean {close[0]!r}?" if close else ""


def check_known_keys(where: str, given: Iterable[str], known: Iterable[str],
                     what: str = "") -> None:
  """``given`` must be a subset of ``known``; the error names the first stranger."""
  known = sorted(known)
  unknown = sorted(k for k in given if k not in known)
  if unknown:
    k = unknown[0]
    suffix = f" for {what}" if what else ""
    raise ValueError(f"Unknown config key {where}.{k}{suffix}.{did_you_mean(k, known)} "
                     f"Known keys: {', '.join(known) or '(none)'}.")


def is_int(v) -> bool:
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def is_real(v) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool)


def as_int(key: str, v, low: int = 0, high: int = MAX_INT) -> int:
  """``v`` as an int in ``[low, high]``; the error names ``key``."""
  if not is_int(v):
    raise ValueError(f"{key} must be an integer, got {v!r}.")
  if not low <= v <= high:
    raise ValueError(f"{key} must lie in [{low}, {high}], got {v!r}.")
  return int(v)


def as_float(key: str, v, low: float = -math.inf, high: float = math.inf,
             low_open: bool = False) -> float:
  """``v`` as a finite float in ``[low, high]`` (``(low, high]`` when ``low_open``)."""
  if not is_real(v) or not math.isfinite(float(v)):
    raise ValueError(f"{key} must be a finite number, got {v!r}.")
  v = float(v)
  if abs(v) > FLOAT32_MAX:
    raise ValueError(f"{key} must be within float32 range (|x| <= 3.4e38), got {v!r}.")
  if v < low or v > high or (low_open and v == low):
    lo = "(" if low_open else "["
    raise ValueError(f"{key} must lie in {lo}{low}, {high}], got {v!r}.")
  return v


def as_str(key: str, v) -> str:
  if not isinstance(v, str):
    raise ValueError(f"{key} must be a string, got {v!r}.")
  return v


def as_bool(key: str, v) -> bool:
  if not isinstance(v, bool):
    raise ValueError(f"{key} must be true or false, got {v!r}.")
  return v


def _check_like(key: str, v, kind: str) -> None:
  if kind == "bool":
    as_bool(key, v)
  elif kind == "int":
    as_int(key, v, low=-MAX_INT)
  elif kind == "float":
    as_float(key, v)
  elif kind == "str":
    as_str(key, v)
  elif kind.startswith("seq"):
    # "seq" holds numbers; "seq:str" strings; "seq:seq" lists of numbers (e.g. the
    # hidden sizes of ParametricImageMLP's architectures): the element kind is read
    # off the default, so a config can give every sequence argument a family takes.
    inner = kind.partition(":")[2] or "float"
    what = {"float": "numbers", "str": "strings", "seq": "lists of numbers"}[inner]
    if isinstance(v, (str, bytes)) or not isinstance(v, (list, tuple)):
      raise ValueError(f"{key} must be a list of {what}, got {v!r}.")
    for i, x in enumerate(v):
      _check_like(f"{key}[{i}]", x, inner)


def _kind_of(param: inspect.Parameter) -> tuple[str, bool]:
  """(kind, None allowed) of a constructor argument, from its default and annotation."""
  d, ann = param.default, param.annotation
  ann = ann if isinstance(ann, str) else getattr(ann, "__name__", repr(ann))
  if isinstance(d, bool):
    return "bool", False
  if is_int(d):
    return ("float" if "float" in ann else "int"), "Optional" in ann
  if is_real(d):
    return "float", "Optional" in ann
  if isinstance(d, str):
    return "str", "Optional" in ann
  if isinstance(d, (list, tuple)):
    first = d[0] if d else None
    inner = (":str" if isinstance(first, str) else
             ":seq" if isinstance(first, (list, tuple)) else "")
    return "seq" + inner, "Optional" in ann
  for kind in ("bool", "float", "int", "str"):
    if kind in ann and "Callable" not in ann and "Union" not in ann:
      return kind, d is None
  return "any", True


def check_kwargs(where: str, fn: Callable, kwargs: Mapping[str, Any], what: str,
                 skip: Iterable[str] = ()) -> None:
  """Keys of ``kwargs`` must be arguments of ``fn`` (minus ``skip``, which the config sets
  itself), and each value must fit the argument's type (read from its default value and
  annotation): ints for ints, finite numbers for floats, lists of numbers for sequences."""
  params = {n: p for n, p in inspect.signature(fn).parameters.items()
            if n not in set(skip) and n != "self"
            and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
  check_known_keys(where, kwargs, params, what)
  for name, value in kwargs.items():
    kind, optional = _kind_of(params[name])
    if value is None and optional:
      continue
    if kind != "any":
      _check_like(f"{where}.{name}", value, kind)
    elif isinstance(value, float) and not math.isfinite(value):
      raise ValueError(f"{where}.{name} must be finite, got {value!r}.")


def signature_defaults(fn: Callable, skip: Iterable[str] = ()) -> dict[str, Any]:
  """The keyword arguments of ``fn`` that have defaults (for printing a full config)."""
  out = {}
  for n, p in inspect.signature(fn).parameters.items():
    if n in set(skip) or n == "self" or p.default is inspect.Parameter.empty:
      continue
    if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
      continue
    out[n] = list(p.default) if isinstance(p.default, tuple) else p.default
  return out
