"""``ParametricImageMLP``: MLPs of sampled architecture and activation, without masking.

Tasks are vmapped over, so every sample must share one parameter pytree. Padding every
net to the widest shape and masking unused units computes the right function but not
the right optimizer inputs: per-tensor statistics (a learned optimizer's normalisation,
Adafactor's row/column moments) would average over masked zeros, and masked weights
would drift under a rule whose output is nonzero at zero gradient. So no net is padded.

Instead the family holds a few *static architectures* (shape buckets), hidden sizes such
as ``(32,)`` or ``(64, 64)``, each its own ``MLP`` with its own exact parameter shapes.
The parameters of a task are the tuple ``(params_0, ..., params_{A-1})``, one slot per
architecture; a task of architecture ``a`` initialises slot ``a`` only (the others are
zero) and its loss reads slot ``a`` only, by ``lax.switch``. Slot ``a``'s tensors are
exactly the narrow net's tensors, with the narrow net's gradient; the other slots get
zero gradient and never enter the loss. A per-tensor optimizer therefore takes on slot
``a`` exactly the step it takes on the narrow net alone (tested for MLPLOpt). Under
``vmap`` with different architectures per task, ``lax.switch`` runs every branch, so a
step costs the sum of the buckets' costs: keep the list short.

Sampling: ``architecture ~ U{0..A-1}``, ``activation ~ U{names}``. Init: flax's default
``Dense`` (LeCun normal on the true fan-in, zero biases).
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

DEFAULT_ARCHITECTURES = ((16,), (32,), (64,), (32, 32), (64, 64), (32, 32, 32))


@flax.struct.dataclass
class ImageMLPConfig:
  """Task parameters. architecture: i32[] index into the family's hidden-size tuples;
  activation: i32[] index into its activation names."""
  architecture: jax.Array
  activation: jax.Array


class SwitchedActivationMLP(nn.Module):
  """flatten -> (Dense(h) -> activations[act]) for h in hidden -> Dense(K)."""
  hidden: Sequence[int]
  num_classes: int
  activations: Sequence[Callable[[jax.Array], jax.Array]]

  @nn.compact
  def __call__(self, x, act):
    h = x.reshape((x.shape[0], -1))
    for width in self.hidden:
      h = jax.lax.switch(act, list(self.activations), nn.Dense(width)(h))
    return nn.Dense(self.num_classes)(h)


class _BucketMLPTask(ImageClassificationTask):

  def __init__(self, family: "ParametricImageMLP", cfg: ImageMLPConfig):
    super().__init__(family.modules[0], family.datasets, name=family.name)
    self.family = family
    self.cfg = cfg

  def init(self, key):
    f = self.family
    image = jnp.zeros((1,) + self.datasets.image_shape, jnp.float32)
    zeros = [jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
             for shapes in f.param_shapes]

    def branch(i):
      def init_slot_i(k):
        slot = f.modules[i].init(k, image, self.cfg.activation)["params"]
        return tuple(slot if j == i else zeros[j] for j in range(len(f.modules)))
      return init_slot_i
    return jax.lax.switch(self.cfg.architecture,
                          [branch(i) for i in range(len(f.modules))], key)

  def logits(self, params, image):
    f = self.family

    def branch(i):
      return lambda p, x: f.modules[i].apply({"params": p[i]}, x, self.cfg.activation)
    return jax.lax.switch(self.cfg.architecture,
                          [branch(i) for i in range(len(f.modules))], params, image)


class ParametricImageMLP(base.TaskFamily):
  """Random MLP classifiers on one ``ImageDataset``, one static shape per architecture.

  Args:
    dataset: the data (default: the embedded 8x8 digits, batch 128).
    architectures: hidden sizes per bucket, e.g. ``((32,), (64, 64))``.
    activations: names from ``ACTIVATIONS``.
  """

  def __init__(self, dataset: Optional[ds_lib.ImageDataset] = None,
               architectures: Sequence[Sequence[int]] = DEFAULT_ARCHITECTURES,
               activations: Sequence[str] = ("relu", "tanh", "gelu", "silu"),
               name: Optional[str] = None):
    archs = tuple(tuple(int(w) for w in a) for a in architectures)
    if not archs or any(not a or min(a) < 1 for a in archs):
      raise ValueError("ParametricImageMLP: architectures must be a non-empty list of "
                       f"non-empty hidden-size tuples of positive ints, got {architectures!r}.")
    unknown = [a for a in activations if a not in ACTIVATIONS]
    if unknown or not activations:
      raise ValueError(f"ParametricImageMLP: unknown activations {unknown}; known: "
                       f"{tuple(ACTIVATIONS)}.")
    self._dataset = dataset if dataset is not None else ds_lib.digits8_datasets()
    self.architectures = archs
    self.activation_names = tuple(activations)
    acts = tuple(ACTIVATIONS[a] for a in self.activation_names)
    self.modules = tuple(SwitchedActivationMLP(a, self._dataset.num_classes, acts)
                         for a in archs)
    image = jnp.zeros((1,) + self._dataset.image_shape, jnp.float32)
    self.param_shapes = tuple(
        jax.eval_shape(lambda k, m=m: m.init(k, image, 0)["params"], jax.random.key(0))
        for m in self.modules)
    self.name = name or f"ParametricImageMLP_{self._dataset.name}"

  @property
  def datasets(self):
    return self._dataset

  def with_datasets(self, dataset):
    out = copy.copy(self)
    out._dataset = dataset
    return out

  def sample(self, key):
    ka, kb = jax.random.split(key)
    arch = jax.random.randint(ka, (), 0, len(self.architectures), jnp.int32)
    act = jax.random.randint(kb, (), 0, len(self.activation_names), jnp.int32)
    return ImageMLPConfig(architecture=arch, activation=act)

  def task_fn(self, task_param):
    return _BucketMLPTask(self, task_param)
