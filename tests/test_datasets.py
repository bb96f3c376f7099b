"""Data loading, pre-processing, splits and on-device sampling."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fake_data
from spmd_lopt import datasets as D


def test_digits_embedded_shapes_splits_and_range():
  ds = D.digits8_datasets(batch_size=32)
  sizes = {s: ds.split_size(s) for s in D.SPLITS}
  assert sizes == {"train": 1260, "inner_valid": 179, "outer_valid": 179, "test": 179}
  assert ds.image_shape == (8, 8, 1) and ds.num_classes == 10
  assert set(np.unique(np.asarray(ds.labels["train"]))) == set(range(10))
  b = ds.sample_batch(jax.random.key(0), "test")
  assert b["image"].shape == (32, 8, 8, 1) and b["image"].dtype == jnp.float32
  assert b["label"].shape == (32,) and b["label"].dtype == jnp.int32
  # digits pixels are counts 0..16 scaled to [0, 1]; a batch of 32 reaches both ends
  assert float(b["image"].min()) == 0.0 and float(b["image"].max()) == 1.0


def test_digits_splits_are_disjoint_positions():
  x, y, _, _ = D.load_raw("digits8")
  ds = D.digits8_datasets()
  # the split is by position i % 10 in the file: test = rows 9, 19, ...
  np.testing.assert_array_equal(np.asarray(ds.labels["test"]), y[9::10])
  np.testing.assert_array_equal(np.asarray(ds.images["outer_valid"])[..., 0], x[8::10, ..., 0])


@pytest.mark.parametrize("name,sub", [("mnist", "mnist"), ("fashion_mnist", "fashion_mnist")])
def test_idx_loader_parses_and_splits(tmp_path, name, sub):
  xtr, ytr, xte, yte = fake_data.write_mnist_like(str(tmp_path), sub, n_train=50, n_test=20)
  raw = D.load_raw(name, str(tmp_path))
  np.testing.assert_array_equal(raw[0][..., 0], xtr)
  np.testing.assert_array_equal(raw[1], ytr)
  np.testing.assert_array_equal(raw[3], yte)
  ds = D.image_dataset(name, batch_size=16, image_size=(8, 8), data_dir=str(tmp_path))
  assert {s: ds.split_size(s) for s in D.SPLITS} == {
      "train": 40, "inner_valid": 5, "outer_valid": 5, "test": 20}
  np.testing.assert_array_equal(np.asarray(ds.labels["train"]), ytr[:40])
  np.testing.assert_array_equal(np.asarray(ds.labels["outer_valid"]), ytr[45:])
  want = D.resize_bilinear(xtr[40:45, :, :, None], (8, 8)) / 255.0
  np.testing.assert_allclose(np.asarray(ds.images["inner_valid"]), want, atol=1e-6)
  assert ds.image_shape == (8, 8, 1)
  native = D.image_dataset(name, batch_size=16, image_size=None, data_dir=str(tmp_path))
  b = native.sample_batch(jax.random.key(1), "test")
  assert b["image"].shape == (16, 28, 28, 1) and float(b["image"].max()) <= 1.0


def test_cifar10_loader_channel_layout(tmp_path):
  batches = fake_data.write_cifar10(str(tmp_path), n_per_batch=10, n_test=8)
  xtr, ytr, xte, yte = D.load_raw("cifar10", str(tmp_path))
  assert xtr.shape == (50, 32, 32, 3) and xte.shape == (8, 32, 32, 3)
  np.testing.assert_array_equal(xtr[10:20], batches[1][0])  # NHWC restored exactly
  np.testing.assert_array_equal(ytr[40:], batches[4][1])
  np.testing.assert_array_equal(yte, batches[5][1])
  ds = D.cifar10_datasets(batch_size=4, image_size=(8, 8), data_dir=str(tmp_path))
  assert ds.image_shape == (8, 8, 3)
  assert {s: ds.split_size(s) for s in D.SPLITS} == {
      "train": 40, "inner_valid": 5, "outer_valid": 5, "test": 8}


def test_missing_dataset_names_files_dir_and_url(tmp_path):
  with pytest.raises(D.DatasetNotFoundError) as e:
    D.fashion_mnist_datasets(data_dir=str(tmp_path))
  assert isinstance(e.value, FileNotFoundError)
  msg = str(e.value)
  assert os.path.join(str(tmp_path), "fashion_mnist") in msg
  for f in D.MNIST_FILES:
    assert f in msg
  assert "fashion-mnist" in msg and "http" in msg
  with pytest.raises(D.DatasetNotFoundError, match="cifar-10-python.tar.gz"):
    D.cifar10_datasets(data_dir=str(tmp_path))


def test_missing_one_file_lists_it(tmp_path):
  fake_data.write_mnist_like(str(tmp_path), "mnist", n_train=20, n_test=10)
  os.remove(os.path.join(str(tmp_path), "mnist", "t10k-labels-idx1-ubyte.gz"))
  with pytest.raises(D.DatasetNotFoundError, match=r"missing: \['t10k-labels-idx1-ubyte.gz'\]"):
    D.mnist_datasets(data_dir=str(tmp_path))


def test_default_data_dir_from_env(tmp_path, monkeypatch):
  monkeypatch.setenv("SPMD_LOPT_DATA", str(tmp_path))
  assert D.default_data_dir() == str(tmp_path)
  with pytest.raises(D.DatasetNotFoundError, match=str(tmp_path)):
    D.mnist_datasets()


def test_bad_idx_magic_is_a_clear_error(tmp_path):
  p = tmp_path / "bad.gz"
  import gzip
  with gzip.open(p, "wb") as f:
    f.write(b"\x01\x02\x08\x01" + b"\x00" * 8)
  with pytest.raises(ValueError, match="not an IDX file"):
    D.read_idx(str(p))


def test_resize_matches_jax_bilinear_without_antialias():
  x = np.random.default_rng(0).random((2, 28, 28, 3)).astype(np.float32)
  for size in [(8, 8), (16, 12), (40, 30)]:
    want = jax.image.resize(x, (2,) + size + (3,), "bilinear", antialias=False)
    np.testing.assert_allclose(D.resize_bilinear(x, size), np.asarray(want), atol=1e-5)


def test_sample_batch_deterministic_and_vmappable():
  ds = D.digits8_datasets(batch_size=64)
  k0, k1 = jax.random.key(0), jax.random.key(1)
  a, b = ds.sample_batch(k0), ds.sample_batch(k0)
  np.testing.assert_array_equal(a["image"], b["image"])
  assert not np.array_equal(a["label"], ds.sample_batch(k1)["label"])
  keys = jax.random.split(jax.random.key(2), 16)
  many = jax.jit(jax.vmap(ds.sample_batch))(keys)
  assert many["image"].shape == (16, 64, 8, 8, 1) and many["label"].shape == (16, 64)
  np.testing.assert_array_equal(many["label"][5], ds.sample_batch(keys[5])["label"])
  with pytest.raises(ValueError, match="unknown split"):
    ds.sample_batch(k0, "validation")


def test_dataset_as_jit_argument_stays_out_of_the_program():
  ds = D.digits8_datasets(batch_size=8)
  key = jax.random.key(3)
  closed = jax.jit(lambda k: ds.sample_batch(k)).lower(key).as_text()
  as_arg = jax.jit(lambda d, k: d.sample_batch(k)).lower(ds, key).as_text()
  # closed over, the 1,260 x 64 uint8 train images are embedded in the program text (hex,
  # >= 1 char a byte); as an argument they are not
  assert len(closed) > len(as_arg) + 1260 * 64
  np.testing.assert_array_equal(jax.jit(lambda d, k: d.sample_batch(k))(ds, key)["label"],
                                ds.sample_batch(key)["label"])


def test_svhn_loader_layout_labels_and_grayscale(tmp_path):
  pytest.importorskip("scipy")
  (xtr, ytr), (xte, yte) = fake_data.write_svhn(str(tmp_path), n_train=50, n_test=20)
  D.clear_cache()
  raw = D.load_raw("svhn_cropped", str(tmp_path))
  np.testing.assert_array_equal(raw[0], xtr)  # NHWC, images in file order
  np.testing.assert_array_equal(raw[1], ytr)  # stored 10 -> digit 0
  np.testing.assert_array_equal(raw[3], yte)
  ds = D.svhn_cropped_datasets(8, None, str(tmp_path), grayscale=True)
  assert ds.image_shape == (32, 32, 1) and ds.split_size("train") == 40  # 80% of 50
  want = (xtr[:40].astype(np.float64) @ np.array(D.GRAY_WEIGHTS)) / 255.0
  np.testing.assert_allclose(np.asarray(ds.images["train"])[..., 0], want, rtol=1e-5,
                             atol=1e-6)


def test_missing_svhn_names_files_dir_and_url(tmp_path):
  with pytest.raises(D.DatasetNotFoundError) as e:
    D.svhn_cropped_datasets(data_dir=str(tmp_path))
  msg = str(e.value)
  for part in ("train_32x32.mat", "test_32x32.mat", os.path.join(str(tmp_path),
               "svhn_cropped"), "http://ufldl.stanford.edu/housenumbers/"):
    assert part in msg


def test_corrupt_svhn_file_is_a_clear_error(tmp_path):
  pytest.importorskip("scipy")
  d = tmp_path / "svhn_cropped"
  d.mkdir()
  for f in D.SVHN_FILES:
    (d / f).write_bytes(b"not a matlab file")
  D.clear_cache()
  with pytest.raises(ValueError, match="train_32x32.mat"):
    D.load_raw("svhn_cropped", str(tmp_path))


def test_digits8_variants_are_the_stated_transforms():
  plain = D.digits8_variant_datasets("plain")
  inv = D.digits8_variant_datasets("inverted")
  pix = D.digits8_variant_datasets("pixel_permuted")
  lab = D.digits8_variant_datasets("label_permuted")
  x = np.asarray(plain.images["train"]).astype(np.int64)
  y = np.asarray(plain.labels["train"])
  np.testing.assert_array_equal(np.asarray(inv.images["train"]), 16 - x)
  xf, xp = x.reshape(len(x), 64), np.asarray(pix.images["train"]).reshape(len(x), 64)
  # same pixels per image, moved: every new pixel column is an old one (for all images)
  np.testing.assert_array_equal(np.sort(xp, 1), np.sort(xf, 1))
  assert all((xf == xp[:, [j]]).all(0).any() for j in range(64))
  assert np.mean(xp != xf) > 0.3
  yl = np.asarray(lab.labels["train"])
  mapping = {int(a): int(b) for a, b in zip(y, yl)}
  assert len(mapping) == 10 and sorted(mapping.values()) == list(range(10))
  assert any(a != b for a, b in mapping.items())
  np.testing.assert_array_equal(yl, [mapping[int(a)] for a in y])  # a function of y
  with pytest.raises(ValueError, match="rotated"):
    D.digits8_variant_datasets("rotated")


def test_synthetic_data_shapes_balance_and_determinism():
  ds = D.synthetic_datasets(64, num_train=2000, num_test=500, seed=1)
  assert ds.image_shape == (8, 8, 1) and ds.num_classes == 10
  assert [ds.split_size(s) for s in D.SPLITS] == [1600, 200, 200, 500]
  counts = np.bincount(np.asarray(ds.labels["train"]), minlength=10)
  assert counts.min() > 0.4 * counts.mean()  # no class dominates
  b = ds.sample_batch(jax.random.key(0))
  assert b["image"].shape == (64, 8, 8, 1) and b["image"].dtype == jnp.float32
  assert 0.0 <= float(b["image"].min()) and float(b["image"].max()) <= 1.0
  again = D.synthetic_datasets(64, num_train=2000, num_test=500, seed=1)
  np.testing.assert_array_equal(np.asarray(again.labels["test"]),
                                np.asarray(ds.labels["test"]))
  other = D.synthetic_datasets(64, num_train=2000, num_test=500, seed=2)
  assert np.mean(np.asarray(other.labels["test"]) != np.asarray(ds.labels["test"])) > 0.5
  with pytest.raises(ValueError, match="image_shape"):
    D.synthetic_datasets(image_shape=(8, 8))
