"""spmd_lopt.kernels.celo2_matrix: Celo2's fused CPU kernel against Celo2's XLA ops.

The kernel is compiled from source by the host's C++ compiler; these tests need one
(``c++``), as the kernel itself does, and are skipped where there is none.
"""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from spmd_lopt.kernels import celo2_matrix
from spmd_lopt.kernels import newton_schulz
from spmd_lopt.learned_optimizers import celo2
from spmd_lopt.tasks import quadratics

import helpers

pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None,
                                reason="no C++ compiler to build the kernel")


def _theta(key):
  """Celo2's initial weights with non-zero biases (init leaves them zero)."""
  net = celo2.init_theta(key)["ff_mod_stack"]["~"]
  net = {k: v + 0.1 * jax.random.normal(jax.random.fold_in(key, i), v.shape)
         for i, (k, v) in enumerate(sorted(net.items()))}
  return {"ff_mod_stack": {"~": net}}


def _run(theta, params, steps, implementation, orthogonalize=True):
  """``steps`` updates of ``accumulate_and_step`` from zero accumulators (new random
  gradients each step, params fixed); the last accumulators and steps."""
  f = jax.jit(lambda a, g: celo2.accumulate_and_step(theta, a, g, params, orthogonalize,
                                                     implementation))
  acc = celo2.accumulators_init(params)
  for t in range(steps):
    grads = jax.tree.map(lambda p, i=t: 0.5 * jax.random.normal(
        jax.random.key(100 + i), jnp.shape(p)), params)
    acc, out = f(acc, grads)
  return acc, out


def _compiled_text(theta, params, implementation):
  lowered = jax.jit(lambda a, g: celo2.accumulate_and_step(
      theta, a, g, params, True, implementation)).lower(celo2.accumulators_init(params),
                                                        params)
  return lowered.compile().as_text()


def _kernel_calls(theta, params, implementation):
  return celo2_matrix.hlo_calls(_compiled_text(theta, params, implementation))


SHAPES = {"w": (64, 32), "tall": (32, 10), "wide": (10, 32), "square": (16, 16),
          "conv": (3, 16, 20), "b": (17,), "one": (1,), "scalar": ()}


def test_kernel_equals_reference_on_every_covered_shape():
  """Matrices either way round (the "row" statistic per column or per row), partial tiles
  (rows of 10, 17, 20 entries), leading axes, vectors and a scalar, after 3 updates: the
  same accumulators and steps to float rounding, the kernel once per leaf."""
  key = jax.random.key(0)
  theta = _theta(key)
  params = {k: jax.random.normal(jax.random.fold_in(key, i), s)
            for i, (k, s) in enumerate(SHAPES.items())}
  ref_acc, ref_steps = _run(theta, params, 3, "reference")
  ker_acc, ker_steps = _run(theta, params, 3, "kernel")
  for name in SHAPES:
    np.testing.assert_allclose(ker_steps[name], ref_steps[name], rtol=1e-4, atol=2e-5,
                               err_msg=name)
  for a, b in zip(jax.tree.leaves(ker_acc), jax.tree.leaves(ref_acc)):
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-30)
  text = _compiled_text(theta, params, "auto")
  assert celo2_matrix.hlo_calls(text) == len(SHAPES)
  # The bench's cost model: the MLP's multiply-adds, 18 features for a tensor, 15 for a
  # vector (a scalar is one entry).
  per_entry = lambda f: 2 * (f * 8 + 8 * 8 + 8)
  want = sum(int(np.prod(s)) * per_entry(18 if len(s) >= 2 else 15) for s in SHAPES.values())
  assert celo2_matrix.hlo_flops(text) == want
  assert _kernel_calls(theta, params, "reference") == 0


