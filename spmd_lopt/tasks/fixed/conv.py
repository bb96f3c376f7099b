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


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
  """'SAME' padding ``(lo, hi)`` of one spatial axis, as XLA/flax compute it: the output
  has ``ceil(size / stride)`` positions, ``total = max((out - 1) * stride + kernel - size,
  0)`` zeros are added, ``lo = total // 2`` before and the rest after."""
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


def conv_same_as_matmul(x: jax.Array, kernel: jax.Array, strides: Sequence[int]
                        ) -> jax.Array:
  """The 'SAME'-padded 2-D cross-correlation of ``lax.conv_general_dilated`` (NHWC, HWIO),
  computed as input patches times the kernel.

  ``x`` f32[B, H, W, C], ``kernel`` f32[kh, kw, C, D], strides ``(sh, sw)`` ->
  f32[B, H', W', D] with ``H' = ceil(H / sh)``, ``W' = ceil(W / sw)`` and
  ``y[b, p, q, d] = sum_{i, j, c} xpad[b, p sh + i, q sw + j, c] kernel[i, j, c, d]``,
  ``xpad`` = ``x`` zero-padded by ``same_padding`` on each spatial axis.

  Why not ``lax.conv``: under ``vmap`` over kernels (the suite's seeds and grid points
  each train their own net) a batched kernel becomes a grouped convolution, which XLA's
  CPU backend runs far below its matmul speed. Here the ``kh * kw`` strided slices of
  ``xpad`` are stacked into patches f32[B, H', W', kh, kw, C] and contracted with the
  kernel in one ``einsum``: under ``vmap`` that is a batched matmul
  ``[n, B H' W', kh kw C] @ [n, kh kw C, D]``, and its gradients are matmuls plus pads.
  Same function as the convolution; only the float summation order differs.
  """
  kh, kw = kernel.shape[:2]
  sh, sw = strides
  height, width = x.shape[1], x.shape[2]
  ph, pw = same_padding(height, kh, sh), same_padding(width, kw, sw)
  xpad = jnp.pad(x, ((0, 0), ph, pw, (0, 0)))
  out_h, out_w = -(-height // sh), -(-width // sw)
  # slice (i, j) holds xpad[:, p sh + i, q sw + j, :] for every output position (p, q)
  rows = [jnp.stack([xpad[:, i:i + (out_h - 1) * sh + 1:sh, j:j + (out_w - 1) * sw + 1:sw, :]
                     for j in range(kw)], axis=3) for i in range(kh)]
  patches = jnp.stack(rows, axis=3)  # [B, H', W', kh, kw, C]
  return jnp.einsum("bpqijc,ijcd->bpqd", patches, kernel)


class PatchConv(nn.Module):
  """``nn.Conv(features, kernel_size, strides, padding="SAME")`` on f32[B, H, W, C]: the
  same parameters (``kernel`` f32[kh, kw, C, features], LeCun-normal; ``bias``
  f32[features], zeros) and the same function, computed by ``conv_same_as_matmul`` so
  that it stays a matmul under ``vmap`` over parameters."""
  features: int
  kernel_size: tuple[int, int] = (3, 3)
  strides: tuple[int, int] = (1, 1)

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        tuple(self.kernel_size) + (x.shape[-1], self.features))
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
    return conv_same_as_matmul(x, kernel, self.strides) + bias


class ConvPool(nn.Module):
  """f32[B, H, W, C] -> conv stack (first stride 2) -> global mean pool -> Dense(K).

  ``patches=True`` (default): the convolutions are ``PatchConv`` (``nn.Conv``'s parameters,
  names ``Conv_<i>``, init and function, but matmuls under ``vmap``; see
  ``conv_same_as_matmul``). ``patches=False``: flax's ``nn.Conv`` itself, the same
  parameters and function without the patches' 9x activation memory (large inputs, many
  tasks), but a slow grouped convolution under ``vmap`` on XLA's CPU backend."""
  channels: Sequence[int]
  num_classes: int = 10
  activation: Callable[[jax.Array], jax.Array] = nn.relu
  patches: bool = True

  @nn.compact
  def __call__(self, x):
    for i, c in enumerate(self.channels):
      stride = (2, 2) if i == 0 else (1, 1)
      # named as nn.Conv's auto-names, so the parameter tree (and its init keys) is the same
      layer = (PatchConv(c, (3, 3), stride, name=f"Conv_{i}") if self.patches else
               nn.Conv(c, (3, 3), strides=stride, padding="SAME", name=f"Conv_{i}"))
      x = self.activation(layer(x))
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
