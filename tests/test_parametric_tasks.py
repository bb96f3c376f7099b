"""Parametric families: fixed structure across keys, vmappable, and the right math."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spmd_lopt.tasks import base, quadratics
from spmd_lopt.tasks.fixed import conv, image_mlp
from spmd_lopt.tasks.parametric import (ImageMLPConfig, ParametricImageMLP,
                                        SampleFixedTasksFamily)


def _structure(tree):
  return jax.tree.structure(tree), [(x.shape, x.dtype) for x in jax.tree.leaves(tree)]


@pytest.fixture(scope="module")
def mlp_family():
  return ParametricImageMLP(min_width=4, max_width=16, min_depth=1, max_depth=3)


def test_parametric_mlp_samples_fixed_structure_within_bounds(mlp_family):
  keys = jax.random.split(jax.random.key(0), 32)
  samples = [mlp_family.sample(k) for k in keys[:3]]
  assert all(_structure(s) == _structure(samples[0]) for s in samples)
  stacked = jax.vmap(mlp_family.sample)(keys)
  assert stacked.widths.shape == (32, 3)
  assert int(stacked.widths.min()) >= 4 and int(stacked.widths.max()) <= 16
  assert set(np.unique(stacked.depth)) == {1, 2, 3}
  assert set(np.unique(stacked.activation)) == {0, 1, 2, 3}
  base.check_task_family(mlp_family, jax.random.key(1))


def test_parametric_mlp_vmaps_over_tasks(mlp_family):
  tps = jax.vmap(mlp_family.sample)(jax.random.split(jax.random.key(2), 8))

  def init_loss(tp, k):
    t = mlp_family.task_fn(tp)
    p = t.init(k)
    return p, t.loss(p, k, t.sample_batch(k))

  params, losses = jax.jit(jax.vmap(init_loss))(tps, jax.random.split(jax.random.key(3), 8))
  assert params["Dense_1"]["kernel"].shape == (8, 16, 16)  # one padded shape for all
  assert losses.shape == (8,) and bool(jnp.all(jnp.abs(losses - jnp.log(10.0)) < 1.5))


def test_masked_mlp_equals_the_narrow_mlp(mlp_family):
  """depth 1, width 5, relu: the padded net computes exactly a 64-5-10 MLP."""
  cfg = ImageMLPConfig(widths=jnp.array([5, 16, 16], jnp.int32),
                       depth=jnp.asarray(1, jnp.int32), activation=jnp.asarray(0, jnp.int32))
  task = mlp_family.task_fn(cfg)

  @jax.jit
  def run(key):
    p = task.init(key)
    batch = task.sample_batch(key)
    x = batch["image"].reshape(128, -1)
    h = jax.nn.relu(x @ p["Dense_0"]["kernel"][:, :5] + p["Dense_0"]["bias"][:5])
    want = h @ p["Dense_3"]["kernel"][:5] + p["Dense_3"]["bias"]
    return task.logits(p, batch["image"]), want, jax.grad(task.loss)(p, key, batch)

  got, want, g = run(jax.random.key(4))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # unused layers and masked units get exactly zero gradient
  assert float(jnp.abs(g["Dense_1"]["kernel"]).max()) == 0.0
  assert float(jnp.abs(g["Dense_0"]["kernel"][:, 5:]).max()) == 0.0
  assert float(jnp.abs(g["Dense_0"]["kernel"][:, :5]).max()) > 0.0


@pytest.fixture(scope="module")
def digits_mlp():
  return image_mlp.ImageMLP_Digits8_Relu32(batch_size=16)


@pytest.mark.parametrize("other", ["same", pytest.param("conv", marks=pytest.mark.slow),
                                   "quadratic"])
def test_sample_fixed_tasks_family(other, digits_mlp):
  b = {"same": lambda: image_mlp.ImageMLP_Digits8_Relu32(batch_size=16),
       "conv": lambda: conv.Conv_Digits8_16x32(batch_size=16),
       "quadratic": lambda: quadratics.FixedDimQuadraticFamily(4).task_fn(jnp.ones(4))}[other]()
  fam = SampleFixedTasksFamily([digits_mlp, b])
  assert fam.shared_params == (other == "same")
  assert fam.shared_batch == (other != "quadratic")
  base.check_task_family(fam, jax.random.key(0))
  idx = jax.vmap(fam.sample)(jax.random.split(jax.random.key(1), 64))
  assert set(np.unique(idx)) == {0, 1}
  key = jax.random.key(5)

  def run(i, k):
    t = fam.task_fn(i)
    p = t.init(k)
    d = t.sample_batch(k)
    return p, d, t.loss(p, k, d), jax.grad(t.loss)(p, k, d)

  params, data, losses, grads = jax.jit(jax.vmap(run, in_axes=(0, None)))(
      jnp.arange(2, dtype=jnp.int32), key)
  for i, task in enumerate([digits_mlp, b]):
    p_i = jax.tree.map(lambda x: x[i], params)
    d_i = jax.tree.map(lambda x: x[i], data)
    if not fam.shared_params:
      p_i = p_i[i]
    if not fam.shared_batch:
      d_i = d_i[i]
    np.testing.assert_allclose(losses[i], jax.jit(task.loss)(p_i, key, d_i), rtol=1e-5)
  if not fam.shared_params:  # the other task's slot gets no gradient
    assert all(np.abs(np.asarray(x[0])).max() == 0 for x in jax.tree.leaves(grads[1]))


def test_noisy_quadratic_family():
  fam = quadratics.NoisyQuadraticFamily(dim=6, max_condition=50.0, min_noise=0.1,
                                        max_noise=0.5)
  base.check_task_family(fam, jax.random.key(0))
  tps = jax.jit(jax.vmap(fam.sample))(jax.random.split(jax.random.key(1), 16))
  assert _structure(jax.tree.map(lambda x: x[0], tps)) == _structure(
      jax.eval_shape(fam.sample, jax.random.key(9)))
  tps = jax.device_get(tps)  # checks below in numpy: no per-op compiles
  q = tps.rotation
  np.testing.assert_allclose(np.einsum("tij,tik->tjk", q, q),
                             np.broadcast_to(np.eye(6), (16, 6, 6)), atol=1e-5)
  assert float(tps.eigs.max()) <= 1.0 + 1e-6 and float(tps.eigs.min()) >= 1 / 50 - 1e-6
  assert float(tps.noise_std.min()) >= 0.1 - 1e-6 and float(tps.noise_std.max()) <= 0.5 + 1e-6
  # at the centre the loss is pure noise: zero mean, gradient noise of std s
  tp = jax.tree.map(lambda x: x[0], tps)
  task = fam.task_fn(tp)
  keys = jax.random.split(jax.random.key(2), 4000)
  grads = jax.jit(jax.vmap(
      lambda k: jax.grad(task.loss)(tp.center, k, task.sample_batch(k))))(keys)
  np.testing.assert_allclose(np.std(np.asarray(grads)), tp.noise_std, rtol=0.05)
  # and the clean part is 1/2 r^T A r with A = Q diag(eigs) Q^T
  r = np.arange(6.0, dtype=np.float32)
  a = tp.rotation @ np.diag(tp.eigs) @ tp.rotation.T
  clean = jax.jit(task.loss)(tp.center + r, None, jnp.zeros(6))
  np.testing.assert_allclose(clean, 0.5 * r @ a @ r, rtol=1e-5)
