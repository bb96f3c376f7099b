"""Write small, learnable fake data sets in the real on-disk formats (for tests).

Each image is dark noise plus a bright square whose position encodes the label, so a net
can learn it from a few hundred examples even after resizing to 8x8.
"""

import gzip
import os
import pickle
import struct

import numpy as np


def class_images(labels, size, channels, rng):
  n = len(labels)
  x = rng.integers(0, 40, (n, size, size, channels)).astype(np.uint8)
  block = max(size // 5, 2)
  for i, c in enumerate(labels):
    r = (c // 5) * (size // 2) + size // 8
    col = (c % 5) * (size // 5)
    x[i, r:r + block, col:col + block, :] = 250
  return x


def write_idx(path, array):
  """IDX: magic 00 00 08 ndim, big-endian uint32 dims, uint8 data; gzip'd."""
  array = np.asarray(array, np.uint8)
  header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
  with gzip.open(path, "wb") as f:
    f.write(header + array.tobytes())


def write_mnist_like(data_dir, sub="mnist", n_train=200, n_test=40, seed=0):
  """``<data_dir>/<sub>/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz`` at 28x28."""
  rng = np.random.default_rng(seed)
  d = os.path.join(data_dir, sub)
  os.makedirs(d, exist_ok=True)
  ytr = rng.integers(0, 10, n_train).astype(np.uint8)
  yte = rng.integers(0, 10, n_test).astype(np.uint8)
  xtr = class_images(ytr, 28, 1, rng)[..., 0]
  xte = class_images(yte, 28, 1, rng)[..., 0]
  write_idx(os.path.join(d, "train-images-idx3-ubyte.gz"), xtr)
  write_idx(os.path.join(d, "train-labels-idx1-ubyte.gz"), ytr)
  write_idx(os.path.join(d, "t10k-images-idx3-ubyte.gz"), xte)
  write_idx(os.path.join(d, "t10k-labels-idx1-ubyte.gz"), yte)
  return xtr, ytr, xte, yte


def write_cifar10(data_dir, n_per_batch=40, n_test=40, seed=0):
  """``<data_dir>/cifar-10-batches-py/{data_batch_1..5,test_batch}``: pickled dicts with
  ``b"data"`` uint8[n, 3072] (R plane, G plane, B plane) and ``b"labels"`` (list)."""
  rng = np.random.default_rng(seed)
  d = os.path.join(data_dir, "cifar-10-batches-py")
  os.makedirs(d, exist_ok=True)
  out = []
  for name, n in [(f"data_batch_{i}", n_per_batch) for i in range(1, 6)] + [
      ("test_batch", n_test)]:
    y = rng.integers(0, 10, n)
    x = class_images(y, 32, 3, rng)  # NHWC
    flat = x.transpose(0, 3, 1, 2).reshape(n, 3072)
    with open(os.path.join(d, name), "wb") as f:
      pickle.dump({b"data": flat, b"labels": [int(v) for v in y],
                   b"batch_label": name.encode()}, f)
    out.append((x, y))
  return out


def write_svhn(data_dir, n_train=200, n_test=40, seed=0):
  """``<data_dir>/svhn_cropped/{train,test}_32x32.mat``: ``X`` uint8[32, 32, 3, n] and
  ``y`` uint8[n, 1] with digit 0 stored as 10, as the real files (MATLAB v5)."""
  from scipy import io as sio
  rng = np.random.default_rng(seed)
  d = os.path.join(data_dir, "svhn_cropped")
  os.makedirs(d, exist_ok=True)
  out = []
  for name, n in (("train_32x32.mat", n_train), ("test_32x32.mat", n_test)):
    y = rng.integers(0, 10, n)
    x = class_images(y, 32, 3, rng)  # NHWC
    stored = np.where(y == 0, 10, y).astype(np.uint8)[:, None]
    sio.savemat(os.path.join(d, name), {"X": np.transpose(x, (1, 2, 3, 0)), "y": stored})
    out.append((x, y))
  return out
