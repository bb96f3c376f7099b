"""The unrolled threefry keys draw exactly the bits of jax's threefry keys."""

import jax
import jax.numpy as jnp
import pytest

from spmd_lopt import threefry

DRAWS = {
    "split": lambda k: jax.random.split(k, 5),
    "split_2d": lambda k: jax.random.split(k, (2, 3)),
    "fold_in_big": lambda k: jax.random.fold_in(k, 2 ** 31 + 5),
    "fold_in_vmap": lambda k: jax.vmap(jax.random.fold_in, in_axes=(None, 0))(
        k, jnp.arange(7)),
    "normal": lambda k: jax.random.normal(k, (3, 7)),
    "uniform": lambda k: jax.random.uniform(k, (11,)),
    "randint": lambda k: jax.random.randint(k, (13,), 0, 1797),
    "bits8": lambda k: jax.random.bits(k, (4,), jnp.uint8),
    "permutation": lambda k: jax.random.permutation(k, 10),
    "vmapped_normal": lambda k: jax.vmap(lambda z: jax.random.normal(z, (2,)))(
        jax.random.split(k, 4)),
    "jit_truncated_normal": lambda k: jax.jit(
        lambda z: jax.random.truncated_normal(z, -1.0, 1.0, (6,)))(k),
}


def _raw(x):
  return jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x


@pytest.mark.parametrize("name", sorted(DRAWS))
def test_unrolled_keys_draw_the_same_bits(name):
  key = jax.random.key(42)
  fast = threefry.as_unrolled(key)
  assert str(jax.random.key_impl(fast)) != str(jax.random.key_impl(key))
  want, got = _raw(DRAWS[name](key)), _raw(DRAWS[name](fast))
  assert want.dtype == got.dtype and want.shape == got.shape
  assert bool(jnp.all(want == got))


def test_other_keys_pass_through():
  rbg = jax.random.key(0, impl="rbg")
  assert threefry.as_unrolled(rbg) is rbg
  raw = jax.random.PRNGKey(0)
  assert threefry.as_unrolled(raw) is raw


def test_unrolled_fold_in_has_no_loop():
  """The point of the module: jax's CPU lowering of threefry is a rolled while loop."""
  fn = lambda k: jax.random.fold_in(k, 3)
  key = jax.random.key(1)
  assert " while(" in jax.jit(fn).lower(key).compile().as_text()
  assert " while(" not in jax.jit(fn).lower(threefry.as_unrolled(key)).compile().as_text()
