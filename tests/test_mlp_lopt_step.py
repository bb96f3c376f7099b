"""spmd_lopt.kernels.mlp_lopt_step: MLPLOpt's norms, MLP and step for all tensors of a
model in one CPU kernel call, against MLPLOpt's XLA implementation (``steps_of_tensors``).

The kernel is compiled from source by the host's C++ compiler; skipped where there is none.
"""

import functools
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from spmd_lopt.bench import cost_model
from spmd_lopt.kernels import mlp_lopt_step
from spmd_lopt.kernels import per_entry_mlp
from spmd_lopt.learned_optimizers import mlp_lopt

pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None,
                                reason="no C++ compiler to build the kernel")


def _weights(key, hidden, hidden_layers, momenta=6, lanes=(), out_bias=(0.0, 0.0)):
  """tensor_kernel [2 + K, H], step_bias [H], tail: a random MLPLOpt-like MLP."""
  k = iter(jax.random.split(key, 2 * hidden_layers + 4))
  normal = lambda shape, s: s * jax.random.normal(next(k), lanes + shape)
  f = 2 + momenta
  layers = [{"kernel": normal((hidden, hidden), hidden ** -0.5),
             "bias": normal((hidden,), 0.1)} for _ in range(hidden_layers - 1)]
  layers.append({"kernel": normal((hidden, 2), hidden ** -0.5),
                 "bias": jnp.broadcast_to(jnp.asarray(out_bias, jnp.float32), lanes + (2,))})
  pack = per_entry_mlp.pack_tail
  for _ in lanes:
    pack = jax.vmap(pack)
  return normal((f, hidden), f ** -0.5), normal((hidden,), 0.1), pack(layers)


def _tensors(key, sizes, momenta=6, lanes=()):
  """(p, g, m) per size: p, g [n], m [n, K], on different scales (the norms matter)."""
  out = []
  for i, n in enumerate(sizes):
    k = jax.random.split(jax.random.fold_in(key, i), 3)
    out.append((0.3 * jax.random.normal(k[0], lanes + (n,)),
                jax.random.normal(k[1], lanes + (n,)) * (i + 1),
                0.1 * jax.random.normal(k[2], lanes + (n, momenta))))
  return out


def _consts(hidden_layers, exp_mult=0.5, step_mult=0.01):
  return {"exp_mult": exp_mult, "step_mult": step_mult, "hidden_layers": hidden_layers}


def _reference(consts):
  return functools.partial(mlp_lopt.steps_of_tensors, implementation="reference", **consts)


def _both(tensors, weights, consts):
  got = mlp_lopt_step.apply(_reference(consts), tensors, *weights, **consts)
  return got, _reference(consts)(tuple(tuple(t) for t in tensors), *weights)


def _close(got, want, rtol=1e-4):
  for a, b in zip(got, want):
    assert a.shape == b.shape
    scale = float(jnp.abs(b).max())
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("hidden,hidden_layers,momenta,sizes", [
    (32, 2, 6, (2048, 32, 320, 10)),  # MLPLOpt's default on the 8x8 digits MLP
    (16, 1, 6, (1, 9, 17)),           # a scalar; partial tiles of 1 and of 1 after 16
    (48, 3, 3, (33,)),                # other sizes the kernel takes
    (64, 2, 8, (5, 100)),
])
def test_steps_equal_the_xla_implementation(hidden, hidden_layers, momenta, sizes):
  weights = _weights(jax.random.key(0), hidden, hidden_layers, momenta)
  tensors = _tensors(jax.random.key(1), sizes, momenta)
  got, want = _both(tensors, weights, _consts(hidden_layers))
  assert all(float(jnp.abs(w).max()) > 0 for w in want)
  _close(got, want)


def test_lanes_with_their_own_weights_under_vmap_and_jit():
  """Tasks x perturbations as nested vmap lanes, each with its own weights and tensors."""
  lanes = (2, 3)
  weights = _weights(jax.random.key(2), 32, 2, lanes=lanes)
  tensors = _tensors(jax.random.key(3), (64, 7), lanes=lanes)
  consts = _consts(2)
  run = lambda fn: jax.jit(jax.vmap(jax.vmap(fn)))(tensors, *weights)
  got = run(lambda t, *w: mlp_lopt_step.apply(_reference(consts), t, *w, **consts))
  want = run(lambda t, *w: _reference(consts)(tuple(tuple(x) for x in t), *w))
  _close(got, want)


def test_inside_shard_map_on_4_devices_equals_1(devices):
  """Lanes spread over 4 devices give each lane the numbers it has on one device."""
  mesh = jax.make_mesh((4,), ("d",), devices=devices[:4])
  weights = _weights(jax.random.key(4), 32, 2, lanes=(8,))
  tensors = _tensors(jax.random.key(5), (40, 3), lanes=(8,))
  consts = _consts(2)
  fn = jax.vmap(lambda t, *w: mlp_lopt_step.apply(_reference(consts), t, *w, **consts))
  one = jax.jit(fn)(tensors, *weights)
  put = lambda tree: jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, P("d"))),
                                  tree)
  sharded = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=P("d"), out_specs=P("d")))(
      put(tensors), *put(weights))
  for a, b in zip(sharded, one):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_gradient_is_the_references():
  """Gradients (truncated backprop through the inner step) differentiate the XLA form."""
  weights = _weights(jax.random.key(6), 32, 2)
  tensors = _tensors(jax.random.key(7), (24, 5))
  consts = _consts(2)

  def loss(fn, tensors, tk):
    steps = fn(tensors, tk, *weights[1:])
    return sum(jnp.sum(jnp.sin(s * 100.0)) for s in steps)

  kernel = lambda t, *w: mlp_lopt_step.apply(_reference(consts), t, *w, **consts)
  reference = lambda t, *w: _reference(consts)(tuple(tuple(x) for x in t), *w)
  got = jax.grad(functools.partial(loss, kernel), argnums=(0, 1))(tensors, weights[0])
  want = jax.grad(functools.partial(loss, reference), argnums=(0, 1))(tensors, weights[0])
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(jnp.abs(b).max()))


