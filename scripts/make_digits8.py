"""Make ``spmd_lopt/data/digits8.npz`` (run once; the result is committed).

Source: ``sklearn/datasets/data/digits.csv.gz`` inside a scikit-learn wheel, which is the
UCI "Optical Recognition of Handwritten Digits" set (1,797 8x8 images, pixel counts 0..16,
label in the last column). scikit-learn is only downloaded, never imported or required:

  pip download --no-deps scikit-learn -d /tmp/sk
  python scripts/make_digits8.py /tmp/sk/scikit_learn-*.whl

Output: ``images`` uint8[1797, 8, 8] in [0, 16] (row-major, as in the csv) and ``labels``
uint8[1797] in [0, 9], compressed with ``np.savez_compressed``.
"""

import gzip
import io
import os
import sys
import zipfile

import numpy as np


def main(wheel_path: str) -> None:
  with zipfile.ZipFile(wheel_path) as z:
    raw = gzip.decompress(z.read("sklearn/datasets/data/digits.csv.gz"))
  table = np.loadtxt(io.BytesIO(raw), delimiter=",", dtype=np.int64)
  if table.shape != (1797, 65):
    raise ValueError(f"unexpected digits.csv shape {table.shape}")
  images = table[:, :64].reshape(-1, 8, 8)
  labels = table[:, 64]
  assert images.min() >= 0 and images.max() <= 16 and set(labels) == set(range(10))
  out = os.path.join(os.path.dirname(__file__), "..", "spmd_lopt", "data", "digits8.npz")
  np.savez_compressed(out, images=images.astype(np.uint8), labels=labels.astype(np.uint8))
  print(f"wrote {os.path.normpath(out)}: images {images.shape}, labels {labels.shape}")


if __name__ == "__main__":
  main(sys.argv[1])
