"""The Celo2 paper's meta-training tasks, and two stand-ins that need no downloads.

Every task here has exactly the paper's per-iteration shapes: a batch of 64 images
``f32[64, 8, 8, 1]`` (values in ``[0, 1]``) with int32 labels in ``0..9``, an MLP
``64 -> 32 -> 10`` with ReLU (2,410 parameters), mean softmax cross-entropy, and the
meta-loss ``clip(loss, 0, 1.5 ln 10)`` (NaN -> ``1.5 ln 10``; the task's ``normalizer``,
which the truncated step applies to every meta-loss). Weights start as Haiku's default
``Linear`` (truncated normal, stddev ``1/sqrt(fan_in)``, cut at 2 stddevs; biases 0), as in
the authors' code.

The paper's set (``TASK_SETS["celo2"]``; files needed, see ``spmd_lopt.datasets``):

- ``ImageMLP_Cifar10Gray8_Relu32_B64``: CIFAR-10, resized to 8x8, grayscale;
- ``ImageMLP_FashionMnist8_Relu32_B64``: Fashion-MNIST resized to 8x8;
- ``ImageMLP_Mnist8_Relu32_B64``: MNIST resized to 8x8;
- ``ImageMLP_SvhnGray8_Relu32_B64``: SVHN cropped digits, resized to 8x8, grayscale
  (the whole train split; the authors' loader kept only its first 1%).

Offline set (``TASK_SETS["celo2_digits"]``), from the 1,797 embedded 8x8 digits only:

- ``ImageMLP_Digits8_Relu32_B64``: the digits;
- ``ImageMLP_Digits8Inverted_Relu32_B64``: ``x -> 1 - x``;
- ``ImageMLP_Digits8PixelPerm_Relu32_B64``: one fixed permutation of the 64 pixels;
- ``ImageMLP_Digits8LabelPerm_Relu32_B64``: one fixed permutation of the 10 labels.

Why these four: the paper's point is four *different* data distributions behind one
architecture, so the learned rule cannot fit one loss surface. With one small source,
the transformations that keep the shapes and the learnability but change what the
optimizer sees are: the input statistics (inversion flips every pixel's mean and the
sign of its weight's gradient, like going from dark-background MNIST to a light one),
the input geometry (a pixel permutation gives a different first-layer gradient pattern
and is how "permuted MNIST" makes new tasks), and the output map (a label permutation
changes which output unit each gradient reaches). Augmentations that change difficulty
rather than structure (noise, blur) were left out: at 8x8 they mostly make the task
harder, not different.

Synthetic (``TASK_SETS["celo2_synthetic"]``): ``ImageMLP_Synthetic8_Relu32_B64`` and
``ImageMLP_Synthetic8s{1,2,3}_Relu32_B64`` (teacher seeds 0..3): random images, labels
from a fixed random teacher, 60,000 train / 10,000 test like (Fashion-)MNIST; for
benchmarks of the paper's shapes without its files.
"""

from __future__ import annotations

import functools
from typing import Optional

import flax.linen as nn

from spmd_lopt import datasets as ds_lib
from spmd_lopt.tasks.fixed.classification import ImageClassificationTask
from spmd_lopt.tasks.fixed.image_mlp import MLP

BATCH_SIZE = 64
HIDDEN = (32,)
# Haiku's Linear default: truncated normal (+-2 sd) with stddev 1/sqrt(fan_in). flax's
# "truncated_normal" variance scaling rescales by 1/0.8796 to keep the variance; scaling
# the variance by 0.8796^2 undoes that, giving Haiku's distribution exactly.
HAIKU_LINEAR_INIT = nn.initializers.variance_scaling(0.87962566103423978 ** 2, "fan_in",
                                                     "truncated_normal")


def _task(name: str, dataset: ds_lib.ImageDataset) -> ImageClassificationTask:
  module = MLP(HIDDEN, dataset.num_classes, nn.relu, HAIKU_LINEAR_INIT)
  return ImageClassificationTask(module, dataset, name=name)


