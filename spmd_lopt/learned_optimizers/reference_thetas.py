"""Thetas meta-trained with ``learned_optimization`` (the reference), loaded into our classes.

The reference writes theta with ``checkpoints.save_state(path, theta)``: the bytes of
``flax.serialization.to_bytes(theta)``, one msgpack map of haiku parameter dicts, with no
header. Its layouts and ours differ only in key names:

- ``MLPLOpt``: reference ``{"mlp/~/linear_i": {"w": [in, out], "b": [out]}}``; ours (a flax
  module) ``{"params": {"Dense_i": {"kernel": [in, out], "bias": [out]}}}``.
- ``AdafacMLPLOpt``: reference ``{"momentum_decays", "rms_decays", "adafactor_decays",
  "nn": {"~": {"w0", "b0", ...}}}``; ours has no ``"~"`` level under ``"nn"``.

Decoding is msgpack data only (``flax.serialization.msgpack_restore``: maps, strings and
typed array payloads): nothing in the file is imported, unpickled or executed. Every loader
checks the decoded tree against the class's own ``init`` tree and raises one ValueError
naming the missing, extra or mis-shaped keys.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

import flax
import jax
import jax.numpy as jnp
import numpy as np

from spmd_lopt.learned_optimizers import base as lopt_base

PathLike = Union[str, os.PathLike]


def read_msgpack_tree(path: PathLike, what: str) -> Dict[str, Any]:
  """The nested dict of numpy arrays stored in a flax-msgpack file (data only)."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ValueError(f"{what}: no such file {path!r}.")
  with open(path, "rb") as f:
    blob = f.read()
  try:
    tree = flax.serialization.msgpack_restore(blob)
  except Exception as e:  # msgpack raises several unrelated types on bad input
    raise ValueError(f"{path} is not a {what} (flax msgpack): cannot decode it "
                     f"({type(e).__name__}).") from e
  if not isinstance(tree, dict):
    raise ValueError(f"{path} is not a {what}: it holds a {type(tree).__name__}, not a map.")
  return tree


def _flat(tree: Any, prefix: str = "") -> Dict[str, Any]:
  """``{"a/b/c": leaf}`` for a nested mapping (keys joined by '/')."""
  if isinstance(tree, Mapping):
    out = {}
    for k, v in tree.items():
      out.update(_flat(v, f"{prefix}/{k}" if prefix else str(k)))
    return out
  return {prefix: tree}


def _shape(x) -> Tuple[int, ...]:
  return tuple(int(d) for d in np.shape(x))


def check_layout(got: Mapping[str, Any], expected: Mapping[str, Any], path: str,
                 what: str) -> None:
  """One ValueError listing every missing key, extra key and wrong shape/dtype (all leaves
  compared by their '/'-joined key paths); returns None when ``got`` fits ``expected``
  (whose leaves may be ``jax.ShapeDtypeStruct``)."""
  g, e = _flat(got), _flat(expected)
  problems = []
  missing = sorted(set(e) - set(g))
  extra = sorted(set(g) - set(e))
  if missing:
    problems.append("missing " + ", ".join(f"{k} {_shape(e[k])}" for k in missing))
  if extra:
    problems.append("extra " + ", ".join(f"{k} {_shape(g[k])}" for k in extra))
  wrong = []
  for k in sorted(set(g) & set(e)):
    if not hasattr(g[k], "dtype") or _shape(g[k]) != _shape(e[k]):
      wrong.append(f"{k} is {_shape(g[k]) if hasattr(g[k], 'dtype') else type(g[k]).__name__}"
                   f", expected {_shape(e[k])}")
    elif not np.issubdtype(np.dtype(g[k].dtype), np.floating):
      wrong.append(f"{k} has dtype {np.dtype(g[k].dtype).name}, expected a float")
  if wrong:
    problems.append("wrong shapes " + "; ".join(wrong))
  if problems:
    raise ValueError(f"{path} is not a {what}: " + "; ".join(problems) + ".")


