"""Where the image data sets' files come from, and how they are read into numpy.

- ``digits8``: the 1,797 8x8 handwritten digits (UCI optdigits test set, as in
  scikit-learn's ``load_digits``), embedded in the package (``spmd_lopt/data/digits8.npz``,
  CC BY 4.0, see ``DIGITS_LICENSE.txt``). Always available; the default for tests.
- ``mnist`` / ``fashion_mnist``: the four standard gzip'd IDX files under
  ``<data_dir>/mnist/`` and ``<data_dir>/fashion_mnist/``.
- ``cifar10``: the python pickles ``data_batch_1..5`` and ``test_batch`` under
  ``<data_dir>/cifar-10-batches-py/`` (what ``cifar-10-python.tar.gz`` unpacks to).
- ``svhn_cropped``: ``train_32x32.mat`` and ``test_32x32.mat`` (SVHN "Format 2", 32x32x3)
  under ``<data_dir>/svhn_cropped/``, read with scipy; digit 0 (stored as 10) becomes 0.
  The whole official train split is used (Celo/Celo2's loader kept only its first 1%,
  a ``min`` where ``max`` was meant; we do not reproduce that).
- If the files are absent and ``tensorflow_datasets`` is importable, the same data set is
  read from TFDS's own cache (never downloaded here). TFDS is optional.

``data_dir`` defaults to ``$SPMD_LOPT_DATA``, else ``~/.cache/spmd_lopt``. A missing data
set raises ``DatasetNotFoundError`` (a ``FileNotFoundError``) naming the expected files,
the directory and the download URL.
"""

from __future__ import annotations

import functools
import gzip
import os
import pickle
import struct
from typing import Optional, Sequence

import numpy as np

MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
               "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
CIFAR10_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)
SVHN_FILES = ("train_32x32.mat", "test_32x32.mat")

_SOURCES = {
    # name: (sub-directory, files, download URL(s), tfds name, num_classes)
    "mnist": ("mnist", MNIST_FILES,
              "https://storage.googleapis.com/cvdf-datasets/mnist/<file> "
              "(mirror of http://yann.lecun.com/exdb/mnist/)", "mnist", 10),
    "fashion_mnist": ("fashion_mnist", MNIST_FILES,
                      "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/<file> "
                      "(see https://github.com/zalandoresearch/fashion-mnist)",
                      "fashion_mnist", 10),
    "cifar10": ("cifar-10-batches-py", CIFAR10_FILES,
                "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz (unpack it in "
                "the data directory: it creates cifar-10-batches-py/)", "cifar10", 10),
    "svhn_cropped": ("svhn_cropped", SVHN_FILES,
                     "http://ufldl.stanford.edu/housenumbers/<file> (the cropped-digits "
                     "'Format 2' files; extra_32x32.mat is not used)", "svhn_cropped", 10),
}

_DIGITS_PATH = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data",
                            "digits8.npz")


class DatasetNotFoundError(FileNotFoundError):
  """A data set's files are not in the data directory (and TFDS could not supply it)."""


def default_data_dir() -> str:
  """``$SPMD_LOPT_DATA`` if set, else ``~/.cache/spmd_lopt``."""
  return os.environ.get("SPMD_LOPT_DATA") or os.path.join(
      os.path.expanduser("~"), ".cache", "spmd_lopt")


def available_datasets() -> tuple[str, ...]:
  """Every data set name ``image_dataset`` knows, and ``"synthetic"``."""
  return ("digits8",) + tuple(_SOURCES) + ("synthetic",)


