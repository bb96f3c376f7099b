"""Pre-processing and splits of image arrays (numpy, on the host, before placement).

As the reference (``learned_optimization.tasks.datasets.image``): pixels ``x`` in
``[0, 255]`` (``[0, 16]`` for digits) become ``x / 255`` (``x / 16``) in ``[0, 1]``. With
``image_size=(h, w)`` different from the native size, images are resized with bilinear
interpolation, half-pixel centres and no anti-aliasing (what TF2's
``tf.image.resize(..., "bilinear")`` does; ``resize_bilinear``). ``grayscale=True`` turns
RGB into one channel ``0.2989 R + 0.5870 G + 0.1140 B`` (``tf.image.rgb_to_grayscale``'s
weights) after resizing. Images are NHWC float32 ``[B, h, w, C]``; labels int32 ``[B]``.

Splits (``split_arrays``): with ``N`` the size of the official training set,
``train = train[0 : 8N/10]``, ``inner_valid = train[8N/10 : 9N/10]``,
``outer_valid = train[9N/10 : N]`` and ``test`` the official test set. ``digits8`` has no
official test set; its split is by position ``i`` in the file (version-proof, and
interleaved so every split spans every writer): ``i % 10 == 9 -> test`` (179),
``== 8 -> outer_valid`` (179), ``== 7 -> inner_valid`` (179), else ``train`` (1,260).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

SPLITS = ("train", "inner_valid", "outer_valid", "test")


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


def split_arrays(name: str, xtr, ytr, xte,
                 yte) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """``{split: (images, labels)}`` for every split in ``SPLITS`` (module docstring)."""
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
