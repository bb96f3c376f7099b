"""Truncation schedules: how long each inner trajectory runs before it is reset.

A schedule is a pure pair ``init(key, outer_state) -> TruncationState`` (sample the length
of a new trajectory) and ``next_state(state, step, key, outer_state) -> (state, is_done)``
(is the trajectory that has taken ``step`` inner steps finished?). The vectorized truncated
step calls ``init`` whenever it resets a task, so a fresh length is drawn per trajectory.
"""

from __future__ import annotations

import math
from typing import Any

import flax
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class TruncationState:
  """length: int32 scalar, the number of inner steps of the current trajectory."""
  length: jax.Array


class TruncationSchedule:

  def init(self, key: jax.Array, outer_state: Any) -> TruncationState:
    raise NotImplementedError

  def next_state(self, state: TruncationState, step: jax.Array, key: jax.Array,
                 outer_state: Any) -> tuple[TruncationState, jax.Array]:
    del key, outer_state
    return state, step >= state.length

  @property
  def max_length(self) -> int:
    raise NotImplementedError


def _positive_int(name: str, value) -> int:
  if int(value) != value or int(value) <= 0:
    raise ValueError(f"{name} must be a positive integer, got {value!r}.")
  return int(value)


class ConstantTruncationSchedule(TruncationSchedule):
  """Every trajectory is ``total_length`` inner steps long."""

  def __init__(self, total_length: int):
    self.total_length = _positive_int("ConstantTruncationSchedule.total_length",
                                      total_length)

  def init(self, key, outer_state):
    del key, outer_state
    return TruncationState(length=jnp.asarray(self.total_length, jnp.int32))

  @property
  def max_length(self) -> int:
    return self.total_length


class LogUniformLengthSchedule(TruncationSchedule):
  """Lengths ``floor(exp(u))`` with ``u ~ U[log min_length, log max_length]``.

  Short and long trajectories are equally likely per octave, so the learned optimizer is
  meta-trained for many training horizons at once.
  """

  def __init__(self, min_length: int, max_length: int):
    self.min_length = _positive_int("LogUniformLengthSchedule.min_length", min_length)
    self.max_length_ = _positive_int("LogUniformLengthSchedule.max_length", max_length)
    if self.max_length_ < self.min_length:
      raise ValueError("LogUniformLengthSchedule: max_length must be >= min_length, got "
                       f"min_length={min_length}, max_length={max_length}.")

  def init(self, key, outer_state):
    del outer_state
    u = jax.random.uniform(key, (), minval=math.log(self.min_length),
                           maxval=math.log(self.max_length_))
    length = jnp.clip(jnp.floor(jnp.exp(u)), self.min_length, self.max_length_)
    return TruncationState(length=length.astype(jnp.int32))

  @property
  def max_length(self) -> int:
    return self.max_length_


class NeverEndingTruncationSchedule(TruncationSchedule):
  """Trajectories never end (used by estimators that manage whole unrolls themselves)."""

  def init(self, key, outer_state):
    del key, outer_state
    return TruncationState(length=jnp.asarray(jnp.iinfo(jnp.int32).max, jnp.int32))

  def next_state(self, state, step, key, outer_state):
    del step, key, outer_state
    return state, jnp.asarray(False)

  @property
  def max_length(self) -> int:
    return int(jnp.iinfo(jnp.int32).max)
