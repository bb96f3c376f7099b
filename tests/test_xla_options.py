"""The fused step's XLA CPU options: present on CPU, and the same numbers as without."""

import jax
import jax.numpy as jnp
import numpy as np

from spmd_lopt import sharding
from spmd_lopt import xla_options
from spmd_lopt.learned_optimizers import mlp_lopt
from spmd_lopt.optimizers import base as opt_base
from spmd_lopt.outer_trainers import gradient_learner

from helpers import pes_estimator


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


def test_small_products_get_the_default_compile():
  """Below MIN_LIBRARY_ROWS rows per product the library graph is left out; unknown
  sizes (None) and large ones keep it."""
  small = xla_options.MIN_LIBRARY_ROWS - 1
  assert xla_options.step_options(max_entries=small) == {}
  assert xla_options.step_options(max_entries=xla_options.MIN_LIBRARY_ROWS) == \
      xla_options.CPU_OPTIONS
  assert xla_options.step_options(max_entries=None) == xla_options.CPU_OPTIONS


def test_learner_gates_the_options_on_its_tasks_largest_tensor():
  lopt = mlp_lopt.MLPLOpt()
  mesh = sharding.make_mesh(num_devices=1)

  def make(*dims):
    ests = [pes_estimator(lopt, num_tasks=2, dim=d) for d in dims]
    return gradient_learner.SpmdGradientLearner(lopt, ests, opt_base.Adam(1e-3), mesh=mesh)

  assert gradient_learner.largest_task_tensor(pes_estimator(lopt, dim=10)) == 10
  assert make(10).compiler_options == {}  # 10-d quadratics: small products
  # Any estimator with large tensors turns the option on for the whole step.
  assert make(10, 64).compiler_options == xla_options.CPU_OPTIONS
