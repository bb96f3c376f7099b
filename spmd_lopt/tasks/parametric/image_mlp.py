"""``ParametricImageMLP``: MLPs with sampled width, depth and activation, one padded shape.

Every task has ``max_depth`` hidden Dense layers of ``max_width`` units plus the output
layer, so all tasks share one parameter pytree. A task ``(widths, depth, act)`` uses:

  h_0 = vec(x);   z_l = W_l h_{l-1} + b_l;   a_l = act(z_l) * m_l,
  m_l[j] = 1[j < widths[l]];   h_l = a_l if l < depth else h_{l-1};   logits = W_o h_L + b_o

(``l = 0..max_depth-1``; layer 0 is always used, ``depth >= 1``). Masked units output 0,
so the weights into and out of them get zero gradient and the function is exactly that of
the narrower, shallower net. The activation is picked by ``lax.switch(act, ...)``.
Init: LeCun-normal over the padded fan-in, rescaled by ``sqrt(max_width / active fan-in)``
so pre-activations have the variance of the un-padded net.
"""

from __future__ import annotations

import copy
from typing import Callable, Optional, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from spmd_lopt import datasets as ds_lib
from spmd_lopt.tasks import base
from spmd_lopt.tasks.fixed.classification import ImageClassificationTask

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": nn.relu, "tanh": jnp.tanh, "gelu": nn.gelu, "silu": nn.silu, "elu": nn.elu}


@flax.struct.dataclass
class ImageMLPConfig:
  """Task parameters. widths: i32[max_depth] active units per hidden layer; depth: i32[]
  hidden layers used; activation: i32[] index into the family's activation names."""
  widths: jax.Array
  depth: jax.Array
  activation: jax.Array


class MaskedMLP(nn.Module):
  """The padded MLP above; ``cfg`` (an ``ImageMLPConfig``) selects the sub-network."""
  max_width: int
  max_depth: int
  num_classes: int
  activations: Sequence[Callable[[jax.Array], jax.Array]]

  @nn.compact
  def __call__(self, x, cfg: ImageMLPConfig):
    h = x.reshape((x.shape[0], -1))
    units = jnp.arange(self.max_width)
    for l in range(self.max_depth):
      z = nn.Dense(self.max_width)(h)
      a = jax.lax.switch(cfg.activation, list(self.activations), z)
      a = a * (units < cfg.widths[l]).astype(a.dtype)
      h = a if l == 0 else jnp.where(l < cfg.depth, a, h)
    return nn.Dense(self.num_classes)(h)


class _ParametricMLPTask(ImageClassificationTask):

  def __init__(self, family: "ParametricImageMLP", cfg: ImageMLPConfig):
    super().__init__(family.module, family.datasets, name=family.name)
    self.cfg = cfg
    self.max_width = family.max_width

  def init(self, key):
    image = jnp.zeros((1,) + self.datasets.image_shape, jnp.float32)
    params = self.module.init(key, image, self.cfg)["params"]
    params = dict(params)
    d = self.cfg.depth
    fan_ins = [self.cfg.widths[l - 1] for l in range(1, self.module.max_depth)]
    fan_ins.append(jnp.take(self.cfg.widths, d - 1))  # output layer reads layer depth-1
    for l, fan in enumerate(fan_ins, start=1):
      name = f"Dense_{l}"
      scale = jnp.sqrt(self.max_width / jnp.maximum(fan, 1).astype(jnp.float32))
      params[name] = dict(params[name], kernel=params[name]["kernel"] * scale)
    return params

  def logits(self, params, image):
    return self.module.apply({"params": params}, image, self.cfg)


class ParametricImageMLP(base.TaskFamily):
  """Random MLP classifiers on one ``ImageDataset``.

  sample: ``depth ~ U{min_depth..max_depth}``; each width log-uniform on
  ``[min_width, max_width]`` (rounded down); ``activation ~ U{activation names}``.
  """

  def __init__(self, dataset: Optional[ds_lib.ImageDataset] = None, min_width: int = 8,
               max_width: int = 64, min_depth: int = 1, max_depth: int = 3,
               activations: Sequence[str] = ("relu", "tanh", "gelu", "silu"),
               name: Optional[str] = None):
    if not 1 <= min_width <= max_width or not 1 <= min_depth <= max_depth:
      raise ValueError("ParametricImageMLP: need 1 <= min_width <= max_width and "
                       f"1 <= min_depth <= max_depth; got widths [{min_width}, "
                       f"{max_width}], depths [{min_depth}, {max_depth}].")
    unknown = [a for a in activations if a not in ACTIVATIONS]
    if unknown or not activations:
      raise ValueError(f"ParametricImageMLP: unknown activations {unknown}; known: "
                       f"{tuple(ACTIVATIONS)}.")
    self._dataset = dataset if dataset is not None else ds_lib.digits8_datasets()
    self.min_width, self.max_width = int(min_width), int(max_width)
    self.min_depth, self.max_depth = int(min_depth), int(max_depth)
    self.activation_names = tuple(activations)
    self.module = MaskedMLP(self.max_width, self.max_depth, self._dataset.num_classes,
                            tuple(ACTIVATIONS[a] for a in self.activation_names))
    self.name = name or f"ParametricImageMLP_{self._dataset.name}"

  @property
  def datasets(self):
    return self._dataset

  def with_datasets(self, dataset):
    out = copy.copy(self)
    out._dataset = dataset
    return out

  def sample(self, key):
    kw, kd, ka = jax.random.split(key, 3)
    lo, hi = jnp.log(self.min_width), jnp.log(self.max_width + 1)
    widths = jnp.exp(jax.random.uniform(kw, (self.max_depth,), minval=lo, maxval=hi))
    widths = jnp.clip(jnp.floor(widths), self.min_width, self.max_width).astype(jnp.int32)
    depth = jax.random.randint(kd, (), self.min_depth, self.max_depth + 1, jnp.int32)
    act = jax.random.randint(ka, (), 0, len(self.activation_names), jnp.int32)
    return ImageMLPConfig(widths=widths, depth=depth, activation=act)

  def task_fn(self, task_param):
    return _ParametricMLPTask(self, task_param)
