"""``fold_in`` and ``split`` of threefry keys as plain unrolled integer arithmetic.

Bit-identical to ``jax.random.fold_in`` / ``jax.random.split`` for the default
``threefry2x32`` keys (with ``jax_threefry_partitionable``, the default), but traced as the
20 rounds of Threefry-2x32 written out in ``uint32`` adds, rotations and xors. On CPU jax
lowers its threefry primitive to a rolled 5-trip ``while`` loop (to keep compile times
short), and every loop iteration is a dozen small runtime thunks. The truncated step derives
5-7 keys per inner step, so for small tasks those loops were most of the ops the step
executes (607 of them per inner step for 64 quadratic tasks; 97 with the rounds unrolled,
and XLA then fuses them with their neighbours).

Math (Salmon et al. 2011, Threefry-2x32 with 20 rounds): with key words ``(k0, k1)``,
``k2 = k0 ^ k1 ^ 0x1BD11BDA`` and counter words ``(x0, x1)``, start ``x += (k0, k1)``; then
5 groups of 4 rounds, round ``r`` being ``x0 += x1; x1 = rotl(x1, R[r]) ^ x0`` with
``R = (13, 15, 26, 6)`` in even groups and ``(17, 29, 16, 24)`` in odd ones, and after
group ``g`` (1-based) ``x0 += k[g % 3]``, ``x1 += k[(g + 1) % 3] + g``.

- ``fold_in(key, d)`` hashes the counter ``(0, d)``: the new key is the output pair.
- ``split(key, n)`` hashes counters ``(0, i)`` for ``i < n``: key ``i`` is output pair ``i``.

Keys of another implementation (``rbg``, ...) and raw ``uint32`` keys go to
``jax.random`` unchanged, so behaviour never depends on which path ran.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = np.uint32(0x1BD11BDA)


def _rotl(x, r: int):
  return (x << np.uint32(r)) | (x >> np.uint32(32 - r))


def hash_2x32(k0, k1, x0, x1):
  """Threefry-2x32 (20 rounds) of counters ``(x0, x1)`` under key ``(k0, k1)``; all
  ``uint32`` arrays broadcast together. Returns the two output words."""
  ks = (k0, k1, k0 ^ k1 ^ _PARITY)
  x0, x1 = x0 + k0, x1 + k1
  for g in range(5):
    for r in _ROTATIONS[g % 2]:
      x0 = x0 + x1
      x1 = _rotl(x1, r) ^ x0
    x0 = x0 + ks[(g + 1) % 3]
    x1 = x1 + ks[(g + 2) % 3] + np.uint32(g + 1)
  return x0, x1


def _is_typed(key) -> bool:
  dtype = getattr(key, "dtype", None)
  return dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key)


def _is_threefry(key) -> bool:
  if not _is_typed(key):
    return False
  return str(jax.random.key_impl(key)) == "threefry2x32"


def _fast_ok(key) -> bool:
  return _is_threefry(key) and jax.config.jax_threefry_partitionable


def fold_in(key: jax.Array, data) -> jax.Array:
  """``jax.random.fold_in(key, data)`` for a typed key array of any shape (each key folds
  in ``data``, broadcast against the key shape); same bits, unrolled arithmetic."""
  if not _fast_ok(key):
    # Raw uint32 keys carry their words in a trailing axis.
    tail = () if _is_typed(key) else jnp.shape(key)[-1:]
    batch = jnp.shape(key)[:jnp.ndim(key) - len(tail)]
    if not batch and jnp.ndim(data) == 0:
      return jax.random.fold_in(key, data)
    shape = jnp.broadcast_shapes(batch, jnp.shape(data))
    flat = jax.vmap(jax.random.fold_in)(
        jnp.broadcast_to(key, shape + tail).reshape((-1,) + tail),
        jnp.broadcast_to(data, shape).reshape(-1))
    return flat.reshape(shape + tail)
  words = jax.random.key_data(key)
  d = jnp.asarray(data, dtype=jnp.uint32)
  y0, y1 = hash_2x32(words[..., 0], words[..., 1], jnp.zeros_like(d), d)
  out = jnp.stack(jnp.broadcast_arrays(y0, y1), axis=-1)
  return jax.random.wrap_key_data(out, impl=jax.random.key_impl(key))


def split(key: jax.Array, num: int = 2) -> jax.Array:
  """``jax.random.split(key, num)`` of one typed key: ``[num]`` keys, same bits."""
  if not _fast_ok(key) or jnp.ndim(key) != 0:
    return jax.random.split(key, num)
  words = jax.random.key_data(key)
  counts = jnp.arange(num, dtype=jnp.uint32)
  y0, y1 = hash_2x32(words[0], words[1], jnp.zeros_like(counts), counts)
  return jax.random.wrap_key_data(jnp.stack([y0, y1], axis=-1),
                                  impl=jax.random.key_impl(key))
