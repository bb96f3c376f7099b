"""Quadratic tasks and task families: the smallest problems a learned optimizer meets.

As the reference library (``learned_optimization.tasks.quadratics``), every init is
``p ~ N(0, I_dim)``:

- ``QuadraticTask(dim=10)``: ``L(p) = sum_j p_j^2``; no data.
- ``BatchQuadraticTask()``: the same loss on ``dim = 10``; its ``datasets`` are host
  iterators of ``f32[4, 2]`` Gaussian noise that the loss ignores (it exists to exercise
  host-fed data).
- ``FixedDimQuadraticFamily(dim)``: ``L(p) = sum_j (c_j - p_j)^2`` with ``c ~ N(0, I)`` per
  task; no data; ``E[L(p_0)] = 2 dim``.
- ``FixedDimQuadraticFamilyData(dim)``: ``L(p; e) = sum_j (c_j - p_j)^2 + e`` with a host
  batch ``e ~ N(0, 1)`` (a scalar per step); ``loss_and_aux`` adds ``l2 = mean(p^2)`` and
  ``l1 = mean(|p|)``; ``normalizer = clip(., 0, 1000)``.
- ``NoisyQuadraticFamily(dim, cov)``: per task ``c ~ N(0, I)`` and ``a ~ 25 U[0, 1]^dim``;
  ``L(p) = sum_j (a_j (c_j - p_j))^2`` in value, and the gradient gets the extra noise
  ``cov * z`` with ``z ~ N(0, I)`` drawn from the loss's key (the zero-valued term
  ``n - stop_gradient(n)`` with ``n = cov * z * p``).

And one of ours:

- ``RotatedNoisyQuadraticFamily(dim)``: ``L(p) = 1/2 (p-c)^T A (p-c) + s e.(p-c)`` with a
  random condition number of ``A``, a random rotation, and a per-task gradient-noise
  level ``s`` applied through the on-device batch ``e ~ N(0, I)``.
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np

from spmd_lopt.tasks import base, datasets_base


class QuadraticTask(base.Task):
  """``L(p) = sum(p^2)``, ``p_0 ~ N(0, I_dim)``."""

  def __init__(self, dim: int = 10):
    self._dim = int(dim)
    self.name = "QuadraticTask"

  def init(self, key):
    return jax.random.normal(key, (self._dim,))

  def loss(self, params, key, data):
    del key, data
    return jnp.sum(jnp.square(params))


def _noise_iterator(shape, seed):
  rng = np.random.default_rng(seed)
  while True:
    yield rng.normal(size=shape).astype(np.float32)


def _noise_datasets(shape) -> datasets_base.Datasets:
  """Four independent host streams of ``f32[shape]`` standard normal noise."""
  its = [datasets_base.ThreadSafeIterator(_noise_iterator(shape, seed)) for seed in range(4)]
  return datasets_base.Datasets(*its, abstract_batch=jax.ShapeDtypeStruct(shape,
                                                                          jnp.float32))


@datasets_base.dataset_lru_cache
def batch_datasets() -> datasets_base.Datasets:
  return _noise_datasets((4, 2))


@datasets_base.dataset_lru_cache
def noise_datasets() -> datasets_base.Datasets:
  return _noise_datasets(())


class BatchQuadraticTask(QuadraticTask):
  """``QuadraticTask(10)`` with host-iterator ``datasets`` (batches ``f32[4, 2]``, unused by
  the loss)."""

  def __init__(self):
    super().__init__(10)
    self.name = "BatchQuadraticTask"

  @property
  def datasets(self):
    return batch_datasets()


class _QuadraticTask(base.Task):

  def __init__(self, center: jax.Array):
    self._center = center
    self.name = "FixedDimQuadratic"

  def init(self, key):
    return jax.random.normal(key, self._center.shape)

  def loss(self, params, key, data):
    del key, data
    return jnp.sum(jnp.square(self._center - params))


class _QuadraticDataTask(_QuadraticTask):

  def __init__(self, center):
    super().__init__(center)
    self.name = "FixedDimQuadraticData"

  @property
  def datasets(self):
    return noise_datasets()

  def loss(self, params, key, data):
    return super().loss(params, key, data) + data

  def loss_and_aux(self, params, key, data):
    return self.loss(params, key, data), {"l2": jnp.mean(params ** 2),
                                          "l1": jnp.mean(jnp.abs(params))}

  def normalizer(self, loss):
    return jnp.clip(loss, 0.0, 1000.0)


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


class FixedDimQuadraticFamilyData(FixedDimQuadraticFamily):
  """``FixedDimQuadraticFamily`` plus a host-fed scalar noise batch added to the loss."""

  def __init__(self, dim: int = 10):
    super().__init__(dim)
    self.name = f"FixedDimQuadraticFamilyData_{self.dim}"

  @property
  def datasets(self):
    return noise_datasets()

  def task_fn(self, task_param):
    return _QuadraticDataTask(task_param)


class _ScaledNoisyQuadraticTask(base.Task):

  def __init__(self, center, scale, cov):
    self.center, self.scale, self.cov = center, scale, cov
    self.name = "NoisyQuadratic"

  def init(self, key):
    return jax.random.normal(key, self.center.shape)

  def loss(self, params, key, data):
    del data
    noise = self.cov * jax.random.normal(key, self.center.shape) * params
    # zero in value, ``noise`` in gradient: only the gradient is noisy
    grad_noise = noise - jax.lax.stop_gradient(noise)
    return jnp.sum(jnp.square(self.scale * (self.center - params)) + grad_noise)


class NoisyQuadraticFamily(base.TaskFamily):
  """The reference's noisy quadratics; task param ``(center, scale)``, see the module
  docstring."""

  scale_constant = 25.0

  def __init__(self, dim: int, cov: float):
    if int(dim) <= 0 or not float(cov) >= 0:
      raise ValueError(f"NoisyQuadraticFamily: need dim > 0 and cov >= 0, got {dim}, {cov}.")
    self.dim = int(dim)
    self.cov = float(cov)
    self.name = f"NoisyQuadraticFamily_{self.dim}"

  def sample(self, key):
    k_center, k_scale = jax.random.split(key)
    center = jax.random.normal(k_center, (self.dim,))
    scale = jax.random.uniform(k_scale, (self.dim,)) * self.scale_constant
    return (center, scale)

  def task_fn(self, task_param):
    center, scale = task_param
    return _ScaledNoisyQuadraticTask(center, scale, self.cov)


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
    self.name = "RotatedNoisyQuadratic"

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


class RotatedNoisyQuadraticFamily(base.TaskFamily):
  """Quadratics with a random condition number and gradient-noise level per task.

  Per task: ``log cond ~ U[0, log max_condition]``; eigenvalues ``exp(-log cond * u_j)``
  with ``u_j`` evenly spaced on ``[0, 1]`` (so ``eigs`` spans ``[1/cond, 1]``);
  ``log s ~ U[log min_noise, log max_noise]``; ``c ~ N(0, I_d)``; ``Q`` Haar-random
  orthogonal (QR of a Gaussian, signs fixed) if ``rotate`` else ``I``. Init ``p ~ N(0, I)``.
  """

  def __init__(self, dim: int = 10, max_condition: float = 100.0, min_noise: float = 0.01,
               max_noise: float = 1.0, rotate: bool = True):
    if int(dim) <= 0 or max_condition < 1 or not 0 < min_noise <= max_noise:
      raise ValueError("RotatedNoisyQuadraticFamily: need dim > 0, max_condition >= 1 and "
                       f"0 < min_noise <= max_noise; got {dim}, {max_condition}, "
                       f"{min_noise}, {max_noise}.")
    self.dim = int(dim)
    self.max_condition = float(max_condition)
    self.min_noise, self.max_noise = float(min_noise), float(max_noise)
    self.rotate = bool(rotate)
    self.name = f"RotatedNoisyQuadraticFamily_{self.dim}"

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
