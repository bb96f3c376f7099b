"""Synthetic image classification: random images labelled by a fixed random teacher net,
with a real set's shapes and no files (for benchmarks)."""

from __future__ import annotations

import functools
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from spmd_lopt.datasets import device_dataset
from spmd_lopt.datasets import transforms


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
  return transforms.split_arrays("synthetic", x[:num_train], y[:num_train], x[num_train:],
                                 y[num_train:])


def synthetic_datasets(batch_size: int = 128, image_shape: Sequence[int] = (8, 8, 1),
                       num_classes: int = 10, num_train: int = 60_000,
                       num_test: int = 10_000, seed: int = 0) -> device_dataset.ImageDataset:
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
  return device_dataset.ImageDataset(
      images={k: jnp.asarray(x) for k, (x, _) in splits.items()},
      labels={k: jnp.asarray(y, jnp.int32) for k, (_, y) in splits.items()},
      name=f"synthetic_{shape[0]}x{shape[1]}x{shape[2]}_s{seed}",
      batch_size=int(batch_size), num_classes=int(num_classes), image_scale=1.0 / 255.0)


def clear_cache() -> None:
  """Drop the cached synthetic host arrays."""
  _synthetic_host.cache_clear()