def test_more_tensors_than_one_call_takes_are_split():
  consts = _consts(2)
  weights = _weights(jax.random.key(8), 16, 2)
  tensors = _tensors(jax.random.key(9), [3] * (mlp_lopt_step.MAX_TENSORS + 6))
  fn = jax.jit(lambda t: mlp_lopt_step.apply(_reference(consts), t, *weights, **consts))
  text = fn.lower(tensors).compile().as_text()
  assert mlp_lopt_step.hlo_calls(text) == 2
  got = fn(tensors)
  assert len(got) == len(tensors)
  _close(got, _reference(consts)(tuple(tuple(t) for t in tensors), *weights))


def test_exp_overflow_underflow_and_nan_as_xla():
  """The kernel's own exp: exp_mult large enough that exp(s * exp_mult) overflows to inf
  for some entries and underflows for others, including the window above 88 where a
  plain 2^n would overflow early; a NaN gradient entry makes NaN steps as in XLA."""
  weights = _weights(jax.random.key(10), 32, 2, out_bias=(0.0, 0.5))
  (p, g, m), = _tensors(jax.random.key(11), (256,))
  # The exponent s * exp_mult per entry, as the XLA form computes it: entries within
  # rounding of the overflow point may land on either side of it.
  columns = [g[:, None], p[:, None], m]
  norms = jax.lax.rsqrt(1e-5 + jnp.concatenate([jnp.mean(c * c, axis=0) for c in columns]))
  s = per_entry_mlp.reference(columns, norms[:, None] * weights[0], weights[1], weights[2],
                              2, 2)[:, 1]
  window = False  # some entry between 88 and the overflow (~88.72)
  for exp_mult in (40.0, 180.0, 700.0):
    window |= bool(np.any((np.asarray(s) * exp_mult > 88.0) &
                          (np.asarray(s) * exp_mult < 88.7)))
    consts = _consts(2, exp_mult=exp_mult, step_mult=1e-30)
    (got,), (want,) = _both([(p, g, m)], weights, consts)
    got, want = np.asarray(got), np.asarray(want)
    clear = np.abs(np.asarray(s) * exp_mult - 88.7228) > 0.05
    np.testing.assert_array_equal(np.isinf(got)[clear], np.isinf(want)[clear])
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    finite = np.isfinite(want) & np.isfinite(got)
    np.testing.assert_allclose(got[finite], want[finite], rtol=2e-3, atol=1e-37)
    if exp_mult == 700.0:
      assert np.isinf(want).any() and (np.abs(want[finite]) < 1e-36).any()
  assert window
  (got,), (want,) = _both([(p, g.at[7].set(jnp.nan), m)], weights, _consts(2))
  np.testing.assert_array_equal(np.isnan(np.asarray(got)), np.isnan(np.asarray(want)))
  assert np.isnan(np.asarray(got)).all()  # the norm of g is NaN: every entry's features


def test_unsupported_arrays_say_why():
  tk, _, _ = _weights(jax.random.key(12), 32, 2)
  (p, g, m), = _tensors(jax.random.key(13), (4,))
  assert mlp_lopt_step.unsupported(p, g, m, tk, 2) == ""
  assert "float32" in mlp_lopt_step.unsupported(p.astype(jnp.bfloat16), g, m, tk, 2)
  assert "[n]" in mlp_lopt_step.unsupported(p[None], g, m, tk, 2)
  assert "entries" in mlp_lopt_step.unsupported(p[:0], g[:0], m[:0], tk, 2)
  assert "momenta" in mlp_lopt_step.unsupported(p, g, m[:, :3], tk, 2)
  assert "hidden size" in mlp_lopt_step.unsupported(p, g, m, tk[:, :8], 2)
  assert "9 momenta" in mlp_lopt_step.unavailable(9, 32, 2)


def test_mlp_lopt_runs_one_call_per_update_and_the_bench_counts_its_flops():
  """MLPLOpt's update: one call for the whole tree (no per-tensor MLP calls), and the cost
  model adds its MLP FLOPs (XLA counts a custom call as nothing)."""
  params = {"w": jnp.ones((7, 5)), "b": jnp.zeros((5,)), "s": jnp.asarray(0.5)}
  lopt = mlp_lopt.MLPLOpt()
  opt = lopt.opt_fn(lopt.init(jax.random.key(0)))
  state = opt.init(params)
  compiled = jax.jit(opt.update).lower(state, params).compile()
  text = compiled.as_text()
  assert mlp_lopt_step.hlo_calls(text) == 1
  assert per_entry_mlp.TARGET not in text
  h = 32
  want = 2.0 * (35 + 5 + 1) * (8 * h + h * h + 2 * h)
  assert mlp_lopt_step.hlo_flops(text) == want
  assert cost_model.xla_cost(compiled)["flops"] >= want
