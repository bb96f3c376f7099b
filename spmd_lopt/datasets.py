"""Image-classification data sets that live on device and are sampled on device.

Sources
-------
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
- ``digits8_variant_datasets(variant)``: four distinct tasks derived from the embedded
  digits (plain, inverted, pixel-permuted, label-permuted), for the offline task set.
- ``synthetic_datasets()``: random images labelled by a fixed random teacher net, with a
  real set's shapes (for benchmarks; no files).
- If the files are absent and ``tensorflow_datasets`` is importable, the same data set is
  read from TFDS's own cache (never downloaded here). TFDS is optional.

``data_dir`` defaults to ``$SPMD_LOPT_DATA``, else ``~/.cache/spmd_lopt``. A missing data
set raises ``DatasetNotFoundError`` (a ``FileNotFoundError``) naming the expected files,
the directory and the download URL.

Pre-processing (as the reference, ``learned_optimization.tasks.datasets.image``)
------------------------------------------------------------------------------
Pixels ``x`` in ``[0, 255]`` (``[0, 16]`` for digits) become ``x / 255`` (``x / 16``) in
``[0, 1]``. With ``image_size=(h, w)`` different from the native size, images are resized
with bilinear interpolation, half-pixel centres and no anti-aliasing (what TF2's
``tf.image.resize(..., "bilinear")`` does; ``resize_bilinear`` below). ``grayscale=True``
turns RGB into one channel ``0.2989 R + 0.5870 G + 0.1140 B`` (``tf.image.rgb_to_grayscale``'s
weights) after resizing. Images are NHWC
float32 ``[B, h, w, C]``; labels int32 ``[B]``.

Splits: with ``N`` the size of the official training set, ``train = train[0 : 8N/10]``,
``inner_valid = train[8N/10 : 9N/10]``, ``outer_valid = train[9N/10 : N]`` and ``test`` the
official test set. ``digits8`` has no official test set; its split is by position ``i`` in
the file (version-proof, and interleaved so every split spans every writer):
``i % 10 == 9 -> test`` (179), ``== 8 -> outer_valid`` (179), ``== 7 -> inner_valid``
(179), else ``train`` (1,260).

Sampling on device
------------------
An ``ImageDataset`` is a pytree whose leaves are the pre-processed arrays of every split,
already on device. ``sample_batch(key, split)`` draws ``batch_size`` indices
``i_b ~ Uniform{0..N_split-1}`` i.i.d. (with replacement) and gathers them: pure, jittable
and vmappable over keys, with no host iterator. The reference instead shuffles per epoch
(without replacement); for a 128 batch out of tens of thousands the two are
indistinguishable in practice, and only with-replacement sampling is stateless.
Images whose values are exact integers (no resize) are stored as uint8 and scaled after
the gather (4x less device memory); resized images are stored as float32.

Closed over or passed as an argument
------------------------------------
A task built by ``task_fn`` inside a jitted meta step holds its ``ImageDataset`` as a
Python attribute, so by default the arrays are *closed over* and JAX embeds them as
constants in the program. Measured on this project's CPU machine (jax 0.10.2), a 20-step
``lax.scan`` of an MLP on 60,000 x 8x8x1 float32 (MNIST at 8x8, 15 MB), compile only:

  ================================  ==========  ==========  ================
  data                              argument    closed      StableHLO text
  ================================  ==========  ==========  ================
  60k x 8x8x1 f32 (15 MB)           0.40 s      0.72 s      40 KB vs 31 MB
  same, vmapped over 16 tasks       0.55 s      0.73 s      46 KB vs 31 MB
  60k x 16x16x1 f32 (61 MB)         0.34 s      1.40 s      40 KB vs 123 MB
  1,797 x 8x8x1 f32 (digits)        0.38 s      0.41 s      40 KB vs 1 MB
  ================================  ==========  ==========  ================

Step time is the same either way. The cost of closing over grows with the data (and is
paid again by every program that touches it: each unroll length, the eval program, ...),
so for the 8x8 sets used in meta-training it is a few tenths of a second and we keep the
simple default: the task closes over its data, exactly as the trainers already call
``task.sample_batch``. For big sets (28x28 MNIST, CIFAR-10 at 32x32: 150-600 MB) pass
the data as an argument instead: every image task and family exposes ``datasets`` (a
pytree) and ``with_datasets(ds)``, so ``jax.jit(lambda ds, k:
task.with_datasets(ds).sample_batch(k))(task.datasets, key)`` keeps the arrays out of the
program. (JAX's experimental ``jax_use_simplified_jaxpr_constants=True`` also hoists
closed-over arrays to arguments; measured: 0.37 s, 40 KB. It is global, so it is left to
the user.)
"""

