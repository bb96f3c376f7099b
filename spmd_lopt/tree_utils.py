"""Pytree arithmetic and helpers under the reference library's names.

All functions are pure and jittable unless they say they return numpy. Binary ops take two
trees of the same structure; ``tree_div``/``tree_mul`` also take a scalar as the second
argument (``tree_div(t, n)`` is how workers average).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax


def _binary(op, a, b):
  if jax.tree_util.treedef_is_leaf(jax.tree.structure(b)):  # b is one array or a number
    return jax.tree.map(lambda x: op(x, b), a)
  return jax.tree.map(op, a, b)


def tree_add(a, b):
  """``a + b`` leafwise."""
  return jax.tree.map(jnp.add, a, b)


def tree_sub(a, b):
  """``a - b`` leafwise."""
  return jax.tree.map(jnp.subtract, a, b)


def tree_mul(a, b):
  """``a * b`` leafwise; ``b`` may be a scalar."""
  return _binary(jnp.multiply, a, b)


def tree_div(a, b):
  """``a / b`` leafwise; ``b`` may be a scalar."""
  return _binary(jnp.divide, a, b)


def tree_dot(a, b):
  """``sum_i a_i * b_i`` over every entry of every leaf (a scalar)."""
  return optax.tree.vdot(a, b)


def tree_norm(tree):
  """Global L2 norm ``sqrt(sum of squares of all entries)``."""
  return optax.tree.norm(tree)


def tree_mean_abs(tree):
  """``mean |x|`` over all entries of all leaves."""
  leaves = jax.tree.leaves(tree)
  total = sum(jnp.sum(jnp.abs(x)) for x in leaves)
  return total / sum(int(np.prod(jnp.shape(x))) for x in leaves)


def tree_mean(tree):
  """Mean over all entries of all leaves."""
  leaves = jax.tree.leaves(tree)
  return sum(jnp.sum(x) for x in leaves) / sum(int(np.prod(jnp.shape(x))) for x in leaves)


def tree_zeros_like(tree):
  return jax.tree.map(jnp.zeros_like, tree)


def tree_ones_like(tree):
  return jax.tree.map(jnp.ones_like, tree)


def tree_zip_onp(trees: Sequence[Any]):
  """Stack same-structured trees along a new leading axis, as numpy arrays (host)."""
  trees = list(trees)
  if not trees:
    raise ValueError("tree_zip_onp needs at least one tree.")
  return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees)


def tree_zip_jnp(trees: Sequence[Any]):
  """Stack same-structured trees along a new leading axis, as jax arrays."""
  trees = list(trees)
  if not trees:
    raise ValueError("tree_zip_jnp needs at least one tree.")
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def tree_unzip(tree, n: Optional[int] = None) -> list:
  """Inverse of ``tree_zip_*``: split the leading axis into a list of ``n`` trees."""
  n = first_dim(tree) if n is None else n
  return [jax.tree.map(lambda x, i=i: x[i], tree) for i in range(n)]


def first_dim(tree) -> int:
  """Size of the leading axis of the first leaf."""
  return jax.tree.leaves(tree)[0].shape[0]


def match_type(tree, like):
  """Cast every leaf of ``tree`` to the dtype of the matching leaf of ``like``."""
  for leaf in jax.tree.leaves(like):
    if not hasattr(leaf, "dtype"):
      raise ValueError(f"match_type: the target tree has a leaf without a dtype: {leaf!r}.")
  return jax.tree.map(lambda a, b: jnp.asarray(a, dtype=b.dtype), tree, like)


def strip_weak_type(tree):
  """Make every leaf strongly typed (so jit cache keys and scan carries agree)."""
  return jax.tree.map(lambda x: jnp.asarray(x, dtype=jnp.asarray(x).dtype), tree)


def map_named(function: Callable[[str, Any], Any], tree: Any, key: str = "") -> Any:
  """Map ``function(path, leaf)`` over a tree of dicts, lists, tuples and dataclasses.

  Paths are as in the reference: every level appends ``"/" + name`` (so they start with
  ``/``): a dict key, a list/tuple index, or ``ClassName.field`` for a dataclass. E.g. for
  ``{"a": 1, "b": {"c": 2}}`` the paths are ``/a`` and ``/b/c``.
  """
  if isinstance(tree, Mapping):
    return type(tree)(**{k: map_named(function, v, f"{key}/{k}") for k, v in tree.items()})
  if isinstance(tree, (list, tuple)) and not hasattr(tree, "_fields"):
    return type(tree)(map_named(function, v, f"{key}/{i}") for i, v in enumerate(tree))
  if isinstance(tree, tuple):  # namedtuple
    return type(tree)(*[map_named(function, v, f"{key}/{i}") for i, v in enumerate(tree)])
  if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
    name = type(tree).__name__
    return dataclasses.replace(tree, **{
        f.name: map_named(function, getattr(tree, f.name), f"{key}/{name}.{f.name}")
        for f in dataclasses.fields(tree) if f.init})
  return function(key, tree)


def partition(functions: Sequence[Callable[[str, Any], bool]], tree: Any,
              strict: bool = False):
  """Split the leaves of ``tree`` into groups, by the first predicate ``f(path, leaf)``
  that holds (paths as in ``map_named``); leaves matching none form a last group
  (an error if ``strict``). Returns ``(groups, how_to_unflatten)`` for
  ``partition_unflatten``."""
  paths = []
  map_named(lambda k, v: paths.append(k), tree)
  leaves, treedef = jax.tree.flatten(tree)
  if len(paths) != len(leaves):
    raise ValueError("partition needs a tree of dicts, lists, tuples and dataclasses only.")
  groups = [[] for _ in range(len(functions) + 1)]
  where = []
  for path, leaf in zip(paths, leaves):
    gi = next((i for i, f in enumerate(functions) if f(path, leaf)), len(functions))
    if strict and gi == len(functions):
      raise ValueError(f"partition: no predicate matched {path}.")
    where.append((gi, len(groups[gi])))
    groups[gi].append(leaf)
  if strict:
    groups = groups[:-1]
  return groups, (treedef, where)


def partition_unflatten(how_to_unflatten, groups):
  """Rebuild the tree that ``partition`` split."""
  treedef, where = how_to_unflatten
  return treedef.unflatten([groups[g][i] for g, i in where])


def path_str(path) -> str:
  """'/'-joined names of a jax key path (dict keys, attribute names, sequence indices):
  ``{"params": {"Dense_0": {"bias": x}}}`` -> ``"params/Dense_0/bias"``. The form configs'
  ``frozen`` and Celo2's ``regex_1d`` patterns match against."""
  parts = []
  for entry in path:
    for attr in ("key", "name", "idx"):
      if hasattr(entry, attr):
        parts.append(str(getattr(entry, attr)))
        break
    else:
      parts.append(str(entry))
  return "/".join(parts)
