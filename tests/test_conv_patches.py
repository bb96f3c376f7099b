"""``conv.PatchConv`` / ``conv_same_as_matmul``: the same function, gradients, parameters
and init as flax ``nn.Conv`` with 'SAME' padding, also under vmap over kernels."""


import jax
import jax.numpy as jnp
import numpy as np

from spmd_lopt.tasks.fixed import conv


def _lax_conv(x, kernel, strides):
  return jax.lax.conv_general_dilated(x, kernel, strides, "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


CASES = [((8, 8), (3, 3), (2, 2)), ((4, 4), (3, 3), (1, 1)), ((7, 5), (3, 3), (2, 2)),
         ((6, 9), (2, 3), (1, 2)), ((5, 5), (1, 1), (2, 1))]


def test_matches_lax_conv_values_and_grads():
  # every case in one jit: op-by-op dispatch would compile each op (slow tests)
  def both(x, w, cot, strides):
    def f(conv_fn):
      return lambda a, b: jnp.sum(conv_fn(a, b, strides) * cot)
    return ((conv.conv_same_as_matmul(x, w, strides), _lax_conv(x, w, strides)),
            jax.grad(f(conv.conv_same_as_matmul), (0, 1))(x, w),
            jax.grad(f(_lax_conv), (0, 1))(x, w))

  rng = np.random.RandomState(0)  # numpy draws: eager jax.random would compile per shape
  args = []
  for size, kernel, strides in CASES:
    out_shape = tuple(-(-s // t) for s, t in zip(size, strides))
    args.append(tuple(rng.normal(size=shape).astype(np.float32) for shape in
                      ((3,) + size + (4,), kernel + (4, 5), (3,) + out_shape + (5,))))
  strides = [c[2] for c in CASES]  # static: closed over, not traced
  results = jax.jit(lambda a: [both(*c, s) for c, s in zip(a, strides)])(
      [c[:3] for c in args])
  for (ours, ref), g_ours, g_ref in results:
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_ours, g_ref):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_same_padding_matches_xla():
  for size in range(1, 10):
    for k in (1, 2, 3, 4):
      for s in (1, 2, 3):
        pads = jax.lax.padtype_to_pads((size,), (k,), (s,), "SAME")[0]
        assert conv.same_padding(size, k, s) == tuple(pads), (size, k, s)


def test_convpool_same_tree_init_function_and_grads_under_vmap():
  ours, ref = conv.ConvPool((16, 32)), conv.ConvPool((16, 32), patches=False)
  x = np.random.RandomState(1).uniform(size=(16, 8, 8, 1)).astype(np.float32)

  def loss(module, params):
    return jnp.mean(module.apply({"params": params}, x) ** 2)

  # same names, shapes and (bitwise) init values (one key: a vmapped init compiles slowly)
  p_ours, p_ref = jax.jit(lambda: tuple(m.init(jax.random.key(2), x[:1])["params"]
                                        for m in (ours, ref)))()
  assert jax.tree.structure(p_ours) == jax.tree.structure(p_ref)
  assert p_ours["Conv_0"]["kernel"].shape == (3, 3, 1, 16)
  for a, b in zip(jax.tree.leaves(p_ours), jax.tree.leaves(p_ref)):
    np.testing.assert_array_equal(a, b)
  # three nets (random kernels, non-zero biases), vmapped over parameters as the suite runs
  rng = np.random.RandomState(3)
  p = jax.tree.map(lambda a: rng.normal(size=(3,) + a.shape).astype(np.float32) * 0.3,
                   p_ref)

  @jax.jit
  def run(p):
    outs = [jax.vmap(lambda q, m=m: m.apply({"params": q}, x))(p) for m in (ours, ref)]
    grads = [jax.vmap(jax.grad(lambda q, m=m: loss(m, q)))(p) for m in (ours, ref)]
    return outs, grads

  (out_ours, out_ref), (g_ours, g_ref) = run(p)
  np.testing.assert_allclose(out_ours, out_ref, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
