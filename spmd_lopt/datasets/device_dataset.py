"""``ImageDataset``: every split of an image data set on device, sampled on device.

An ``ImageDataset`` is a pytree whose leaves are the pre-processed arrays of every split
(``transforms``), already on device. ``sample_batch(key, split)`` draws ``batch_size``
indices ``i_b ~ Uniform{0..N_split-1}`` i.i.d. (with replacement) and gathers them: pure,
jittable and vmappable over keys, with no host iterator. The reference instead shuffles
per epoch (without replacement); for a 128 batch out of tens of thousands the two are
indistinguishable in practice, and only with-replacement sampling is stateless. Images
whose values are exact integers (no resize) are stored as uint8 and scaled after the
gather (4x less device memory); resized images are stored as float32.

Closed over or passed as an argument: a task built by ``task_fn`` inside a jitted meta
step holds its ``ImageDataset`` as a Python attribute, so by default the arrays are
*closed over* and JAX embeds them as constants in the program. That costs compile time
and program size growing with the data (and paid again by every program that touches
it), not step time; for the 8x8 sets used in meta-training it is small, so the task
closes over its data. For big sets (28x28 MNIST, CIFAR-10 at 32x32: 150-600 MB) pass the
data as an argument instead: every image task and family exposes ``datasets`` (a pytree)
and ``with_datasets(ds)``, so ``jax.jit(lambda ds, k:
task.with_datasets(ds).sample_batch(k))(task.datasets, key)`` keeps the arrays out of the
program. (JAX's experimental ``jax_use_simplified_jaxpr_constants=True`` also hoists
closed-over arrays to arguments; it is global, so it is left to the user.)
"""

from __future__ import annotations

import functools
import os
from typing import Optional, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from spmd_lopt.datasets import sources
from spmd_lopt.datasets import transforms


@functools.lru_cache(maxsize=16)
def _prepared(name: str, data_dir: Optional[str], image_size: Optional[tuple[int, int]],
              grayscale: bool = False):
  """Host arrays per split, pre-processed, cached: ``(arrays, scale, num_classes)``."""
  xtr, ytr, xte, yte = sources.load_raw(name, data_dir)
  max_value = 16.0 if name == "digits8" else 255.0
  native = tuple(xtr.shape[1:3])
  splits = transforms.split_arrays(name, xtr, ytr, xte, yte)
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
        x = transforms.resize_bilinear(x, image_size)
      if grayscale and x.shape[-1] == 3:  # resize and luma are linear: order is free
        x = transforms.to_grayscale(x)
      out[k] = (x.astype(np.float32) / np.float32(max_value), y.astype(np.int32))
  num_classes = 10
  return out, scale, num_classes


@functools.lru_cache(maxsize=16)
def device_arrays(name: str, data_dir: Optional[str],
                  image_size: Optional[tuple[int, int]], grayscale: bool = False):
  """``(images, labels, image_scale, num_classes)``: ``_prepared``'s arrays placed on the
  default device once per argument tuple (cached), as ``{split: array}`` dicts."""
  arrays, scale, num_classes = _prepared(name, data_dir, image_size, grayscale)
  images = {k: jnp.asarray(x) for k, (x, _) in arrays.items()}
  labels = {k: jnp.asarray(y) for k, (_, y) in arrays.items()}
  return images, labels, scale, num_classes


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
  """Load (cached), pre-process and place ``name`` on device; see ``spmd_lopt.datasets``.

  name: ``"digits8"``, ``"mnist"``, ``"fashion_mnist"``, ``"cifar10"`` or
  ``"svhn_cropped"``.
  image_size: ``(h, w)`` to resize to, or ``None`` for the native size.
  grayscale: convert RGB to one luma channel (``to_grayscale``) after resizing.
  """
  known = sources.available_datasets()
  if name not in known or name == "synthetic":
    raise ValueError(f"Unknown data set {name!r}; known: {known[:-1]} "
                     "(and synthetic_datasets() for 'synthetic').")
  if name != "digits8":
    data_dir = os.path.abspath(os.path.expanduser(data_dir or sources.default_data_dir()))
  else:
    data_dir = None
  size = None if image_size is None else (int(image_size[0]), int(image_size[1]))
  images, labels, scale, num_classes = device_arrays(name, data_dir, size, bool(grayscale))
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
  ``test_32x32.mat``; the whole official train split is used (splits: see
  ``transforms``)."""
  return image_dataset("svhn_cropped", batch_size, image_size, data_dir, grayscale)


def clear_cache() -> None:
  """Drop this module's cached host and device arrays."""
  _prepared.cache_clear()
  device_arrays.cache_clear()
