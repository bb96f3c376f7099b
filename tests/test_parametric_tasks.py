"""Parametric families: fixed structure across keys, vmappable, and the right math."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from spmd_lopt.tasks import base, quadratics
from spmd_lopt.tasks.fixed import conv, image_mlp
from spmd_lopt.tasks.parametric import (ImageMLPConfig, ParametricImageMLP,
                                        SampleFixedTasksFamily)


def _structure(tree):
  return jax.tree.structure(tree), [(x.shape, x.dtype) for x in jax.tree.leaves(tree)]


@pytest.fixture(scope="module")
def mlp_family():
  ds = image_mlp.ImageMLP_Digits8_Relu32(batch_size=16).datasets
  return ParametricImageMLP(ds, architectures=((5,), (16,), (8, 8)))


def test_parametric_mlp_samples_fixed_structure(mlp_family):
  keys = jax.random.split(jax.random.key(0), 64)
  samples = [mlp_family.sample(k) for k in keys[:3]]
  assert all(_structure(s) == _structure(samples[0]) for s in samples)
  stacked = jax.vmap(mlp_family.sample)(keys)
  assert set(np.unique(stacked.architecture)) == {0, 1, 2}
  assert set(np.unique(stacked.activation)) == {0, 1, 2, 3}
  base.check_task_family(mlp_family, jax.random.key(1))
  with pytest.raises(ValueError, match="architectures"):
    ParametricImageMLP(architectures=[()])
  with pytest.raises(ValueError, match="activations"):
    ParametricImageMLP(activations=["swish2"])


@pytest.mark.slow  # ~10 s CPU (compiles three switched nets); the step test covers slot 0
def test_parametric_mlp_slots_have_the_narrow_shapes_and_only_one_is_used(mlp_family):
  cfgs = ImageMLPConfig(architecture=jnp.arange(3, dtype=jnp.int32),
                        activation=jnp.zeros(3, jnp.int32))

  def init_loss_grad(cfg, k):
    t = mlp_family.task_fn(cfg)
    p = t.init(k)
    d = t.sample_batch(k)
    return p, t.loss(p, k, d), jax.grad(t.loss)(p, k, d)

  params, losses, grads = jax.device_get(jax.jit(jax.vmap(init_loss_grad, in_axes=(
      0, None)))(cfgs, jax.random.key(3)))
  assert params[0]["Dense_0"]["kernel"].shape == (3, 64, 5)  # no padding
  assert params[2]["Dense_1"]["kernel"].shape == (3, 8, 8)
  assert np.all(np.abs(losses - np.log(10.0)) < 1.5)
  for task in range(3):
    for slot in range(3):
      leaves = [x[task] for x in jax.tree.leaves(params[slot])]
      gl = [x[task] for x in jax.tree.leaves(grads[slot])]
      used = max(np.abs(g).max() for g in gl) > 0
      assert used == (slot == task)
      if slot != task:  # unused slots start at zero
        assert all(np.abs(x).max() == 0.0 for x in leaves)


@pytest.mark.parametrize("lopt_name", ["mlp_lopt", pytest.param("adafac_mlp_lopt",
                                                                 marks=pytest.mark.slow)])
def test_learned_optimizer_step_on_sampled_net_equals_step_on_narrow_net(mlp_family,
                                                                         lopt_name):
  """The issue's acceptance test: the task's params in slot 0 (a 64-5-10 ReLU net) get
  exactly the update the learned optimizer gives the 64-5-10 net on its own."""
  from spmd_lopt.learned_optimizers import adafac_mlp_lopt, mlp_lopt
  lopt = {"mlp_lopt": mlp_lopt.MLPLOpt, "adafac_mlp_lopt": adafac_mlp_lopt.AdafacMLPLOpt}[
      lopt_name]()
  theta = lopt.init(jax.random.key(7))
  cfg = ImageMLPConfig(architecture=jnp.asarray(0, jnp.int32),
                       activation=jnp.asarray(0, jnp.int32))
  task = mlp_family.task_fn(cfg)
  narrow = image_mlp.MLP((5,), 10)

  @jax.jit
  def steps(key):
    opt = lopt.opt_fn(theta)
    p = task.init(key)
    q = p[0]  # the same numbers as a standalone narrow net's params

    def narrow_loss(q, batch):
      logits = narrow.apply({"params": q}, batch["image"])
      return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits,
                                                                       batch["label"]))

    s_p = opt.init(p, num_steps=10)
    s_q = opt.init(q, num_steps=10)
    for i in range(3):
      batch = task.sample_batch(jax.random.fold_in(key, i))
      s_p = opt.update(s_p, jax.grad(task.loss)(opt.get_params(s_p), key, batch))
      s_q = opt.update(s_q, jax.grad(narrow_loss)(opt.get_params(s_q), batch))
    return opt.get_params(s_p)[0], opt.get_params(s_q), q

  got, want, start = steps(jax.random.key(4))
  moved = max(float(jnp.abs(a - b).max()) for a, b in
              zip(jax.tree.leaves(want), jax.tree.leaves(start)))
  assert moved > 1e-5  # the optimizer did move the narrow net
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got,
               want)


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


def test_rotated_noisy_quadratic_family():
  fam = quadratics.RotatedNoisyQuadraticFamily(dim=6, max_condition=50.0, min_noise=0.1,
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
