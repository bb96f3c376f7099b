"""``ImageMLP_*``: MLPs on flattened images, as the reference's ``fixed/image_mlp.py``.

``logits = W_L a(... a(W_1 vec(x) + b_1) ...) + b_L`` with ``a`` the activation, hidden
widths from the name (``Relu32``: one hidden layer of 32; ``Relu128x128``: two of 128),
10 classes, batch 128, mean softmax cross-entropy; normalizer ``clip(0, 1.5 ln 10)``.
Weights start LeCun-normal (variance ``1/fan_in``), biases zero.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import flax.linen as nn
import jax

from spmd_lopt import datasets as ds_lib
from spmd_lopt.tasks.fixed.classification import ImageClassificationTask


class MLP(nn.Module):
  """f32[B, ...] -> flatten -> (Dense(h) -> activation) for h in hidden -> Dense(K)."""
  hidden: Sequence[int]
  num_classes: int = 10
  activation: Callable[[jax.Array], jax.Array] = nn.relu
  kernel_init: Callable = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x):
    x = x.reshape((x.shape[0], -1))
    for h in self.hidden:
      x = self.activation(nn.Dense(h, kernel_init=self.kernel_init)(x))
    return nn.Dense(self.num_classes, kernel_init=self.kernel_init)(x)


def _mlp_task(name, dataset, hidden, activation=nn.relu):
  return ImageClassificationTask(MLP(tuple(hidden), dataset.num_classes, activation),
                                 dataset, name=name)


def ImageMLP_Digits8_Relu32(batch_size: int = 128):
  """64 -> 32 -> 10 ReLU MLP on the embedded 8x8 digits (2,410 parameters)."""
  return _mlp_task("ImageMLP_Digits8_Relu32", ds_lib.digits8_datasets(batch_size), [32])


def ImageMLP_Digits8_Relu128x128(batch_size: int = 128):
  """64 -> 128 -> 128 -> 10 ReLU MLP on the embedded 8x8 digits."""
  return _mlp_task("ImageMLP_Digits8_Relu128x128", ds_lib.digits8_datasets(batch_size),
                   [128, 128])


def ImageMLP_FashionMnist8_Relu32(data_dir: Optional[str] = None, batch_size: int = 128):
  """64 -> 32 -> 10 ReLU MLP on Fashion-MNIST resized to 8x8 (the reference's standard
  meta-training task)."""
  return _mlp_task("ImageMLP_FashionMnist8_Relu32",
                   ds_lib.fashion_mnist_datasets(batch_size, (8, 8), data_dir), [32])


def ImageMLP_FashionMnist_Relu128x128(data_dir: Optional[str] = None,
                                      batch_size: int = 128):
  """784 -> 128 -> 128 -> 10 ReLU MLP on 28x28 Fashion-MNIST."""
  return _mlp_task("ImageMLP_FashionMnist_Relu128x128",
                   ds_lib.fashion_mnist_datasets(batch_size, None, data_dir), [128, 128])


def ImageMLP_Mnist8_Relu32(data_dir: Optional[str] = None, batch_size: int = 128):
  """64 -> 32 -> 10 ReLU MLP on MNIST resized to 8x8."""
  return _mlp_task("ImageMLP_Mnist8_Relu32",
                   ds_lib.mnist_datasets(batch_size, (8, 8), data_dir), [32])


def ImageMLP_Mnist_Relu32(data_dir: Optional[str] = None, batch_size: int = 128):
  """784 -> 32 -> 10 ReLU MLP on 28x28 MNIST."""
  return _mlp_task("ImageMLP_Mnist_Relu32",
                   ds_lib.mnist_datasets(batch_size, None, data_dir), [32])


TASKS = {f.__name__: f for f in (
    ImageMLP_Digits8_Relu32, ImageMLP_Digits8_Relu128x128, ImageMLP_FashionMnist8_Relu32,
    ImageMLP_FashionMnist_Relu128x128, ImageMLP_Mnist8_Relu32, ImageMLP_Mnist_Relu32)}
