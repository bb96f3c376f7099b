"""Fixed image tasks: they build, their loss falls under Adam, and the registry finds them."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fake_data
from spmd_lopt import datasets as D
from spmd_lopt.tasks import base, registry
from spmd_lopt.tasks.fixed import conv, image_mlp


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("data"))
  fake_data.write_mnist_like(d, "mnist", n_train=300, n_test=50, seed=1)
  fake_data.write_mnist_like(d, "fashion_mnist", n_train=300, n_test=50, seed=2)
  fake_data.write_cifar10(d, n_per_batch=60, n_test=50, seed=3)
  return d


def adam_losses(task, steps=80, lr=1e-2):
  """Train with Adam in one scan; return (per-step train losses, final test loss)."""
  tx = optax.adam(lr)

  @jax.jit
  def run(key):
    params = task.init(key)

    def step(carry, k):
      p, s = carry
      loss, g = jax.value_and_grad(task.loss)(p, k, task.sample_batch(k))
      u, s = tx.update(g, s, p)
      return (optax.apply_updates(p, u), s), loss

    (p, _), losses = jax.lax.scan(step, (params, tx.init(params)),
                                  jax.random.split(key, steps))
    k = jax.random.key(99)
    return losses, task.loss(p, k, task.sample_batch(k, "test"))

  losses, test = run(jax.random.key(0))
  return np.asarray(losses), float(test)


def assert_learns(task):
  losses, test = adam_losses(task)
  first, last = losses[:10].mean(), losses[-10:].mean()
  assert abs(first - math.log(10)) < 0.6, first  # starts near chance
  assert last < 0.5 * first, (first, last)
  assert test < 0.7 * first, (first, test)


@pytest.mark.parametrize("make", [image_mlp.ImageMLP_Digits8_Relu32,
                                  conv.Conv_Digits8_16x32])
def test_embedded_digits_task_learns(make):
  assert_learns(make())


@pytest.mark.parametrize("make", [image_mlp.ImageMLP_FashionMnist8_Relu32,
                                  image_mlp.ImageMLP_Mnist8_Relu32,
                                  pytest.param(conv.Conv_FashionMnist8_16x32,
                                               marks=pytest.mark.slow),
                                  conv.Conv_Cifar10_8_16x32])
def test_real_data_task_learns_on_written_files(make, data_dir):
  task = make(data_dir=data_dir)
  assert task.datasets.split_size("train") == 240
  assert_learns(task)


@pytest.mark.parametrize("make,image_shape,n_params", [
    (image_mlp.ImageMLP_FashionMnist_Relu128x128, (28, 28, 1),
     784 * 128 + 128 + 128 * 128 + 128 + 1290),
    (image_mlp.ImageMLP_Mnist_Relu32, (28, 28, 1), 784 * 32 + 32 + 330),
    pytest.param(conv.Conv_Cifar10_32x64x64, (32, 32, 3),
                 27 * 32 + 32 + 288 * 64 + 64 + 576 * 64 + 64 + 650,
                 marks=pytest.mark.slow),
])
def test_full_size_tasks_build(make, image_shape, n_params, data_dir):
  task = make(data_dir=data_dir, batch_size=16)  # small batch: this checks wiring only

  @jax.jit
  def build(key):
    params = task.init(key)
    batch = task.sample_batch(key)
    return params, batch["image"].shape, task.loss(params, key, batch)

  params, _, loss = build(jax.random.key(0))
  assert sum(x.size for x in jax.tree.leaves(params)) == n_params
  assert jax.eval_shape(task.sample_batch, jax.random.key(0))["image"].shape == (
      (16,) + image_shape)
  assert loss.shape == () and abs(float(loss) - math.log(10)) < 1.0


def test_reference_mlp_shape_and_batch():
  task = image_mlp.ImageMLP_Digits8_Relu32()
  params = task.init(jax.random.key(0))
  assert sum(x.size for x in jax.tree.leaves(params)) == 2410  # 64*32+32+32*10+10
  assert jax.eval_shape(task.sample_batch, jax.random.key(0)) == {
      "image": jax.ShapeDtypeStruct((128, 8, 8, 1), jnp.float32),
      "label": jax.ShapeDtypeStruct((128,), jnp.int32)}


def test_normalizer_clips_and_maps_nan_to_max():
  task = image_mlp.ImageMLP_Digits8_Relu32()
  hi = 1.5 * math.log(10)
  out = task.normalizer(jnp.array([jnp.nan, -1.0, 1.0, 10.0, jnp.inf]))
  np.testing.assert_allclose(out, [hi, 0.0, 1.0, hi, hi], rtol=1e-6)


def test_with_datasets_gives_same_loss_as_closed_over():
  task = image_mlp.ImageMLP_Digits8_Relu32()
  key = jax.random.key(4)
  params = task.init(key)

  def f(ds, k):
    t = task.with_datasets(ds)
    return t.loss(params, k, t.sample_batch(k))

  closed = jax.jit(lambda k: task.loss(params, k, task.sample_batch(k)))(key)
  np.testing.assert_allclose(jax.jit(f)(task.datasets, key), closed, rtol=1e-6)


def test_registry_tasks_and_families(monkeypatch, tmp_path):
  assert registry.get_task("ImageMLP_Digits8_Relu32").name == "ImageMLP_Digits8_Relu32"
  with pytest.raises(ValueError, match="ImageMLP_FashionMnist8_Relu32"):
    registry.get_task("ImageMLP_Nope")
  with pytest.raises(ValueError, match="FixedDimQuadraticFamily_<dim>"):
    registry.get_task_family("nope")
  assert registry.get_task_family("quadratic").dim == 10
  assert registry.get_task_family("FixedDimQuadraticFamily_7").dim == 7
  assert registry.get_task_family("NoisyQuadraticFamily_3").dim == 3
  fam = registry.get_task_family("Conv_Digits8_16x32")
  base.check_task_family(fam, jax.random.key(0))
  assert fam.datasets.name == "digits8"
  monkeypatch.setenv("SPMD_LOPT_DATA", str(tmp_path))
  with pytest.raises(D.DatasetNotFoundError, match="train-images-idx3-ubyte.gz"):
    registry.get_task("ImageMLP_FashionMnist8_Relu32")
