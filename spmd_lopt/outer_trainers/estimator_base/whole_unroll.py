"""The base of the whole-unroll estimators (FullES, FullGrad): each call unrolls fresh
tasks for one length drawn from the estimator's own truncation schedule, so nothing is kept
between calls.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp

from spmd_lopt.outer_trainers import truncation_schedule as ts
from spmd_lopt.outer_trainers.estimator_base import arguments
from spmd_lopt.outer_trainers.estimator_base.interface import GradientEstimator


@flax.struct.dataclass
class FullUnrollWorkerState:
  """Whole-unroll estimators keep nothing between calls (each starts fresh tasks)."""


def check_never_ending(who: str, truncated_step) -> None:
  """Whole-unroll estimators own the unroll length; the inner trajectories must not end
  (and reset) inside it, or the "whole unroll" would silently span two tasks."""
  sched = getattr(truncated_step, "trunc_sched", None)
  if not isinstance(sched, ts.NeverEndingTruncationSchedule):
    raise ValueError(
        f"{who} unrolls whole trajectories whose length comes from its own "
        "truncation_schedule; the truncated step must be built with "
        "NeverEndingTruncationSchedule() so no trajectory resets inside an unroll (got "
        f"{type(sched).__name__}).")


def whole_unroll_lengths(who: str, truncation_schedule, chunk_length) -> tuple[int, int]:
  """``(max_length, chunk_length)`` for an estimator unrolling whole trajectories with
  lengths drawn from ``truncation_schedule``.

  The scan is static (one compiled program for every drawn length): ``ceil(max_length /
  chunk_length)`` chunks; steps at or past the drawn length are skipped at run time (see
  ``common.unroll_in_chunks``), so the chunk need not divide anything.
  """
  if isinstance(truncation_schedule, ts.NeverEndingTruncationSchedule):
    raise ValueError(f"{who}: truncation_schedule gives the unroll length and must be "
                     "finite (e.g. ConstantTruncationSchedule), not NeverEnding.")
  try:
    max_length = int(truncation_schedule.max_length)
  except (NotImplementedError, TypeError, ValueError) as e:
    raise ValueError(f"{who}: truncation_schedule must have a finite max_length "
                     f"({type(truncation_schedule).__name__}: {e}).") from None
  if chunk_length is None:
    return max_length, max_length
  return max_length, min(arguments.positive_int(who, "chunk_length", chunk_length), max_length)


def sample_length(truncation_schedule, key, outer_state, max_length: int) -> jax.Array:
  """One unroll length for this call (shared by all tasks, as in the reference), drawn
  from the replicated key so every device agrees, clipped to ``[1, max_length]`` and
  never rounded: int32 scalar."""
  length = truncation_schedule.init(key, outer_state).length
  return jnp.clip(length, 1, max_length).astype(jnp.int32)


class WholeUnrollEstimator(GradientEstimator):
  """The shared part of FullES and FullGrad: each call unrolls fresh tasks for a length
  drawn from ``self.truncation_schedule`` (at most ``self.max_length``), so nothing is
  kept between calls."""

  truncation_schedule: Any
  max_length: int

  def __init__(self, truncated_step, truncation_schedule, steps_per_jit, chunk_length,
               clip_nan_loss_to_value: float):
    """Checks and stores what both take: a never-ending truncated step, a finite
    ``truncation_schedule`` (its ``max_length`` bounds the scan), ``chunk_length`` (steps
    per chunk, clamped to ``max_length``), ``steps_per_jit`` (accepted, no effect)."""
    who = type(self).__name__
    arguments.check_step(who, truncated_step)
    check_never_ending(who, truncated_step)
    arguments.check_steps_per_jit(who, steps_per_jit)
    self.truncated_step = truncated_step
    self.truncation_schedule = truncation_schedule
    self.max_length, self.chunk_length = whole_unroll_lengths(who, truncation_schedule,
                                                              chunk_length)
    self.steps_per_jit = steps_per_jit
    self.clip_nan_loss_to_value = float(clip_nan_loss_to_value)

  def init_local(self, theta, outer_state, key, task_ids):
    del theta, outer_state, key, task_ids
    return FullUnrollWorkerState()

  def host_data_steps(self) -> int:
    return self.max_length

  def sample_length(self, key, outer_state):
    """This call's unroll length (int32 scalar in ``[1, max_length]``)."""
    return sample_length(self.truncation_schedule, key, outer_state, self.max_length)