def test_shapes_it_does_not_cover_run_as_xla_ops():
  """(8, 3, 3) is factored over axes 0 and 2: items 1-5 as XLA ops even with
  implementation="kernel" (Newton-Schulz still runs its kernel)."""
  assert celo2_matrix.shape_unsupported((8, 3, 3), (2, 0))
  theta = _theta(jax.random.key(1))
  params = {"odd": jax.random.normal(jax.random.key(2), (8, 3, 3)),
            "w": jax.random.normal(jax.random.key(3), (8, 12))}
  assert _kernel_calls(theta, params, "kernel") == 1
  _, ker = _run(theta, params, 2, "kernel")
  _, ref = _run(theta, params, 2, "reference")
  np.testing.assert_allclose(ker["odd"], ref["odd"], rtol=1e-4, atol=2e-5)


def test_lanes_with_their_own_theta_sharded_or_not(devices):
  """Under vmap every lane (task) has its own perturbed theta: 8 lanes on 4 devices give
  each lane the numbers it gets on one device, and the reference's."""
  key = jax.random.key(4)
  theta = jax.vmap(_theta)(jax.random.split(key, 8))
  params = {"w": jax.random.normal(key, (8, 24, 20)), "b": jax.random.normal(key, (8, 20))}
  grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(5), p.shape), params)

  def lanes(impl):
    def one(th, g, p):
      acc = celo2.accumulators_init(p)
      acc, _ = celo2.accumulate_and_step(th, acc, g, p, False, impl)
      return celo2.accumulate_and_step(th, acc, g, p, False, impl)[1]
    return jax.vmap(one)

  mesh = jax.make_mesh((4,), ("tasks",), devices=devices[:4])
  put = lambda x: jax.device_put(x, NamedSharding(mesh, P("tasks")))
  sharded = jax.jit(jax.shard_map(lanes("kernel"), mesh=mesh, in_specs=P("tasks"),
                                  out_specs=P("tasks")))
  got = sharded(*jax.tree.map(put, (theta, grads, params)))
  one_device = jax.jit(lanes("kernel"))(theta, grads, params)
  ref = jax.jit(lanes("reference"))(theta, grads, params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
               got, one_device)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5),
               got, ref)


def test_gradient_is_the_references():
  """Truncated backprop through the rule: d(loss)/d(theta, params) through the kernel's
  custom vjp equals the reference's."""
  key = jax.random.key(6)
  theta = _theta(key)
  params = {"w": jax.random.normal(key, (12, 20)), "b": jax.random.normal(key, (20,))}
  grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(7), p.shape), params)

  acc0 = celo2.accumulate_and_step(theta, celo2.accumulators_init(params), grads, params,
                                   False, "reference")[0]  # non-zero accumulators

  def loss(impl, th, p):
    _, steps = celo2.accumulate_and_step(th, acc0, grads, p, False, impl)
    return sum(jnp.sum(jnp.sin(s)) for s in jax.tree.leaves(steps))

  grad_of = lambda impl: jax.jit(jax.grad(lambda th, p: loss(impl, th, p), argnums=(0, 1)))
  g_ker = grad_of("kernel")(theta, params)
  g_ref = grad_of("reference")(theta, params)
  assert helpers.max_rel_err(g_ker, g_ref) < 1e-4


def test_implementation_is_checked_and_kernel_says_why_it_cannot_run():
  with pytest.raises(ValueError, match="implementation"):
    celo2.Celo2(implementation="fused")
  wide = celo2.Celo2(hidden_size=16, implementation="kernel")
  assert "hidden size 16" in wide.kernel_unavailable()
  theta = wide.init(jax.random.key(0))
  params = {"w": jnp.ones((4, 4))}
  with pytest.raises(ValueError, match="hidden size 16"):
    celo2.accumulate_and_step(theta, celo2.accumulators_init(params), params, params,
                              True, "kernel")
  assert celo2.Celo2().kernel_unavailable() == ""
  assert celo2.Celo2(implementation="reference").kernel_unavailable()


def test_pes_meta_gradient_same_with_kernel_and_reference():
  """The learner's PES meta-gradient with Celo2 on 2 devices (quadratic tasks: vectors)."""
  grads = {}
  for impl in ("kernel", "reference"):
    lopt = celo2.Celo2Base(implementation=impl)
    lrn = helpers.learner(2, lambda lo: [helpers.pes_estimator(
        lo, num_tasks=4, trunc_length=5, family=quadratics.FixedDimQuadraticFamily(6))],
                          lopt=lopt)
    state = lrn.init(jax.random.key(0))
    grads[impl], _ = jax.device_get(lrn.meta_gradient(state, jax.random.key(1)))
  assert helpers.cosine(grads["kernel"], grads["reference"]) > 0.9999
  assert helpers.global_rel_err(grads["kernel"], grads["reference"]) < 1e-2