def _mlp_lopt_to_ours(ref: Mapping[str, Any]) -> Dict[str, Any]:
  layers = {}
  for name, leaf in ref.items():
    if name.startswith("mlp/~/linear_") and isinstance(leaf, Mapping):
      i = name[len("mlp/~/linear_"):]
      layers[f"Dense_{i}"] = {("kernel" if k == "w" else "bias" if k == "b" else k): v
                              for k, v in leaf.items()}
    else:
      layers[name] = leaf  # reported as extra by the layout check
  return {"params": layers}


def _mlp_lopt_to_reference(ours: Mapping[str, Any]) -> Dict[str, Any]:
  return {f"mlp/~/linear_{name[len('Dense_'):]}": {"w": d["kernel"], "b": d["bias"]}
          for name, d in ours["params"].items()}


def _adafac_to_ours(ref: Mapping[str, Any]) -> Dict[str, Any]:
  out = dict(ref)
  nn = out.get("nn")
  if isinstance(nn, Mapping) and set(nn) == {"~"}:
    out["nn"] = dict(nn["~"])
  return out


def _adafac_to_reference(ours: Mapping[str, Any]) -> Dict[str, Any]:
  out = dict(ours)
  out["nn"] = {"~": dict(ours["nn"])}
  return out


# class name -> (reference layout -> ours, ours -> reference layout)
_CONVERTERS: Dict[str, Tuple[Callable, Callable]] = {
    "MLPLOpt": (_mlp_lopt_to_ours, _mlp_lopt_to_reference),
    "AdafacMLPLOpt": (_adafac_to_ours, _adafac_to_reference),
}


def _converters(lopt: lopt_base.LearnedOptimizer) -> Tuple[Callable, Callable]:
  for cls in type(lopt).__mro__:
    if cls.__name__ in _CONVERTERS and cls.__module__.startswith("spmd_lopt."):
      return _CONVERTERS[cls.__name__]
  raise ValueError(f"no reference theta layout is known for {type(lopt).__name__}; "
                   f"known: {', '.join(sorted(_CONVERTERS))}.")


def load_reference_theta(path: PathLike, lopt: lopt_base.LearnedOptimizer) -> Any:
  """Theta for ``lopt`` (an ``MLPLOpt`` or ``AdafacMLPLOpt`` built with the constructor
  arguments the theta was trained with) from a reference ``checkpoints.save_state`` file.

  Returns jax float32 arrays in ``lopt.init``'s tree. Raises ValueError for an undecodable
  file or one whose keys/shapes do not fit ``lopt`` (all differences named in one line).
  """
  to_ours, _ = _converters(lopt)
  what = f"learned_optimization {type(lopt).__name__} theta"
  ref = read_msgpack_tree(path, what)
  ours = to_ours(ref)
  template = flax.serialization.to_state_dict(jax.eval_shape(lopt.init, jax.random.key(0)))
  check_layout(ours, template, os.fspath(path), what + f" for {lopt.config}")
  template_tree = jax.eval_shape(lopt.init, jax.random.key(0))
  theta = flax.serialization.from_state_dict(template_tree, ours)
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), theta)


def save_reference_theta(path: PathLike, lopt: lopt_base.LearnedOptimizer, theta: Any
                         ) -> None:
  """Write ``theta`` in the reference's ``checkpoints.save_state`` layout (the inverse of
  ``load_reference_theta``), so the reference can read thetas trained here."""
  _, to_ref = _converters(lopt)
  tree = to_ref(flax.serialization.to_state_dict(jax.device_get(theta)))
  tree = jax.tree.map(np.asarray, tree)
  with open(os.fspath(path), "wb") as f:
    f.write(flax.serialization.msgpack_serialize(tree))


def reference_layout(lopt: lopt_base.LearnedOptimizer, theta: Optional[Any] = None) -> Any:
  """``theta`` (default: ``lopt.init``'s shapes) in the reference's key layout."""
  _, to_ref = _converters(lopt)
  if theta is None:
    theta = jax.eval_shape(lopt.init, jax.random.key(0))
  return to_ref(flax.serialization.to_state_dict(theta))
