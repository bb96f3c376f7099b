"""The fused step's XLA CPU options: present on CPU, and the same numbers as without."""

import jax
import jax.numpy as jnp
import numpy as np

from spmd_lopt import xla_options


def test_cpu_gets_the_fused_library_graphs():
  assert jax.devices()[0].platform == "cpu"
  assert xla_options.step_options() == xla_options.CPU_OPTIONS


def test_per_parameter_mlp_chain_same_numbers_with_options():
  """The chain the options change (batched products, bias, ReLU; MLPLOpt's shape)."""
  keys = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(keys[0], (4, 300, 8))
  w0 = jax.random.normal(keys[1], (4, 8, 32))
  w1 = jax.random.normal(keys[2], (4, 32, 32))
  w2 = jax.random.normal(keys[3], (4, 32, 2))

  def mlp(x, w0, w1, w2):
    h = jax.nn.relu(jnp.einsum("tnk,tkm->tnm", x, w0) + 0.1)
    h = jax.nn.relu(jnp.einsum("tnk,tkm->tnm", h, w1) - 0.2)
    return jnp.einsum("tnk,tkm->tnm", h, w2)

  args = (x, w0, w1, w2)
  plain = jax.jit(mlp).lower(*args).compile()
  fused = jax.jit(mlp).lower(*args).compile(xla_options.step_options())
  # The options took effect: the chain is fewer kernels (one library graph).
  assert fused.as_text().count(" fusion(") < plain.as_text().count(" fusion(")
  np.testing.assert_allclose(np.asarray(fused(*args)), np.asarray(plain(*args)),
                             rtol=1e-5, atol=1e-5)