from __future__ import annotations

import functools
import gzip
import os
import pickle
import struct
from typing import Optional, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

SPLITS = ("train", "inner_valid", "outer_valid", "test")

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

_DIGITS_PATH = os.path.join(os.path.dirname(__file__), "data", "digits8.npz")


class DatasetNotFoundError(FileNotFoundError):
  """A data set's files are not in the data directory (and TFDS could not supply it)."""


def default_data_dir() -> str:
  """``$SPMD_LOPT_DATA`` if set, else ``~/.cache/spmd_lopt``."""
  return os.environ.get("SPMD_LOPT_DATA") or os.path.join(
      os.path.expanduser("~"), ".cache", "spmd_lopt")


def available_datasets() -> tuple[str, ...]:
  return ("digits8",) + tuple(_SOURCES) + ("synthetic",)


# ----------------------------------------------------------------------------- readers


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
  empty (the split is made in ``_split``).
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


# ------------------------------------------------------------------------ pre-processing


def _bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
  """``M[o, i]``: weight of input pixel ``i`` in output pixel ``o``.

  Output pixel ``o`` samples the input at ``s = (o + 1/2) * n_in / n_out - 1/2``
  (half-pixel centres), linearly between ``floor(s)`` and ``floor(s) + 1``, clamped at the
  edges. No anti-aliasing: when shrinking, pixels between samples are skipped.
  """
  s = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
  s = np.clip(s, 0.0, n_in - 1)
  lo = np.floor(s).astype(np.int64)
  hi = np.minimum(lo + 1, n_in - 1)
  frac = s - lo
  m = np.zeros((n_out, n_in), np.float64)
  np.add.at(m, (np.arange(n_out), lo), 1.0 - frac)
  np.add.at(m, (np.arange(n_out), hi), frac)
  return m


def resize_bilinear(images: np.ndarray, size: Sequence[int]) -> np.ndarray:
  """Resize NHWC ``images`` to ``size = (h, w)``; float32 out.

  ``out[n, o, p, c] = sum_{i, j} Mh[o, i] Mw[p, j] images[n, i, j, c]`` with ``M`` from
  ``_bilinear_matrix``: TF2 ``tf.image.resize`` bilinear, antialias off.
  """
  h, w = int(size[0]), int(size[1])
  mh = _bilinear_matrix(images.shape[1], h).astype(np.float32)
  mw = _bilinear_matrix(images.shape[2], w).astype(np.float32)
  x = images.astype(np.float32)
  return np.einsum("oi,nijc,pj->nopc", mh, x, mw, optimize=True).astype(np.float32)


def _split(name: str, xtr, ytr, xte, yte) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  if name == "digits8":
    r = np.arange(xtr.shape[0]) % 10
    sel = {"train": r < 7, "inner_valid": r == 7, "outer_valid": r == 8, "test": r == 9}
    return {k: (xtr[m], ytr[m]) for k, m in sel.items()}
  n = xtr.shape[0]
  a, b = n * 8 // 10, n * 9 // 10
  return {"train": (xtr[:a], ytr[:a]), "inner_valid": (xtr[a:b], ytr[a:b]),
          "outer_valid": (xtr[b:], ytr[b:]), "test": (xte, yte)}


GRAY_WEIGHTS = (0.2989, 0.5870, 0.1140)  # ITU-R 601 luma, as tf.image.rgb_to_grayscale


def to_grayscale(images: np.ndarray) -> np.ndarray:
  """NHWC RGB -> NHW1: ``0.2989 R + 0.5870 G + 0.1140 B`` (float32)."""
  if images.shape[-1] != 3:
    raise ValueError(f"to_grayscale needs 3 channels, got shape {images.shape}.")
  w = np.asarray(GRAY_WEIGHTS, np.float32)
  return np.einsum("nhwc,c->nhw", images.astype(np.float32), w)[..., None]


