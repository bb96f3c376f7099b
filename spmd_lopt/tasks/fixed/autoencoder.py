"""``Autoencoder_Digits8_*``: an MLP autoencoder on the 8x8 digits (reconstruction loss).

``x`` f32[B, 64] (pixels in [0, 1]) -> ``h = tanh(W_1 x + b_1)`` for each hidden width
(``32x16x32``: 64 -> 32 -> 16 -> 32) -> ``y = W_L h + b_L`` f32[B, 64];
``loss = (1/B) sum_b ||sigmoid(y_b) - x_b||^2 / 64`` (mean squared reconstruction error
per pixel, labels unused). Splits are the digits' ``train``/``inner_valid``/``test``.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from spmd_lopt import datasets as ds_lib
from spmd_lopt.tasks import base


class MLPAutoencoder(nn.Module):
  """f32[B, ...] -> flatten -> (Dense(h) -> tanh) for h in hidden -> Dense(D) logits."""
  hidden: Sequence[int]

  @nn.compact
  def __call__(self, x):
    x = x.reshape((x.shape[0], -1))
    d = x.shape[-1]
    for h in self.hidden:
      x = jnp.tanh(nn.Dense(h)(x))
    return nn.Dense(d)(x)


class AutoencoderTask(base.Task):
  """``module`` reconstructs images of ``dataset`` through a sigmoid; per-pixel MSE."""

  def __init__(self, module: nn.Module, dataset, name: str):
    self.module, self._dataset, self.name = module, dataset, name

  @property
  def datasets(self):
    return self._dataset

  def init(self, key):
    x = jnp.zeros((1,) + self._dataset.image_shape, jnp.float32)
    return self.module.init(key, x)["params"]

  def loss(self, params, key, data):
    del key
    x = data["image"].reshape((data["image"].shape[0], -1))
    y = jax.nn.sigmoid(self.module.apply({"params": params}, data["image"]))
    return jnp.mean(jnp.square(y - x))

  def sample_batch(self, key, split: str = "train"):
    return self._dataset.sample_batch(key, split)


def Autoencoder_Digits8_32x16x32(batch_size: int = 128):
  """64 -> 32 -> 16 -> 32 -> 64 tanh autoencoder on the embedded 8x8 digits."""
  return AutoencoderTask(MLPAutoencoder((32, 16, 32)), ds_lib.digits8_datasets(batch_size),
                         name="Autoencoder_Digits8_32x16x32")


TASKS = {f.__name__: f for f in (Autoencoder_Digits8_32x16x32,)}
