"""The reference's older estimator constructors, accepted beside today's.

``learned_optimization``'s older estimators took the task family first
(``TruncatedPES(task_family, learned_opt, trunc_sched, num_tasks, ...)``, with
``train_and_meta`` for an outer-valid meta-loss); its unit tests and many scripts still
call them so. ``reference_form`` lets an estimator's ``__init__`` take that form too, by
turning it into today's keyword arguments (a truncated step built from the parts).
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

from spmd_lopt.outer_trainers import lopt_truncated_step
from spmd_lopt.tasks import base as tasks_base


def reference_form(legacy: Callable[..., dict]):
  """Decorate an estimator's ``__init__`` so it also takes the reference's older
  constructor, whose first argument is the task family (``TruncatedPES(task_family,
  learned_opt, trunc_sched, num_tasks=..., ...)``).

  ``legacy`` has that older signature (Python's own argument binding rejects an unknown or
  missing argument) and returns the keyword arguments of the current ``__init__``; it
  builds the truncated step the older form implies. Any other call is passed through.
  """
  def decorate(init):
    @functools.wraps(init)
    def wrapped(self, *args, **kwargs):
      if args and isinstance(args[0], tasks_base.TaskFamily):
        return init(self, **legacy(*args, **kwargs))
      return init(self, *args, **kwargs)
    return wrapped
  return decorate


def reference_meta_loss_split(who: str, train_and_meta: bool, meta_loss_split):
  """The older ``train_and_meta=True`` (the meta-loss on an ``outer_valid`` batch after
  each update) as today's ``meta_loss_split``."""
  if train_and_meta and meta_loss_split not in (None, "outer_valid"):
    raise ValueError(f"{who}: train_and_meta=True means meta_loss_split='outer_valid'; "
                     f"got meta_loss_split={meta_loss_split!r} too.")
  return "outer_valid" if train_and_meta else meta_loss_split


def antithetic_form(task_family, learned_opt, trunc_sched, num_tasks,
                               trunc_length: int = 10, random_initial_iteration_offset: int = 0,
                               std: float = 0.01, steps_per_jit: Optional[int] = 10,
                               train_and_meta: bool = False,
                               stack_antithetic_samples: bool = False,
                               sign_delta_loss_scalar: Optional[float] = None,
                               meta_loss_split: Optional[str] = None,
                               clip_nan_loss_to_value: float = 20.0) -> dict:
  """The reference's older ``TruncatedPES(task_family, learned_opt, trunc_sched,
  num_tasks, ...)`` as keyword arguments of ``AntitheticTruncatedEstimator``."""
  split = reference_meta_loss_split("TruncatedPES", train_and_meta, meta_loss_split)
  step = lopt_truncated_step.VectorizedLOptTruncatedStep(
      task_family, learned_opt, trunc_sched, num_tasks, meta_loss_split=split,
      random_initial_iteration_offset=random_initial_iteration_offset)
  return dict(truncated_step=step, trunc_length=trunc_length, std=std,
              steps_per_jit=steps_per_jit, stack_antithetic_samples=stack_antithetic_samples,
              sign_delta_loss_scalar=sign_delta_loss_scalar,
              clip_nan_loss_to_value=clip_nan_loss_to_value)
