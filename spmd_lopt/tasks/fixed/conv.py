"""``Conv_*``: small conv nets, as the reference's ``fixed/conv.py``.

For channel widths ``c_1..c_L``: ``x -> Conv3x3(c_1, stride 2) -> a -> Conv3x3(c_2) -> a
... -> mean over H, W -> Dense(K)``, 'SAME' padding, ReLU, batch 128, mean softmax
cross-entropy, normalizer ``clip(0, 1.5 ln 10)``. On 8x8 inputs the stride-2 first layer
leaves 4x4 maps.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from spmd_lopt import datasets as ds_lib
from spmd_lopt.tasks.fixed.classification import ImageClassificationTask


class ConvPool(nn.Module):
  """f32[B, H, W, C] -> conv stack (first stride 2) -> global mean pool -> Dense(K)."""
  channels: Sequence[int]
  num_classes: int = 10
  activation: Callable[[jax.Array], jax.Array] = nn.relu

  @nn.compact
  def __call__(self, x):
    for i, c in enumerate(self.channels):
      stride = 2 if i == 0 else 1
      x = self.activation(nn.Conv(c, (3, 3), strides=(stride, stride), padding="SAME")(x))
    return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


def _conv_task(name, dataset, channels):
  return ImageClassificationTask(ConvPool(tuple(channels), dataset.num_classes), dataset,
                                 name=name)


def Conv_Digits8_16x32(batch_size: int = 128):
  """Conv 16 (stride 2) -> conv 32 -> pool -> 10 on the embedded 8x8 digits."""
  return _conv_task("Conv_Digits8_16x32", ds_lib.digits8_datasets(batch_size), [16, 32])


def Conv_FashionMnist8_16x32(data_dir: Optional[str] = None, batch_size: int = 128):
  """Conv 16 (stride 2) -> conv 32 -> pool -> 10 on 8x8 Fashion-MNIST."""
  return _conv_task("Conv_FashionMnist8_16x32",
                    ds_lib.fashion_mnist_datasets(batch_size, (8, 8), data_dir), [16, 32])


def Conv_Cifar10_8_16x32(data_dir: Optional[str] = None, batch_size: int = 128):
  """Conv 16 (stride 2) -> conv 32 -> pool -> 10 on CIFAR-10 resized to 8x8x3."""
  return _conv_task("Conv_Cifar10_8_16x32",
                    ds_lib.cifar10_datasets(batch_size, (8, 8), data_dir), [16, 32])


def Conv_Cifar10_32x64x64(data_dir: Optional[str] = None, batch_size: int = 128):
  """Conv 32 (stride 2) -> conv 64 -> conv 64 -> pool -> 10 on 32x32 CIFAR-10."""
  return _conv_task("Conv_Cifar10_32x64x64",
                    ds_lib.cifar10_datasets(batch_size, None, data_dir), [32, 64, 64])


TASKS = {f.__name__: f for f in (Conv_Digits8_16x32, Conv_FashionMnist8_16x32,
                                 Conv_Cifar10_8_16x32, Conv_Cifar10_32x64x64)}
