"""Estimator constructor arguments: one-line errors for bad values, and the truncated
step built from its parts when an estimator is given those instead of a ready step.
"""

from __future__ import annotations

from spmd_lopt.outer_trainers import lopt_truncated_step
from spmd_lopt.outer_trainers import truncated_step as truncated_step_lib
from spmd_lopt.tasks import base as tasks_base


def positive_int(who: str, name: str, value) -> int:
  if isinstance(value, bool) or int(value) != value or value <= 0:
    raise ValueError(f"{who}: {name} must be a positive integer, got {value!r}.")
  return int(value)


def check_steps_per_jit(who: str, steps_per_jit) -> None:
  """``steps_per_jit`` is the reference's host-loop chunk; here every unroll is one program,
  so it is accepted (any positive integer, or None) and has no effect."""
  if steps_per_jit is not None:
    positive_int(who, "steps_per_jit", steps_per_jit)


def check_step(who: str, truncated_step) -> None:
  if not isinstance(truncated_step, truncated_step_lib.VectorizedTruncatedStep):
    raise TypeError(f"{who}: truncated_step must be a VectorizedTruncatedStep, got "
                    f"{type(truncated_step).__name__}.")


def build_truncated_step(truncated_step, task_family, learned_opt, trunc_sched, num_tasks,
                         random_initial_iteration_offset, who: str):
  """Accept either a ready truncated step or the pieces to build one (keyword
  construction), and fail clearly on a mix or a gap."""
  if isinstance(truncated_step, tasks_base.TaskFamily):
    task_family, truncated_step = truncated_step, None
  if truncated_step is not None:
    check_step(who, truncated_step)
    return truncated_step
  missing = [n for n, v in [("task_family", task_family), ("learned_opt", learned_opt),
                            ("trunc_sched", trunc_sched), ("num_tasks", num_tasks)]
             if v is None]
  if missing:
    raise ValueError(f"{who}: pass truncated_step=..., or all of task_family, "
                     f"learned_opt, trunc_sched, num_tasks (missing: {missing}).")
  return lopt_truncated_step.VectorizedLOptTruncatedStep(
      task_family, learned_opt, trunc_sched, num_tasks,
      random_initial_iteration_offset=random_initial_iteration_offset)
