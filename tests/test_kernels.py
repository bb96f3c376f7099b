"""spmd_lopt.kernels: the fused per-entry MLP against its JAX reference, and its build.

The kernel is compiled from source by the host's C++ compiler; these tests need one
(``c++``), as the kernel itself does, and are skipped where there is none.
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
from spmd_lopt.kernels import cpu_build
from spmd_lopt.kernels import mlp_lopt_step
from spmd_lopt.kernels import per_entry_mlp as pem
from spmd_lopt.learned_optimizers import mlp_lopt

import helpers

pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None,
                                reason="no C++ compiler to build the kernel")


def _mlp(key, widths, hidden, hidden_layers, num_out, n, lanes=()):
  """Random features (widths[a] columns each) and weights of a per-entry MLP."""
  k = iter(jax.random.split(key, 8 + len(widths)))
  normal = lambda shape, s=1.0: s * jax.random.normal(next(k), lanes + shape)
  feats = [normal((n, w)) for w in widths]
  f = sum(widths)
  layers = [{"kernel": normal((hidden, hidden), hidden ** -0.5), "bias": normal((hidden,), .1)}
            for _ in range(hidden_layers - 1)]
  layers.append({"kernel": normal((hidden, num_out), hidden ** -0.5),
                 "bias": normal((num_out,), .1)})
  pack = pem.pack_tail
  for _ in lanes:
    pack = jax.vmap(pack)
  return feats, normal((f, hidden), f ** -0.5), normal((hidden,), .1), pack(layers)


def _both(feats, k0, b0, tail, hidden_layers, num_out):
  run = lambda impl: pem.apply(feats, k0, b0, tail, hidden_layers=hidden_layers,
                               num_out=num_out, implementation=impl)
  return run("kernel"), run("reference")


@pytest.mark.parametrize("hidden,hidden_layers,num_out,widths,n", [
    (32, 2, 2, (1, 1, 6), 2442),   # MLPLOpt's default, the digits MLP's entry count
    (16, 1, 1, (3,), 1),           # one entry: a tile of 8 rows with 7 padded
    (48, 3, 3, (2, 5, 1, 1), 9),   # 9 entries: one whole tile and one of 1
    (64, 2, 8, (64,), 17),         # the largest sizes the kernel takes
])
def test_kernel_equals_reference(hidden, hidden_layers, num_out, widths, n):
  args = _mlp(jax.random.key(n), widths, hidden, hidden_layers, num_out, n)
  got, want = _both(*args, hidden_layers, num_out)
  assert got.shape == want.shape == (n, num_out)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))


def test_under_nested_vmap_jit_and_scan():
  """Lanes (nested vmap, one weight set per lane), inside jit and a scan, as the
  truncated step runs it."""
  feats, k0, b0, tail = _mlp(jax.random.key(1), (1, 1, 6), 32, 2, 2, 50, lanes=(2, 3))

  def run(impl):
    one = lambda f, k, b, t: pem.apply(f, k, b, t, hidden_layers=2, num_out=2,
                                       implementation=impl)

    def body(carry, _):
      out = jax.vmap(jax.vmap(one))([carry] + feats[1:], k0, b0, tail)
      return carry + 1e-3 * out[..., :1], out.sum()

    return jax.jit(lambda: jax.lax.scan(body, feats[0], length=3))()

  (c1, s1), (c2, s2) = run("kernel"), run("reference")
  np.testing.assert_allclose(c1, c2, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(s1, s2, rtol=1e-4)


def test_inside_shard_map_same_as_one_device(devices):
  """Lanes sharded over 4 devices give each lane the numbers it gets on one."""
  feats, k0, b0, tail = _mlp(jax.random.key(2), (1, 1, 6), 32, 2, 2, 40, lanes=(8,))
  one = jax.vmap(lambda f, k, b, t: pem.apply(f, k, b, t, hidden_layers=2, num_out=2,
                                              implementation="kernel"))
  mesh = jax.make_mesh((4,), ("tasks",), devices=devices[:4])
  spec = P("tasks")
  put = lambda x: jax.device_put(x, NamedSharding(mesh, spec))
  sharded = jax.jit(jax.shard_map(one, mesh=mesh, in_specs=spec, out_specs=spec))
  got = sharded(*jax.tree.map(put, (feats, k0, b0, tail)))
  want = jax.jit(one)(feats, k0, b0, tail)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_gradient_is_the_references():
  feats, k0, b0, tail = _mlp(jax.random.key(3), (1, 1, 6), 32, 2, 2, 30)
  loss = lambda impl, *a: jnp.sum(jnp.sin(pem.apply(
      a[0], a[1], a[2], a[3], hidden_layers=2, num_out=2, implementation=impl)))
  g1 = jax.grad(functools.partial(loss, "kernel"), argnums=(0, 1, 2, 3))(feats, k0, b0, tail)
  g2 = jax.grad(functools.partial(loss, "reference"), argnums=(0, 1, 2, 3))(
      feats, k0, b0, tail)
  assert helpers.max_rel_err(g1, g2) < 1e-5


def test_unsupported_shapes_fall_back_or_say_why():
  feats, k0, b0, tail = _mlp(jax.random.key(4), (1, 1, 6), 8, 2, 2, 10)  # hidden 8
  with pytest.raises(ValueError, match="hidden size 8"):
    pem.apply(feats, k0, b0, tail, hidden_layers=2, num_out=2, implementation="kernel")
  auto = pem.apply(feats, k0, b0, tail, hidden_layers=2, num_out=2)
  ref = pem.reference(feats, k0, b0, tail, 2, 2)
  np.testing.assert_array_equal(auto, ref)
  with pytest.raises(ValueError, match="tail has"):
    pem.apply(feats, k0, b0, tail[:-1], hidden_layers=2, num_out=2)
  with pytest.raises(ValueError, match="implementation"):
    pem.apply(feats, k0, b0, tail, hidden_layers=2, num_out=2, implementation="fast")


def test_cost_model_counts_the_kernels_flops():
  n, lanes = 37, 3
  feats, k0, b0, tail = _mlp(jax.random.key(5), (1, 1, 6), 32, 2, 2, n, lanes=(lanes,))
  f = jax.jit(jax.vmap(lambda *a: pem.apply(a[:3], a[3], a[4], a[5], hidden_layers=2,
                                            num_out=2, implementation="kernel")))
  compiled = f.lower(*feats, k0, b0, tail).compile()
  want = 2 * lanes * n * (8 * 32 + 32 * 32 + 32 * 2)
  assert pem.hlo_flops(compiled.as_text()) == want
  # XLA's own analysis adds nothing of its own here but counts a custom call as -1.
  assert want - 4 <= cost_model.xla_cost(compiled)["flops"] <= want


@pytest.mark.parametrize("hidden_size,hidden_layers", [(32, 2), (16, 1), (8, 2), (32, 0)])
def test_mlp_lopt_kernel_and_reference_agree(hidden_size, hidden_layers):
  """MLPLOpt's updates over a few steps on a tree with a matrix, a vector and a scalar;
  sizes the kernel does not take (hidden 8, no hidden layer) run the reference."""
  params = {"w": 0.1 * jax.random.normal(jax.random.key(0), (7, 5)),
            "b": jnp.zeros((5,)), "s": jnp.asarray(0.5)}
  lopts = {impl: mlp_lopt.MLPLOpt(hidden_size=hidden_size, hidden_layers=hidden_layers,
                                  implementation=impl) for impl in ("auto", "reference")}
  theta = lopts["auto"].init(jax.random.key(1))
  out = {}
  for impl, lopt in lopts.items():
    opt = lopt.opt_fn(theta)
    state = opt.init(params)
    hlo = jax.jit(opt.update).lower(state, params).as_text()
    uses_kernel = impl == "auto" and hidden_size % 16 == 0 and hidden_layers > 0
    # The whole tree's norms, MLP and steps: one call of mlp_lopt_step's kernel.
    assert (mlp_lopt_step.TARGET in hlo) == uses_kernel
    for i in range(3):
      grad = jax.tree.map(lambda p, i=i: jnp.cos(p + i), state.params)
      state = jax.jit(opt.update)(state, grad)
    out[impl] = state.params
  steps = {k: jax.tree.map(jnp.subtract, v, params) for k, v in out.items()}
  assert min(float(jnp.abs(s).max()) for s in jax.tree.leaves(steps["reference"])) > 0
  # The steps agree to float rounding (sums of 8-32 products in another order).
  assert helpers.max_rel_err(steps["auto"], steps["reference"]) < 1e-4


def test_mlp_lopt_nan_gradient_gives_the_references_nans():
  """NaN in one gradient entry: the kernel's ReLU lets NaN through as XLA's max does, so
  the updated parameters have the reference's NaNs (here the whole tensor's)."""
  params = {"w": jax.random.normal(jax.random.key(1), (24, 20)), "b": jnp.zeros((20,))}
  grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(5), p.shape), params)
  grads["w"] = grads["w"].at[3, 4].set(jnp.nan)
  new = {}
  for impl in ("kernel", "reference"):
    lopt = mlp_lopt.MLPLOpt(implementation=impl)
    opt = lopt.opt_fn(lopt.init(jax.random.key(0)))
    new[impl] = opt.get_params(jax.jit(opt.update)(opt.init(params, num_steps=10), grads))
  for name in params:
    np.testing.assert_array_equal(np.isnan(new["kernel"][name]),
                                  np.isnan(new["reference"][name]))
  assert np.isnan(new["kernel"]["w"]).all()


def test_mlp_lopt_rejects_an_unknown_implementation():
  with pytest.raises(ValueError, match="implementation"):
    mlp_lopt.MLPLOpt(implementation="fused")


def test_pes_meta_gradient_same_with_kernel_and_reference():
  """The learner's PES meta-gradient on 2 devices: the kernel changes only the order of
  float sums (PES divides the antithetic difference by std, so the rounding shows more
  there than in one update)."""
  grads = {}
  for impl in ("kernel", "reference"):
    lopt = mlp_lopt.MLPLOpt(implementation=impl)
    lrn = helpers.learner(2, lambda lo: [helpers.pes_estimator(lo, num_tasks=4, dim=6,
                                                               trunc_length=5)], lopt=lopt)
    state = lrn.init(jax.random.key(0))
    grads[impl], _ = jax.device_get(lrn.meta_gradient(state, jax.random.key(1)))
  assert helpers.cosine(grads["kernel"], grads["reference"]) > 0.9999
  assert helpers.global_rel_err(grads["kernel"], grads["reference"]) < 1e-2


# ----------------------------------------------------------------------------- build


def _fresh_source(tmp_path, text=None, name="per_entry_mlp_copy.cc"):
  """A copy of the kernel's source (or ``text``) at a path no earlier ``load`` has seen."""
  src = tmp_path / name
  src.write_text(text if text is not None else open(pem.SOURCE).read())
  return str(src)