def read_idx(path: str) -> np.ndarray:
  """Read one IDX file (gzip'd if the name ends in ``.gz``) into a numpy array.

  Format: magic ``00 00 TT NN`` (``TT`` the element type, 0x08 = uint8; ``NN`` the number
  of dimensions), then ``NN`` big-endian uint32 sizes, then the elements, row-major.
  """
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    raw = f.read()
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
    raise ValueError(f"{path}: not an IDX file (bad magic {raw[:4]!r}).")
  dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
  if raw[2] not in dtypes:
    raise ValueError(f"{path}: unknown IDX element type 0x{raw[2]:02x}.")
  ndim = raw[3]
  shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
  dtype = np.dtype(dtypes[raw[2]])
  count = int(np.prod(shape))
  body = raw[4 + 4 * ndim:]
  if len(body) != count * dtype.itemsize:
    raise ValueError(f"{path}: IDX header says shape {shape} ({count * dtype.itemsize} "
                     f"bytes) but the file holds {len(body)} bytes.")
  return np.frombuffer(body, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def _find(directory: str, filename: str) -> Optional[str]:
  """``directory/filename``, or the same name without ``.gz`` if only that exists."""
  for candidate in (filename, filename[:-3] if filename.endswith(".gz") else None):
    if candidate and os.path.isfile(os.path.join(directory, candidate)):
      return os.path.join(directory, candidate)
  return None


def _missing_error(name: str, data_dir: str, missing: Sequence[str],
                   tfds_note: str) -> DatasetNotFoundError:
  sub, files, url, _, _ = _SOURCES[name]
  directory = os.path.join(data_dir, sub)
  return DatasetNotFoundError(
      f"Data set {name!r} not found: expected the files {list(files)} in {directory} "
      f"(missing: {list(missing)}). Download them from {url}, or point the data "
      f"directory elsewhere with data_dir=... or $SPMD_LOPT_DATA. {tfds_note}".strip())


def _load_idx_dataset(name: str, directory: str):
  paths = [_find(directory, f) for f in MNIST_FILES]
  xtr, ytr, xte, yte = (read_idx(p) for p in paths)
  for x, y, p in ((xtr, ytr, paths[0]), (xte, yte, paths[2])):
    if x.ndim != 3 or y.ndim != 1 or x.shape[0] != y.shape[0]:
      raise ValueError(f"{p}: images {x.shape} and labels {y.shape} do not match.")
  return xtr[..., None], ytr, xte[..., None], yte


def _load_cifar10(directory: str):
  """CIFAR-10 python batches: dicts with ``b"data"`` uint8[n, 3072] (1024 R, then G,
  then B, each 32x32 row-major) and ``b"labels"`` (n ints). These are pickles: only
  point ``data_dir`` at files you trust."""

  def read(filename):
    with open(os.path.join(directory, filename), "rb") as f:
      d = pickle.load(f, encoding="bytes")
    x = np.asarray(d[b"data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return x, np.asarray(d[b"labels"], np.int64)

  parts = [read(f) for f in CIFAR10_FILES[:-1]]
  xte, yte = read(CIFAR10_FILES[-1])
  return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
          xte, yte)


def _load_svhn(directory: str):
  """SVHN cropped digits, MATLAB files: ``X`` uint8[32, 32, 3, n] and ``y`` [n, 1] with
  digit 0 stored as label 10 (mapped to 0 here, as TFDS's ``svhn_cropped``). Read with
  ``scipy.io.loadmat`` (scipy is needed only for this data set)."""
  try:
    from scipy import io as sio
  except ImportError:
    raise ImportError("Reading SVHN's .mat files needs scipy (pip install scipy).") from None

  def read(filename):
    path = os.path.join(directory, filename)
    try:
      d = sio.loadmat(path)
    except Exception as e:  # not a MATLAB file, truncated download, ...
      raise ValueError(f"{path}: not a readable SVHN .mat file "
                       f"({type(e).__name__}: {e}).") from None
    if "X" not in d or "y" not in d or d["X"].ndim != 4 or d["X"].shape[:3] != (32, 32, 3):
      raise ValueError(f"{path}: expected 'X' uint8[32, 32, 3, n] and 'y' [n, 1].")
    x = np.ascontiguousarray(np.transpose(d["X"], (3, 0, 1, 2)), np.uint8)
    y = np.asarray(d["y"]).reshape(-1).astype(np.int64) % 10
    if x.shape[0] != y.shape[0]:
      raise ValueError(f"{path}: {x.shape[0]} images but {y.shape[0]} labels.")
    return x, y

  xtr, ytr = read(SVHN_FILES[0])
  xte, yte = read(SVHN_FILES[1])
  return xtr, ytr, xte, yte


def _load_tfds(tfds_name: str):
  import tensorflow_datasets as tfds  # optional; only imported when files are missing
  out = []
  for split in ("train", "test"):
    d = tfds.as_numpy(tfds.load(tfds_name, split=split, batch_size=-1, download=False))
    out += [np.asarray(d["image"], np.uint8), np.asarray(d["label"], np.int64)]
  return tuple(out)


def load_raw(name: str, data_dir: Optional[str] = None):
  """Official ``(train_images, train_labels, test_images, test_labels)`` as numpy.

  Images are uint8 NHWC at native size; labels int64. For ``digits8`` the test pair is
  empty (``transforms.split_arrays`` splits it by position).
  """
  if name == "synthetic":
    raise ValueError("'synthetic' has no files; use synthetic_datasets().")
  if name == "digits8":
    with np.load(_DIGITS_PATH) as z:
      x, y = z["images"][..., None], z["labels"].astype(np.int64)
    return x, y, x[:0], y[:0]
  if name not in _SOURCES:
    raise ValueError(f"Unknown data set {name!r}; known: {available_datasets()}.")
  data_dir = os.path.expanduser(data_dir or default_data_dir())
  sub, files, _, tfds_name, _ = _SOURCES[name]
  directory = os.path.join(data_dir, sub)
  missing = [f for f in files if _find(directory, f) is None]
  if not missing:
    readers = {"cifar10": _load_cifar10, "svhn_cropped": _load_svhn}
    return readers.get(name, functools.partial(_load_idx_dataset, name))(directory)
  try:
    import tensorflow_datasets  # noqa: F401
  except ImportError:
    raise _missing_error(name, data_dir, missing,
                         "(tensorflow_datasets is not installed, so TFDS was not tried.)"
                         ) from None
  try:
    return _load_tfds(tfds_name)
  except Exception as e:  # any TFDS failure means "not available"; say why
    raise _missing_error(name, data_dir, missing,
                         f"(TFDS was tried for {tfds_name!r} without downloading and "
                         f"failed: {type(e).__name__}: {e})") from None
