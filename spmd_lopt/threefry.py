"""Threefry keys whose hash is traced as unrolled integer arithmetic (same bits as jax's).

``as_unrolled(key)`` re-labels a default ``threefry2x32`` key as ``UNROLLED_IMPL``, a PRNG
implementation (``jax.extend.random.define_prng_impl``) that computes exactly what
``threefry2x32`` computes (``jax_threefry_partitionable``, jax's default): every
``jax.random`` function (``split``, ``fold_in``, ``normal``, ``randint``, ...) gives the same
bits from the re-labelled key. The difference is how it is traced. On CPU jax lowers its
threefry primitive to a rolled 5-trip ``while`` loop (to keep compile times short), and each
trip is a dozen small runtime thunks; here the 20 rounds are written out as ``uint32`` adds,
rotations and xors, which XLA fuses with their neighbours. The truncated step derives 5-7
keys per inner step and its resets draw task parameters, so for small tasks those loops were
most of the ops a step executed (607 per inner step for 64 quadratic tasks, worst branch).

Math (Salmon et al. 2011, Threefry-2x32, 20 rounds): with key words ``(k0, k1)``,
``k2 = k0 ^ k1 ^ 0x1BD11BDA`` and counter words ``(x0, x1)``, start ``x += (k0, k1)``; then
5 groups of 4 rounds, a round being ``x0 += x1; x1 = rotl(x1, R) ^ x0`` with
``R = (13, 15, 26, 6)`` in groups 1, 3, 5 and ``(17, 29, 16, 24)`` in groups 2, 4, and after
group ``g`` ``x0 += k[g % 3]``, ``x1 += k[(g + 1) % 3] + g``. Counters, as jax uses them:

- ``fold_in(key, d)``: the pair ``(0, d)``; the new key is the output pair;
- ``split(key, shape)``: ``(0, i)`` for each flat index ``i``; key ``i`` is output pair ``i``;
- ``random_bits(key, w, shape)``: the same counters, bits ``y0 ^ y1`` (32 bits; truncated
  for 8/16) or ``y0 << 32 | y1`` (64).

Keys of other implementations (``rbg``, ...), raw ``uint32`` keys and the non-partitionable
threefry mode pass through ``as_unrolled`` unchanged, so results never depend on the path.
"""

from __future__ import annotations

import math

import jax
import jax.extend.random as jex_random
import jax.numpy as jnp
import numpy as np

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = np.uint32(0x1BD11BDA)


def _rotl(x, r: int):
  return (x << np.uint32(r)) | (x >> np.uint32(32 - r))


def hash_2x32(k0, k1, x0, x1):
  """Threefry-2x32 (20 rounds) of counters ``(x0, x1)`` under key ``(k0, k1)``; all
  ``uint32`` arrays broadcasting together. Returns the two output words."""
  ks = (k0, k1, k0 ^ k1 ^ _PARITY)
  x0, x1 = x0 + k0, x1 + k1
  for g in range(5):
    for r in _ROTATIONS[g % 2]:
      x0 = x0 + x1
      x1 = _rotl(x1, r) ^ x0
    x0 = x0 + ks[(g + 1) % 3]
    x1 = x1 + ks[(g + 2) % 3] + np.uint32(g + 1)
  return x0, x1


def _counters(shape):
  size = math.prod(shape)
  if size > 2 ** 32:
    raise ValueError(f"threefry: cannot draw {size} values (> 2**32) from one key.")
  lo = jnp.arange(size, dtype=jnp.uint32).reshape(shape)
  return jnp.zeros_like(lo), lo


def _split(key, shape):
  y0, y1 = hash_2x32(key[0], key[1], *_counters(tuple(shape)))
  return jnp.stack([y0, y1], axis=-1)


def _fold_in(key, data):
  d = jnp.asarray(data, dtype=jnp.uint32)
  y0, y1 = hash_2x32(key[0], key[1], jnp.zeros_like(d), d)
  return jnp.stack([y0, y1])


def _random_bits(key, bit_width, shape):
  y0, y1 = hash_2x32(key[0], key[1], *_counters(tuple(shape)))
  if bit_width == 64:
    return (y0.astype(jnp.uint64) << np.uint64(32)) | y1.astype(jnp.uint64)
  bits = y0 ^ y1
  return bits if bit_width == 32 else bits.astype(
      {8: jnp.uint8, 16: jnp.uint16}[bit_width])


UNROLLED_IMPL = jex_random.define_prng_impl(
    key_shape=(2,), seed=jex_random.threefry_prng_impl.seed, split=_split,
    random_bits=_random_bits, fold_in=_fold_in, name="threefry2x32_unrolled", tag="fryu")


def _impl_name(key) -> str:
  dtype = getattr(key, "dtype", None)
  if dtype is None or not jnp.issubdtype(dtype, jax.dtypes.prng_key):
    return ""
  return str(jax.random.key_impl(key))


def as_unrolled(key: jax.Array) -> jax.Array:
  """``key`` (any shape) as an ``UNROLLED_IMPL`` key with the same data when it is a
  default (partitionable) threefry key; otherwise ``key`` itself."""
  if _impl_name(key) != "threefry2x32" or not jax.config.jax_threefry_partitionable:
    return key
  return jax.random.wrap_key_data(jax.random.key_data(key), impl=UNROLLED_IMPL)
