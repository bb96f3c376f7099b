"""Quadratic task families: the smallest problems a learned optimizer is meta-trained on.

``FixedDimQuadraticFamily(dim)``: each task is a bowl ``L(p) = sum_j (c_j - p_j)^2`` with a
target ``c ~ N(0, I_dim)`` sampled per task and parameters initialised ``p ~ N(0, I_dim)``.
No data. ``E[L(p_0)] = 2 * dim``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from spmd_lopt.tasks import base


class _QuadraticTask(base.Task):

  def __init__(self, center: jax.Array):
    self._center = center
    self.name = "FixedDimQuadratic"

  def init(self, key):
    return jax.random.normal(key, self._center.shape)

  def loss(self, params, key, data):
    del key, data
    return jnp.sum(jnp.square(self._center - params))


class FixedDimQuadraticFamily(base.TaskFamily):
  """Random quadratic bowls of dimension ``dim``; the task param is the center ``c``."""

  def __init__(self, dim: int = 10):
    if int(dim) <= 0:
      raise ValueError(f"FixedDimQuadraticFamily: dim must be positive, got {dim}.")
    self.dim = int(dim)
    self.name = f"FixedDimQuadraticFamily_{self.dim}"

  def sample(self, key):
    return jax.random.normal(key, (self.dim,))

  def task_fn(self, task_param):
    return _QuadraticTask(task_param)