@functools.lru_cache(maxsize=16)
def _prepared(name: str, data_dir: Optional[str], image_size: Optional[tuple[int, int]],
              grayscale: bool = False):
  """Host arrays per split, pre-processed, cached: ``(arrays, scale, num_classes)``."""
  xtr, ytr, xte, yte = load_raw(name, data_dir)
  max_value = 16.0 if name == "digits8" else 255.0
  native = tuple(xtr.shape[1:3])
  splits = _split(name, xtr, ytr, xte, yte)
  out = {}
  if (image_size is None or tuple(image_size) == native) and not grayscale:
    # integer pixels: keep uint8 on device, scale after the gather
    scale = 1.0 / max_value
    for k, (x, y) in splits.items():
      out[k] = (np.ascontiguousarray(x, np.uint8), y.astype(np.int32))
  else:
    scale = 1.0
    for k, (x, y) in splits.items():
      if image_size is not None and tuple(image_size) != native:
        x = resize_bilinear(x, image_size)
      if grayscale and x.shape[-1] == 3:  # resize and luma are linear: order is free
        x = to_grayscale(x)
      out[k] = (x.astype(np.float32) / np.float32(max_value), y.astype(np.int32))
  num_classes = 10
  return out, scale, num_classes


def clear_cache() -> None:
  """Drop cached host and device arrays (e.g. after replacing files in ``data_dir``)."""
  _prepared.cache_clear()
  _on_device.cache_clear()
  _synthetic_host.cache_clear()


@functools.lru_cache(maxsize=16)
def _on_device(name, data_dir, image_size, grayscale=False):
  arrays, scale, num_classes = _prepared(name, data_dir, image_size, grayscale)
  images = {k: jnp.asarray(x) for k, (x, _) in arrays.items()}
  labels = {k: jnp.asarray(y) for k, (_, y) in arrays.items()}
  return images, labels, scale, num_classes


# ----------------------------------------------------------------------- the data set


@flax.struct.dataclass
class ImageDataset:
  """Every split of one image data set, on device, and the batch size to draw.

  images[split]: uint8 or float32 ``[N_split, H, W, C]``; the batch image is
  ``images[idx] * image_scale`` in float32. labels[split]: int32 ``[N_split]``.
  A pytree: pass it through ``jit``/``vmap``/``shard_map`` like any array tree.
  """
  images: dict[str, jax.Array]
  labels: dict[str, jax.Array]
  name: str = flax.struct.field(pytree_node=False)
  batch_size: int = flax.struct.field(pytree_node=False)
  num_classes: int = flax.struct.field(pytree_node=False)
  image_scale: float = flax.struct.field(pytree_node=False)

  @property
  def image_shape(self) -> tuple[int, ...]:
    return tuple(self.images["train"].shape[1:])

  @property
  def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
    return {"image": jax.ShapeDtypeStruct((self.batch_size,) + self.image_shape,
                                          jnp.float32),
            "label": jax.ShapeDtypeStruct((self.batch_size,), jnp.int32)}

  def split_size(self, split: str) -> int:
    return int(self.labels[self._check(split)].shape[0])

  def _check(self, split: str) -> str:
    if split not in self.images:
      raise ValueError(f"{self.name}: unknown split {split!r}; known: {tuple(self.images)}.")
    return split

  def sample_batch(self, key: jax.Array, split: str = "train") -> dict[str, jax.Array]:
    """``{"image": f32[B, H, W, C], "label": i32[B]}``, indices i.i.d. uniform."""
    x, y = self.images[self._check(split)], self.labels[split]
    idx = jax.random.randint(key, (self.batch_size,), 0, y.shape[0])
    image = jnp.take(x, idx, axis=0).astype(jnp.float32)
    if self.image_scale != 1.0:
      image = image * jnp.float32(self.image_scale)
    return {"image": image, "label": jnp.take(y, idx, axis=0)}


