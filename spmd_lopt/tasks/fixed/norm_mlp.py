"""``LayerNormMLP_*``: a layer-normalised MLP classifier on the 8x8 digits.

``h_{l+1} = relu(LayerNorm(W_l h_l + b_l))`` (LayerNorm with a learned scale and bias,
``eps = 1e-6``) for each hidden width, then ``logits = W_L h + b_L``; 10 classes, mean
softmax cross-entropy (``ImageClassificationTask``).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn

from spmd_lopt import datasets as ds_lib
from spmd_lopt.tasks.fixed.classification import ImageClassificationTask


class LayerNormMLP(nn.Module):
  """f32[B, ...] -> flatten -> (Dense(h) -> LayerNorm -> relu) for h in hidden -> Dense(K)."""
  hidden: Sequence[int]
  num_classes: int = 10

  @nn.compact
  def __call__(self, x):
    x = x.reshape((x.shape[0], -1))
    for h in self.hidden:
      x = nn.relu(nn.LayerNorm(epsilon=1e-6)(nn.Dense(h)(x)))
    return nn.Dense(self.num_classes)(x)


def LayerNormMLP_Digits8_64x64(batch_size: int = 128):
  """64 -> 64 -> 64 -> 10 MLP with LayerNorm before each ReLU, on the 8x8 digits."""
  ds = ds_lib.digits8_datasets(batch_size)
  return ImageClassificationTask(LayerNormMLP((64, 64), ds.num_classes), ds,
                                 name="LayerNormMLP_Digits8_64x64")


TASKS = {f.__name__: f for f in (LayerNormMLP_Digits8_64x64,)}
