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


class ScheduledTruncationSchedule(TruncationSchedule):
  """Lengths that follow the outer iteration: ``schedule(outer_iteration)`` (called with
  ``max_steps=`` when given, as the reference's scalar schedules are), optionally jittered
  by ``round(N(0, std^2))`` and then kept ``>= min_length``.

  Its maximum length is not known statically, so it drives the truncated estimators
  (PES, NRES, TruncatedGrad); whole-unroll estimators need a ``max_length`` and refuse it.
  """

  def __init__(self, schedule, max_steps=None, std: float = 0, min_length: int = 10):
    if not callable(schedule):
      raise ValueError("ScheduledTruncationSchedule.schedule must be callable "
                       f"(outer_iteration -> length), got {schedule!r}.")
    if std < 0:
      raise ValueError(f"ScheduledTruncationSchedule.std must be >= 0, got {std!r}.")
    self.schedule = schedule
    self.max_steps = max_steps
    self.std = std
    self.min_length = _positive_int("ScheduledTruncationSchedule.min_length", min_length)

  def init(self, key, outer_state):
    it = outer_state.outer_iteration
    if self.max_steps is None:
      length = self.schedule(it)
    else:
      length = self.schedule(it, max_steps=self.max_steps)
    length = jnp.asarray(length)
    if self.std > 0:
      shift = jnp.round(jax.random.normal(key) * self.std)
      length = jnp.maximum(length + shift, self.min_length)
    return TruncationState(length=jnp.asarray(length).astype(jnp.int32))

  @property
  def max_length(self) -> int:
    raise ValueError("ScheduledTruncationSchedule has no static max_length")