def image_dataset(name: str, batch_size: int = 128,
                  image_size: Optional[Sequence[int]] = None,
                  data_dir: Optional[str] = None, grayscale: bool = False) -> ImageDataset:
  """Load (cached), pre-process and place ``name`` on device; see the module docstring.

  name: ``"digits8"``, ``"mnist"``, ``"fashion_mnist"``, ``"cifar10"`` or
  ``"svhn_cropped"``.
  image_size: ``(h, w)`` to resize to, or ``None`` for the native size.
  grayscale: convert RGB to one luma channel (``to_grayscale``) after resizing.
  """
  if name not in available_datasets() or name == "synthetic":
    raise ValueError(f"Unknown data set {name!r}; known: {available_datasets()[:-1]} "
                     "(and synthetic_datasets() for 'synthetic').")
  if name != "digits8":
    data_dir = os.path.abspath(os.path.expanduser(data_dir or default_data_dir()))
  else:
    data_dir = None
  size = None if image_size is None else (int(image_size[0]), int(image_size[1]))
  images, labels, scale, num_classes = _on_device(name, data_dir, size, bool(grayscale))
  tag = name if size is None else f"{name}_{size[0]}x{size[1]}"
  tag = tag + "_gray" if grayscale else tag
  return ImageDataset(images=dict(images), labels=dict(labels), name=tag,
                      batch_size=int(batch_size), num_classes=num_classes,
                      image_scale=scale)


def digits8_datasets(batch_size: int = 128,
                     image_size: Optional[Sequence[int]] = None) -> ImageDataset:
  """The embedded 8x8 digits (always available)."""
  return image_dataset("digits8", batch_size, image_size)


def mnist_datasets(batch_size: int = 128, image_size: Optional[Sequence[int]] = (8, 8),
                   data_dir: Optional[str] = None) -> ImageDataset:
  return image_dataset("mnist", batch_size, image_size, data_dir)


def fashion_mnist_datasets(batch_size: int = 128,
                           image_size: Optional[Sequence[int]] = (8, 8),
                           data_dir: Optional[str] = None) -> ImageDataset:
  return image_dataset("fashion_mnist", batch_size, image_size, data_dir)


def cifar10_datasets(batch_size: int = 128, image_size: Optional[Sequence[int]] = None,
                     data_dir: Optional[str] = None, grayscale: bool = False) -> ImageDataset:
  return image_dataset("cifar10", batch_size, image_size, data_dir, grayscale)


def svhn_cropped_datasets(batch_size: int = 128,
                          image_size: Optional[Sequence[int]] = None,
                          data_dir: Optional[str] = None,
                          grayscale: bool = False) -> ImageDataset:
  """SVHN cropped digits (73,257 train / 26,032 test 32x32x3) from ``train_32x32.mat`` and
  ``test_32x32.mat``; the whole official train split is used (see the module docstring
  for the splits)."""
  return image_dataset("svhn_cropped", batch_size, image_size, data_dir, grayscale)


# ------------------------------------------------------ offline variants of the digits

DIGITS8_VARIANTS = ("plain", "inverted", "pixel_permuted", "label_permuted")
_VARIANT_SEED = 20260211  # fixed: the permutations are part of the task definition


@functools.lru_cache(maxsize=8)
def _digits8_variant_arrays(variant: str):
  images, labels, scale, num_classes = _on_device("digits8", None, None, False)
  rng = np.random.default_rng(_VARIANT_SEED)
  pixel_perm = rng.permutation(64)
  label_perm = rng.permutation(10)
  if variant == "plain":
    return images, labels
  if variant == "inverted":
    return {k: jnp.uint8(16) - x for k, x in images.items()}, labels
  if variant == "pixel_permuted":
    return {k: x.reshape(-1, 64, 1)[:, pixel_perm].reshape(x.shape)
            for k, x in images.items()}, labels
  return images, {k: jnp.asarray(label_perm, jnp.int32)[y] for k, y in labels.items()}


