"""The reference library's data model and quadratic tasks: host-iterator ``Datasets`` and
``quadratics`` with the reference's contracts."""

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spmd_lopt import datasets as D
from spmd_lopt.tasks import augmentation, base, datasets_base, quadratics, registry


def test_quadratic_task():
  task = quadratics.QuadraticTask(dim=7)
  p = task.init(jax.random.key(0))
  assert p.shape == (7,)
  np.testing.assert_allclose(task.loss(p, None, None), np.sum(np.square(p)), rtol=1e-6)
  assert task.datasets is None


def test_batch_quadratic_task_has_host_iterators():
  task = quadratics.BatchQuadraticTask()
  ds = task.datasets
  assert isinstance(ds, datasets_base.Datasets)
  batch = next(ds.train)
  assert isinstance(batch, np.ndarray) and batch.shape == (4, 2) and batch.dtype == np.float32
  assert ds.abstract_batch == jax.ShapeDtypeStruct((4, 2), jnp.float32)
  for split in datasets_base.SPLITS:
    assert next(ds.split(split)).shape == (4, 2)
  assert not np.array_equal(next(ds.train), next(ds.train))  # a stream, not a constant
  with pytest.raises(ValueError, match="validation"):
    ds.split("validation")
  p = task.init(jax.random.key(1))
  assert p.shape == (10,)
  np.testing.assert_allclose(task.loss(p, None, batch), np.sum(np.square(p)), rtol=1e-6)
  fam = base.single_task_to_family(task)
  assert fam.datasets is ds
  base.check_task_family(fam, jax.random.key(0))


def test_fixed_dim_quadratic_family_data():
  fam = quadratics.FixedDimQuadraticFamilyData(5)
  base.check_task_family(fam, jax.random.key(0))  # uses abstract_batch for the data
  t = fam.sample_task(jax.random.key(2))  # the reference's shortcut
  np.testing.assert_array_equal(t._center, fam.sample(jax.random.key(2)))
  c = fam.sample(jax.random.key(2))
  assert c.shape == (5,)
  task = fam.task_fn(c)
  e = next(task.datasets.train)
  assert e.shape == () and e.dtype == np.float32
  p = task.init(jax.random.key(3))
  want = float(np.sum(np.square(np.asarray(c) - np.asarray(p))) + e)
  np.testing.assert_allclose(task.loss(p, None, e), want, rtol=1e-5)
  loss, aux = task.loss_and_aux(p, None, e)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  np.testing.assert_allclose(aux["l2"], np.mean(np.square(p)), rtol=1e-6)
  np.testing.assert_allclose(aux["l1"], np.mean(np.abs(p)), rtol=1e-6)
  np.testing.assert_allclose(task.normalizer(jnp.array([-3.0, 5.0, 2e3])), [0, 5, 1000])
  # the four splits are independent streams
  firsts = [next(task.datasets.split(s)) for s in datasets_base.SPLITS]
  assert len({float(x) for x in firsts}) == 4
  # the default "general" loss is the loss with state passed through
  loss3, state, aux3 = task.loss_with_state_and_aux(p, "s", None, e)
  assert state == "s" and aux3 == {} and float(loss3) == pytest.approx(want, rel=1e-5)


def test_reference_noisy_quadratic_family():
  fam = quadratics.NoisyQuadraticFamily(4, cov=0.5)
  base.check_task_family(fam, jax.random.key(0))
  center, scale = jax.vmap(fam.sample)(jax.random.split(jax.random.key(1), 500))
  assert center.shape == (500, 4) and float(scale.min()) >= 0 and float(scale.max()) <= 25
  assert float(scale.max()) > 20  # U[0, 25]
  tp = (center[0], scale[0])
  task = fam.task_fn(tp)
  p = task.init(jax.random.key(2))
  clean = np.sum(np.square(np.asarray(scale[0]) * (np.asarray(center[0]) - np.asarray(p))))
  np.testing.assert_allclose(task.loss(p, jax.random.key(3), None), clean, rtol=1e-5)
  # gradient = clean gradient + 0.5 * z, z ~ N(0, I) from the loss key
  grads = jax.jit(jax.vmap(lambda k: jax.grad(task.loss)(p, k, None)))(
      jax.random.split(jax.random.key(4), 2000))
  clean_grad = -2 * scale[0] ** 2 * (center[0] - p)
  np.testing.assert_allclose(np.mean(grads, 0), clean_grad, atol=0.05)
  np.testing.assert_allclose(np.std(grads, 0), 0.5, rtol=0.08)  # 2000 draws: se 1.6%
  with pytest.raises(ValueError, match="cov"):
    quadratics.NoisyQuadraticFamily(4, cov=-1.0)