# ----------------------------------------------------------------------------- Newton-Schulz


@pytest.mark.parametrize("shape", [(4, 64, 32), (3, 10, 32), (2, 33, 17), (16, 16), (5, 7)])
def test_newton_schulz_kernel_equals_the_xla_ops(shape):
  """Tall and wide (transposed inside), sizes that pad to 16, one matrix and a batch."""
  x = jax.random.normal(jax.random.key(8), shape)
  want = jax.jit(celo2.newton_schulz)(x)
  fused = jax.jit(lambda a: newton_schulz.apply(a, celo2.newton_schulz, celo2.NS_ITERS))
  np.testing.assert_allclose(fused(x), want, rtol=1e-4, atol=5e-6)
  m, n = sorted(shape[-2:])
  lanes = int(np.prod(shape[:-2]))
  text = fused.lower(x).compile().as_text()
  assert newton_schulz.hlo_flops(text) == lanes * celo2.NS_ITERS * (4 * m * m * n + 2 * m ** 3)


def test_newton_schulz_kernel_gradient_and_lanes_on_devices(devices):
  x = jax.random.normal(jax.random.key(9), (8, 12, 20))
  ns = lambda a: newton_schulz.apply(a, celo2.newton_schulz, celo2.NS_ITERS)
  loss = lambda f: jax.jit(jax.grad(lambda a: jnp.sum(jnp.sin(f(a)))))
  assert helpers.max_rel_err(loss(ns)(x), loss(celo2.newton_schulz)(x)) < 1e-5
  mesh = jax.make_mesh((4,), ("tasks",), devices=devices[:4])
  sharded = jax.jit(jax.shard_map(jax.vmap(ns), mesh=mesh, in_specs=P("tasks"),
                                  out_specs=P("tasks")))
  got = sharded(jax.device_put(x, NamedSharding(mesh, P("tasks"))))
  np.testing.assert_allclose(got, jax.jit(ns)(x), rtol=1e-6, atol=1e-7)


def test_celo2_runs_newton_schulz_in_the_kernel_only_for_small_matrices():
  """Large matrices (here 256 x 256) run XLA's products, which are faster there."""
  theta = _theta(jax.random.key(10))
  for shape, in_kernel in (((64, 32), True), ((256, 256), False)):
    text = _compiled_text(theta, {"w": jnp.ones(shape)}, "auto")
    assert (newton_schulz.hlo_flops(text) > 0) == in_kernel, shape
  assert newton_schulz.shape_unsupported((4, 256, 256))
  assert not newton_schulz.shape_unsupported((4, 128, 256))


def test_a_nan_gradient_gives_the_references_nans():
  """A diverged inner task: NaN in one gradient entry makes the whole matrix's step NaN
  (its feature norms are NaN) in the XLA ops, and must in the kernels too (their clip and
  ReLU let NaN through as XLA's max and min do); an inf is clipped to finite in both."""
  key = jax.random.key(11)
  theta = _theta(key)
  params = {"w": jax.random.normal(key, (24, 20)), "b": jax.random.normal(key, (20,))}
  grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(12), p.shape), params)
  grads = {"w": grads["w"].at[3, 4].set(jnp.nan), "b": grads["b"].at[2].set(jnp.inf)}
  out = {}
  for impl in ("kernel", "reference"):
    out[impl] = jax.jit(lambda a, g, i=impl: celo2.accumulate_and_step(
        theta, a, g, params, True, i))(celo2.accumulators_init(params), grads)
  for a, b in zip(jax.tree.leaves(out["kernel"]), jax.tree.leaves(out["reference"])):
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
  assert np.isnan(out["kernel"][1]["w"]).all() and np.isfinite(out["kernel"][1]["b"]).all()
