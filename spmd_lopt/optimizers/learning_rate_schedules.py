"""Learning-rate schedules under the reference library's names.

A schedule is a callable ``(step, max_steps=None) -> value`` (float32 scalar), jittable in
``step``. Use one as an optimizer's ``learning_rate`` through ``as_optax`` (optax
schedules take only the step).
"""

from __future__ import annotations

from typing import Optional, Protocol, Sequence, runtime_checkable

import jax.numpy as jnp
import numpy as np
import optax


@runtime_checkable
class ScalarSchedule(Protocol):
  """``(step, max_steps=None) -> value``."""

  def __call__(self, step, max_steps=None):
    ...


def as_optax(schedule: ScalarSchedule, max_steps: Optional[int] = None) -> optax.Schedule:
  """Bind ``max_steps`` so the schedule can be given to an optax optimizer."""
  return lambda step: schedule(step, max_steps)


class CosineLearningRateSchedule:
  """Linear warmup from 0, a constant phase, then a half-cosine decay.

  With ``T = max_steps``, ``C = constant_fraction * T`` and
  ``W = max(warmup_fraction, constant_fraction) * T``:
  ``lr(t) = t / W * learning_rate`` while ``t < W`` (only if ``warmup_fraction > 0``),
  then ``lr_min + (learning_rate - lr_min) * (1 + cos(pi * (max(t, C) - C) / (T - C))) / 2``
  with ``lr_min = min_learning_rate_mult * learning_rate``; ``t`` is capped at ``T``.
  """

  def __init__(self, learning_rate: float, min_learning_rate_mult: float = 0.0,
               constant_fraction: float = 0.5, warmup_fraction: float = 0.01):
    self.learning_rate = learning_rate
    self.min_learning_rate_mult = min_learning_rate_mult
    self.constant_fraction = constant_fraction
    self.warmup_fraction = warmup_fraction

  def __call__(self, step, max_steps):
    if max_steps is None:
      raise ValueError("CosineLearningRateSchedule needs max_steps.")
    total = jnp.asarray(max_steps, jnp.float32)
    t = jnp.minimum(jnp.asarray(step, jnp.float32), total)
    const = total * self.constant_fraction
    lr_min = self.min_learning_rate_mult * self.learning_rate
    phase = (jnp.maximum(t, const) - const) / (total - const)
    decayed = lr_min + (self.learning_rate - lr_min) * (jnp.cos(phase * np.pi) / 2 + 0.5)
    if self.warmup_fraction <= 0.0:
      return decayed
    warmup = total * max(self.warmup_fraction, self.constant_fraction)
    return jnp.where(t < warmup, t / warmup * self.learning_rate, decayed)


class LinearRampupSqrtDecay:
  """``peak_lr * min(t / warmup_steps, sqrt(warmup_steps / t))`` with ``t >= 1``."""

  def __init__(self, peak_lr: float = 1e-3, warmup_steps: int = 1000):
    self.peak_lr = peak_lr
    self.warmup_steps = warmup_steps

  def __call__(self, step, max_steps=None):
    t = jnp.maximum(jnp.asarray(step, jnp.float32), 1.0)
    w = jnp.float32(self.warmup_steps)
    return self.peak_lr * jnp.minimum(t / w, jnp.sqrt(w / t))


class PiecewiseLinear:
  """Linear between the points ``(times[i], vals[i])``, constant outside them."""

  def __init__(self, times: Sequence[float], vals: Sequence[float]):
    if len(times) != len(vals) or not times:
      raise ValueError(f"PiecewiseLinear needs as many times as vals (>= 1), got "
                       f"{len(times)} and {len(vals)}.")
    self.times = np.asarray(times, np.float32)
    self.vals = np.asarray(vals, np.float32)

  def __call__(self, step, max_steps=None):
    return jnp.interp(jnp.asarray(step, jnp.float32), self.times, self.vals)


class ExponentialDecay:
  """``base_lr * (1 - decay_amount) ** step``."""

  def __init__(self, base_lr: float, decay_amount: float):
    self.base_lr = base_lr
    self.decay_amount = decay_amount

  def __call__(self, step, max_steps=None):
    return self.base_lr * (1.0 - self.decay_amount) ** jnp.asarray(step, jnp.float32)