def test_registry_names_for_quadratics():
  assert isinstance(registry.get_task_family("NoisyQuadraticFamily_3"),
                    quadratics.NoisyQuadraticFamily)
  assert registry.get_task_family("NoisyQuadraticFamily_3", cov=0.2).cov == 0.2
  assert isinstance(registry.get_task_family("noisy_quadratic"),
                    quadratics.RotatedNoisyQuadraticFamily)
  assert registry.get_task_family("RotatedNoisyQuadraticFamily_6").dim == 6
  assert registry.get_task_family("FixedDimQuadraticFamilyData_2").dim == 2
  assert "RotatedNoisyQuadraticFamily_<dim>" in registry.task_family_names()


def test_lazy_iterators_build_on_first_use():
  built = []

  def make():
    built.append(1)
    return iter(range(3))

  it = datasets_base.LazyIterator(make)
  assert built == []
  assert [next(it), next(it)] == [0, 1] and built == [1]
  made = []

  def make_ds():
    made.append(1)
    return datasets_base.Datasets(iter([1]), iter([2]), iter([3]), iter([4]),
                                  extra_info={"k": 1})

  lazy = datasets_base.LazyDataset(make_ds)
  assert made == []
  assert next(lazy.outer_valid) == 3 and lazy.extra_info == {"k": 1} and made == [1]
  mapped = datasets_base.datasets_map(lambda x: 10 * x, datasets_base.Datasets(
      iter([1]), iter([2]), iter([3]), iter([4])))
  assert [next(mapped.split(s)) for s in datasets_base.SPLITS] == [10, 20, 30, 40]


def test_thread_safe_iterator_hands_out_each_item_once():
  it = datasets_base.ThreadSafeIterator(iter(range(4000)))
  got = []

  def pull():
    for _ in range(1000):
      got.append(next(it))

  threads = [threading.Thread(target=pull) for _ in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert sorted(got) == list(range(4000))


def test_host_datasets_from_an_image_dataset_shuffle_per_epoch():
  img = D.digits8_datasets(batch_size=60)
  ds = datasets_base.host_datasets(img, seed=0)
  assert ds.abstract_batch == img.abstract_batch and ds.extra_info == {"num_classes": 10}
  n = img.split_size("test")  # 179: two full batches per epoch, remainder dropped
  epoch = [next(ds.test) for _ in range(n // 60)]
  images = np.concatenate([b["image"] for b in epoch]).reshape(-1, 64)
  assert epoch[0]["image"].dtype == np.float32 and epoch[0]["label"].dtype == np.int32
  assert len(np.unique(images, axis=0)) == len(images) or len(images) == 120
  all_test = np.asarray(img.images["test"]).reshape(-1, 64) / 16.0
  rows = {tuple(r) for r in np.round(all_test, 5)}
  assert all(tuple(r) in rows for r in np.round(images, 5))  # every image from the split
  with pytest.raises(ValueError, match="fewer than one batch"):
    next(datasets_base.host_datasets(D.digits8_datasets(batch_size=500)).test)


def test_augmentation_keeps_the_host_datasets():
  fam = augmentation.ReparamWeightsFamily(quadratics.FixedDimQuadraticFamilyData(3))
  assert fam.datasets is quadratics.noise_datasets()
  task = fam.task_fn(fam.sample(jax.random.key(0)))
  assert task.datasets is quadratics.noise_datasets()
  base.check_task_family(fam, jax.random.key(0))


@pytest.mark.parametrize("make", [quadratics.QuadraticTask, quadratics.BatchQuadraticTask])
def test_smoketest_task_passes_on_reference_style_tasks(make):
  from spmd_lopt.tasks import test_utils
  test_utils.smoketest_task(make())
  test_utils.smoketest_task(make(), abstract_data=False)


@pytest.mark.parametrize("make", [
    lambda: quadratics.FixedDimQuadraticFamily(10),
    lambda: quadratics.FixedDimQuadraticFamilyData(10),
    lambda: quadratics.NoisyQuadraticFamily(10, 0.1),
    lambda: augmentation.ReparamWeightsFamily(quadratics.FixedDimQuadraticFamilyData(3))])
def test_smoketest_task_family_passes(make):
  from spmd_lopt.tasks import test_utils
  test_utils.smoketest_task_family(make())


def test_smoketest_catches_a_broken_task():
  from spmd_lopt.tasks import test_utils

  class Broken(quadratics.QuadraticTask):
    def loss(self, params, key, data):
      return params  # not a scalar: grad must fail

  with pytest.raises(TypeError):
    test_utils.smoketest_task(Broken())
