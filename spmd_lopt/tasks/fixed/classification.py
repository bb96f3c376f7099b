"""An image-classification ``Task``: a flax module, an on-device ``ImageDataset``, and
mean softmax cross-entropy.

For a batch ``{"image": f32[B, H, W, C], "label": i32[B]}`` and logits ``z = f(params,
image)`` of shape ``[B, K]``: ``loss = (1/B) sum_b (logsumexp(z_b) - z_b[label_b])``.
``normalizer(loss) = clip(loss, 0, 1.5 ln K)`` with NaN mapped to ``1.5 ln K`` (a diverged
inner run counts as the worst loss, not as a NaN that poisons the meta-gradient).
"""

from __future__ import annotations

import copy
import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from spmd_lopt.datasets import ImageDataset
from spmd_lopt.tasks import base


def clipped_log_k_normalizer(loss: jax.Array, num_classes: int) -> jax.Array:
  """``clip(loss, 0, 1.5 ln K)``; NaN -> ``1.5 ln K``."""
  hi = 1.5 * math.log(num_classes)
  return jnp.where(jnp.isnan(loss), hi, jnp.clip(loss, 0.0, hi))


class ImageClassificationTask(base.Task):
  """``module`` (a ``flax.linen.Module`` mapping f32[B, H, W, C] to logits f32[B, K]) on
  ``dataset``. Parameters are the module's ``"params"`` collection."""

  def __init__(self, module: nn.Module, dataset: ImageDataset, name: Optional[str] = None):
    self.module = module
    self._dataset = dataset
    self.name = name or f"{type(module).__name__}_{dataset.name}"

  @property
  def datasets(self) -> ImageDataset:
    return self._dataset

  def with_datasets(self, dataset: ImageDataset) -> "ImageClassificationTask":
    """The same task reading ``dataset`` (e.g. a traced jit argument; see
    ``spmd_lopt.datasets`` on closing over data vs passing it)."""
    out = copy.copy(self)
    out._dataset = dataset
    return out

  def init(self, key):
    image = jnp.zeros((1,) + self._dataset.image_shape, jnp.float32)
    return self.module.init(key, image)["params"]

  def logits(self, params, image):
    return self.module.apply({"params": params}, image)

  def loss(self, params, key, data):
    del key  # deterministic nets
    logits = self.logits(params, data["image"])
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, data["label"]))

  def loss_and_aux(self, params, key, data):
    logits = self.logits(params, data["image"])
    loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, data["label"]))
    acc = jnp.mean((jnp.argmax(logits, -1) == data["label"]).astype(jnp.float32))
    return loss, {"accuracy": acc}

  def sample_batch(self, key, split: str = "train"):
    return self._dataset.sample_batch(key, split)

  def normalizer(self, loss):
    return clipped_log_k_normalizer(loss, self._dataset.num_classes)
