"""The fused step's XLA CPU options: present on CPU, and the same numbers as without."""

import jax
import jax.numpy as jnp
import numpy as np

from spmd_lopt import sharding
from spmd_lopt import xla_options
from spmd_lopt.learned_optimizers import adafac_mlp_lopt
from spmd_lopt.learned_optimizers import base as lopt_base
from spmd_lopt.learned_optimizers import celo2
from spmd_lopt.learned_optimizers import mlp_lopt
from spmd_lopt.learned_optimizers import nn_adam
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
  lopt = mlp_lopt.MLPLOpt(implementation="reference")  # a rule that wants the options
  mesh = sharding.make_mesh(num_devices=1)

  def make(*dims):
    ests = [pes_estimator(lopt, num_tasks=2, dim=d) for d in dims]
    return gradient_learner.SpmdGradientLearner(lopt, ests, opt_base.Adam(1e-3), mesh=mesh)

  assert gradient_learner.largest_task_tensor(pes_estimator(lopt, dim=10)) == 10
  assert make(10).compiler_options == {}  # 10-d quadratics: small products
  # Any estimator with large tensors turns the option on for the whole step.
  assert make(10, 64).compiler_options == xla_options.CPU_OPTIONS


def test_rules_that_run_slower_with_library_graphs_get_the_default_compile():
  """Celo2 (and Celo2-base), AdafacMLPLOpt and NNAdam measured slower meta steps with the
  options (docs/PERFORMANCE.md, "Round six"), and so does MLPLOpt with its fused CPU
  kernel ("Round eight"); MLPLOpt as XLA products and the learnable baselines keep them.
  Any rule of the step that says no turns them off."""
  mesh = sharding.make_mesh(num_devices=1)

  def make(lopt, est_lopt=None):
    est = pes_estimator(est_lopt or lopt, num_tasks=2, dim=64)
    return gradient_learner.SpmdGradientLearner(lopt, [est], opt_base.Adam(1e-3), mesh=mesh)

  assert xla_options.step_options(library_graphs=False) == {}
  reference = lambda: mlp_lopt.MLPLOpt(implementation="reference")
  for lopt in (reference(), mlp_lopt.MLPLOpt(hidden_size=8), lopt_base.LearnableSGD(),
               lopt_base.LearnableAdam()):
    assert make(lopt).compiler_options == xla_options.CPU_OPTIONS, type(lopt).__name__
  kernel = [mlp_lopt.MLPLOpt()] if not mlp_lopt.MLPLOpt().kernel_unavailable() else []
  for lopt in [celo2.Celo2(), celo2.Celo2Base(), adafac_mlp_lopt.AdafacMLPLOpt(),
               nn_adam.NNAdam()] + kernel:
    assert make(lopt).compiler_options == {}, type(lopt).__name__
  assert make(reference(), est_lopt=celo2.Celo2()).compiler_options == {}
  assert gradient_learner.library_graphs_pay([None, reference()])


def test_celo2_steps_same_with_and_without_library_graphs():
  """The options only change how XLA runs Celo2's rule: 3 steps on 4 tasks' 64x32 kernels
  (the Newton-Schulz products the library graph fuses) agree to float rounding."""
  keys = jax.random.split(jax.random.key(0), 3)
  theta = celo2.Celo2().init(keys[0])
  params = {"w": jax.random.normal(keys[1], (4, 64, 32)), "b": jnp.zeros((4, 32))}
  grads = jax.tree.map(lambda p: jax.random.normal(keys[2], (3,) + p.shape), params)
  tx = celo2.scale_by_celo2(theta)

  def run(params, grads):
    def one_task(p, gs):
      def step(carry, g):
        p, st = carry
        u, st = tx.update(g, st, p)
        return (jax.tree.map(lambda a, b: a - 1e-2 * b, p, u), st), u
      return jax.lax.scan(step, (p, tx.init(p)), gs)[1]
    return jax.vmap(one_task, in_axes=(0, 1))(params, grads)

  plain = jax.jit(run).lower(params, grads).compile()
  fused = jax.jit(run).lower(params, grads).compile(xla_options.CPU_OPTIONS)
  assert fused.as_text().count(" fusion(") != plain.as_text().count(" fusion(")
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-5),
               fused(params, grads), plain(params, grads))
