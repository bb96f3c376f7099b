"""Four distinct 8x8 tasks derived from the embedded digits, for the offline task set."""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

from spmd_lopt.datasets import device_dataset

DIGITS8_VARIANTS = ("plain", "inverted", "pixel_permuted", "label_permuted")
_VARIANT_SEED = 20260211  # fixed: the permutations are part of the task definition


@functools.lru_cache(maxsize=8)
def _digits8_variant_arrays(variant: str):
  images, labels, _, _ = device_dataset.device_arrays("digits8", None, None, False)
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


def digits8_variant_datasets(variant: str, batch_size: int = 128) -> device_dataset.ImageDataset:
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
  _, _, scale, num_classes = device_dataset.device_arrays("digits8", None, None, False)
  tag = "digits8" if variant == "plain" else f"digits8_{variant}"
  return device_dataset.ImageDataset(images=dict(images), labels=dict(labels), name=tag,
                                    batch_size=int(batch_size), num_classes=num_classes,
                                    image_scale=scale)


def clear_cache() -> None:
  """Drop the cached variant arrays."""
  _digits8_variant_arrays.cache_clear()