def test_build_is_cached_per_source_and_machine(tmp_path, monkeypatch):
  monkeypatch.setenv(cpu_build.ENV_CACHE, str(tmp_path / "cache"))
  src = _fresh_source(tmp_path)
  lib = cpu_build.load(src)
  assert lib is not None and cpu_build.reason(src) == ""
  assert cpu_build.load(src) is lib
  built = os.listdir(tmp_path / "cache")
  assert len(built) == 1 and built[0].endswith(".so")
  # Another CPU (a host with other instruction sets) gets another library name.
  path = cpu_build.library_path(src, "c++")
  monkeypatch.setattr(cpu_build, "_cpu_fingerprint", lambda: "model name: other")
  assert cpu_build.library_path(src, "c++") != path


def test_an_unusable_cache_dir_falls_back_to_the_temporary_directory(tmp_path, monkeypatch):
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  monkeypatch.setenv(cpu_build.ENV_CACHE, str(blocker / "cache"))  # cannot be created
  monkeypatch.setattr(cpu_build.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
  src = _fresh_source(tmp_path)
  assert cpu_build.load(src) is not None, cpu_build.reason(src)
  built = os.listdir(tmp_path / "tmp" / f"spmd_lopt_kernels_{os.getuid()}")
  assert len(built) == 1 and built[0].endswith(".so")


def test_no_compiler_a_failed_build_or_disabled_say_why(tmp_path, monkeypatch):
  monkeypatch.setenv(cpu_build.ENV_CACHE, str(tmp_path / "cache"))
  monkeypatch.setenv("CXX", "no-such-compiler-here")
  src = _fresh_source(tmp_path)
  assert cpu_build.load(src) is None
  assert "no C++ compiler" in cpu_build.reason(src)

  monkeypatch.delenv("CXX")
  broken = _fresh_source(tmp_path, "this is not C++\n", name="broken.cc")
  assert cpu_build.load(broken) is None
  assert "failed" in cpu_build.reason(broken)
  left = os.listdir(tmp_path / "cache")
  assert not [f for f in left if f.startswith("broken") or f.endswith(".tmp")], left

  monkeypatch.setenv(cpu_build.ENV_DISABLE, "0")
  other = _fresh_source(tmp_path, name="other.cc")
  assert cpu_build.load(other) is None
  assert cpu_build.ENV_DISABLE in cpu_build.reason(other)