def digits8_variant_datasets(variant: str, batch_size: int = 128) -> ImageDataset:
  """The embedded digits transformed into a distinct task (all 8x8x1, 10 classes).

  ``"plain"``: as is. ``"inverted"``: ``x -> 16 - x`` (bright background; every pixel's
  mean and the sign of its correlation with the label flip). ``"pixel_permuted"``: one
  fixed random permutation of the 64 pixels (same statistics per image, no spatial
  locality). ``"label_permuted"``: one fixed random permutation of the 10 labels (same
  inputs, another input-output map). The permutations come from a fixed seed, so the
  tasks are the same in every process and every run.
  """
  if variant not in DIGITS8_VARIANTS:
    raise ValueError(f"Unknown digits8 variant {variant!r}; known: {DIGITS8_VARIANTS}.")
  images, labels = _digits8_variant_arrays(variant)
  _, _, scale, num_classes = _on_device("digits8", None, None, False)
  tag = "digits8" if variant == "plain" else f"digits8_{variant}"
  return ImageDataset(images=dict(images), labels=dict(labels), name=tag,
                      batch_size=int(batch_size), num_classes=num_classes,
                      image_scale=scale)


# ----------------------------------------------------------------- synthetic data


@functools.lru_cache(maxsize=8)
def _synthetic_host(image_shape: tuple[int, ...], num_classes: int, num_train: int,
                    num_test: int, seed: int):
  """uint8 images ``U{0..255}`` and teacher labels, split like a real set."""
  rng = np.random.default_rng(seed)
  n = num_train + num_test
  x = rng.integers(0, 256, (n,) + image_shape, dtype=np.uint8)
  # teacher: a fixed random 2-layer ReLU net on the centred image; label = argmax
  d = int(np.prod(image_shape))
  w1 = rng.normal(0.0, 1.0 / np.sqrt(d), (d, 64)).astype(np.float32)
  w2 = rng.normal(0.0, 1.0 / 8.0, (64, num_classes)).astype(np.float32)
  z = x.reshape(n, d).astype(np.float32) / 255.0 - 0.5
  logits = np.maximum(z @ w1, 0.0) @ w2
  # standardise each class's logit over the data so no class dominates the argmax
  logits = (logits - logits.mean(0)) / (logits.std(0) + 1e-6)
  y = np.argmax(logits, axis=-1).astype(np.int64)
  return _split("synthetic", x[:num_train], y[:num_train], x[num_train:], y[num_train:])


def synthetic_datasets(batch_size: int = 128, image_shape: Sequence[int] = (8, 8, 1),
                       num_classes: int = 10, num_train: int = 60_000,
                       num_test: int = 10_000, seed: int = 0) -> ImageDataset:
  """Random images with labels from a fixed random teacher, with a real set's shapes.

  ``x ~ U{0..255}^{H x W x C} / 255``; ``z = relu((x - 1/2) W1) W2`` with
  ``W1 ~ N(0, 1/HWC)^{HWC x 64}``, ``W2 ~ N(0, 1/64)^{64 x K}`` drawn once from ``seed``;
  ``label = argmax_k (z_k - mean(z_k)) / std(z_k)`` (moments over the whole set, so the
  classes are roughly balanced).
  The defaults mirror (Fashion-)MNIST at 8x8: 60,000 train images split 80/10/10 into
  train/inner_valid/outer_valid and 10,000 test, stored uint8 on device (4.5 MB). For
  benchmarks: same per-iteration shapes and costs as the real sets, no files needed;
  the task is learnable (the teacher's labels are a deterministic function of x).
  """
  shape = tuple(int(v) for v in image_shape)
  if len(shape) != 3 or min(shape) < 1 or num_classes < 2 or num_train < 10 or num_test < 1:
    raise ValueError("synthetic_datasets: need image_shape (H, W, C) of positive ints, "
                     f"num_classes >= 2, num_train >= 10, num_test >= 1; got {image_shape}, "
                     f"{num_classes}, {num_train}, {num_test}.")
  splits = _synthetic_host(shape, int(num_classes), int(num_train), int(num_test),
                           int(seed))
  return ImageDataset(images={k: jnp.asarray(x) for k, (x, _) in splits.items()},
                      labels={k: jnp.asarray(y, jnp.int32) for k, (_, y) in splits.items()},
                      name=f"synthetic_{shape[0]}x{shape[1]}x{shape[2]}_s{seed}",
                      batch_size=int(batch_size), num_classes=int(num_classes),
                      image_scale=1.0 / 255.0)
