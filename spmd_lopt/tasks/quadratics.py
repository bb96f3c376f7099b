"""Quadratic task families: the smallest problems a learned optimizer is meta-trained on.

``FixedDimQuadraticFamily(dim)``: each task is a bowl ``L(p) = sum_j (c_j - p_j)^2`` with a
target ``c ~ N(0, I_dim)`` sampled per task and parameters initialised ``p ~ N(0, I_dim)``.
No data. ``E[L(p_0)] = 2 * dim``.

``NoisyQuadraticFamily(dim)``: ``L(p) = 1/2 (p-c)^T A (p-c) + s e.(p-c)`` with a random
condition number of ``A``, a random rotation, and a per-task gradient-noise level ``s``
applied through the on-device batch ``e ~ N(0, I)``.
"""

from __future__ import annotations

import flax
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


# ---------------------------------------------------------------- noisy, ill-conditioned


@flax.struct.dataclass
class NoisyQuadraticParam:
  """One noisy quadratic: ``A = Q diag(eigs) Q^T``, minimiser ``center``.

  center: f32[d]. eigs: f32[d] in ``[1/cond, 1]``. rotation: f32[d, d] orthogonal ``Q``
  (identity when the family does not rotate). noise_std: f32[] gradient-noise scale.
  """
  center: jax.Array
  eigs: jax.Array
  rotation: jax.Array
  noise_std: jax.Array


class _NoisyQuadraticTask(base.Task):
  """``L(p; e) = 1/2 (p - c)^T A (p - c) + s * e . (p - c)`` with the batch ``e ~ N(0,
  I_d)``: ``E_e[L] = 1/2 (p - c)^T A (p - c)`` and ``grad L = A (p - c) + s e``."""

  def __init__(self, tp: NoisyQuadraticParam):
    self.tp = tp
    self.name = "NoisyQuadratic"

  def init(self, key):
    return jax.random.normal(key, self.tp.center.shape)

  def sample_batch(self, key, split="train"):
    del split  # every split is the same distribution
    return jax.random.normal(key, self.tp.center.shape)

  def loss(self, params, key, data):
    del key
    r = params - self.tp.center
    z = self.tp.rotation.T @ r  # coordinates in A's eigenbasis
    clean = 0.5 * jnp.sum(self.tp.eigs * jnp.square(z))
    return clean + self.tp.noise_std * jnp.dot(data, r)

  def normalizer(self, loss):
    # as the reference's quadratic-with-data family: clip to [0, 1000]; NaN -> 1000
    return jnp.where(jnp.isnan(loss), 1000.0, jnp.clip(loss, 0.0, 1000.0))


class NoisyQuadraticFamily(base.TaskFamily):
  """Quadratics with a random condition number and gradient-noise level per task.

  Per task: ``log cond ~ U[0, log max_condition]``; eigenvalues ``exp(-log cond * u_j)``
  with ``u_j`` evenly spaced on ``[0, 1]`` (so ``eigs`` spans ``[1/cond, 1]``);
  ``log s ~ U[log min_noise, log max_noise]``; ``c ~ N(0, I_d)``; ``Q`` Haar-random
  orthogonal (QR of a Gaussian, signs fixed) if ``rotate`` else ``I``. Init ``p ~ N(0, I)``.
  """

  def __init__(self, dim: int = 10, max_condition: float = 100.0, min_noise: float = 0.01,
               max_noise: float = 1.0, rotate: bool = True):
    if int(dim) <= 0 or max_condition < 1 or not 0 < min_noise <= max_noise:
      raise ValueError("NoisyQuadraticFamily: need dim > 0, max_condition >= 1 and "
                       f"0 < min_noise <= max_noise; got {dim}, {max_condition}, "
                       f"{min_noise}, {max_noise}.")
    self.dim = int(dim)
    self.max_condition = float(max_condition)
    self.min_noise, self.max_noise = float(min_noise), float(max_noise)
    self.rotate = bool(rotate)
    self.name = f"NoisyQuadraticFamily_{self.dim}"

  def sample(self, key):
    kc, kq, kn, kr = jax.random.split(key, 4)
    log_cond = jax.random.uniform(kc, (), minval=0.0, maxval=jnp.log(self.max_condition))
    eigs = jnp.exp(-log_cond * jnp.linspace(0.0, 1.0, self.dim))
    log_s = jax.random.uniform(kn, (), minval=jnp.log(self.min_noise),
                               maxval=jnp.log(self.max_noise))
    if self.rotate:
      q, r = jnp.linalg.qr(jax.random.normal(kq, (self.dim, self.dim)))
      rotation = q * jnp.sign(jnp.diag(r))[None, :]  # makes Q Haar-distributed
    else:
      rotation = jnp.eye(self.dim)
    return NoisyQuadraticParam(center=jax.random.normal(kr, (self.dim,)), eigs=eigs,
                               rotation=rotation, noise_std=jnp.exp(log_s))

  def task_fn(self, task_param):
    return _NoisyQuadraticTask(task_param)