def ImageMLP_Cifar10Gray8_Relu32_B64(data_dir: Optional[str] = None,
                                     batch_size: int = BATCH_SIZE):
  """64 -> 32 -> 10 ReLU MLP on CIFAR-10 at 8x8 grayscale, batch 64."""
  return _task("ImageMLP_Cifar10Gray8_Relu32_B64",
               ds_lib.cifar10_datasets(batch_size, (8, 8), data_dir, grayscale=True))


def ImageMLP_FashionMnist8_Relu32_B64(data_dir: Optional[str] = None,
                                      batch_size: int = BATCH_SIZE):
  """64 -> 32 -> 10 ReLU MLP on Fashion-MNIST at 8x8, batch 64."""
  return _task("ImageMLP_FashionMnist8_Relu32_B64",
               ds_lib.fashion_mnist_datasets(batch_size, (8, 8), data_dir))


def ImageMLP_Mnist8_Relu32_B64(data_dir: Optional[str] = None,
                               batch_size: int = BATCH_SIZE):
  """64 -> 32 -> 10 ReLU MLP on MNIST at 8x8, batch 64."""
  return _task("ImageMLP_Mnist8_Relu32_B64",
               ds_lib.mnist_datasets(batch_size, (8, 8), data_dir))


def ImageMLP_SvhnGray8_Relu32_B64(data_dir: Optional[str] = None,
                                  batch_size: int = BATCH_SIZE):
  """64 -> 32 -> 10 ReLU MLP on SVHN cropped digits at 8x8 grayscale, batch 64."""
  return _task("ImageMLP_SvhnGray8_Relu32_B64",
               ds_lib.svhn_cropped_datasets(batch_size, (8, 8), data_dir, grayscale=True))


_DIGIT_VARIANTS = {"Digits8": "plain", "Digits8Inverted": "inverted",
                   "Digits8PixelPerm": "pixel_permuted", "Digits8LabelPerm": "label_permuted"}


def _digits_task(tag: str, batch_size: int = BATCH_SIZE):
  name = f"ImageMLP_{tag}_Relu32_B64"
  return _task(name, ds_lib.digits8_variant_datasets(_DIGIT_VARIANTS[tag], batch_size))


def ImageMLP_Synthetic8_Relu32_B64(batch_size: int = BATCH_SIZE, seed: int = 0):
  """64 -> 32 -> 10 ReLU MLP on synthetic 8x8x1 teacher-labelled images, batch 64."""
  name = "ImageMLP_Synthetic8_Relu32_B64" if seed == 0 else (
      f"ImageMLP_Synthetic8s{seed}_Relu32_B64")
  return _task(name, ds_lib.synthetic_datasets(batch_size, (8, 8, 1), seed=seed))


TASKS = {f.__name__: f for f in (ImageMLP_Cifar10Gray8_Relu32_B64,
                                 ImageMLP_FashionMnist8_Relu32_B64,
                                 ImageMLP_Mnist8_Relu32_B64, ImageMLP_SvhnGray8_Relu32_B64,
                                 ImageMLP_Synthetic8_Relu32_B64)}
for _tag in _DIGIT_VARIANTS:
  TASKS[f"ImageMLP_{_tag}_Relu32_B64"] = functools.partial(_digits_task, _tag)
for _seed in (1, 2, 3):
  TASKS[f"ImageMLP_Synthetic8s{_seed}_Relu32_B64"] = functools.partial(
      ImageMLP_Synthetic8_Relu32_B64, seed=_seed)

TASK_SETS = {
    "celo2": ("ImageMLP_Cifar10Gray8_Relu32_B64", "ImageMLP_FashionMnist8_Relu32_B64",
              "ImageMLP_Mnist8_Relu32_B64", "ImageMLP_SvhnGray8_Relu32_B64"),
    "celo2_digits": tuple(f"ImageMLP_{t}_Relu32_B64" for t in _DIGIT_VARIANTS),
    "celo2_synthetic": ("ImageMLP_Synthetic8_Relu32_B64",) + tuple(
        f"ImageMLP_Synthetic8s{s}_Relu32_B64" for s in (1, 2, 3)),
}
