"""Kept import path: the training-curve programs live in ``spmd_lopt.evaluation.training``."""

from spmd_lopt.evaluation.training import (  # noqa: F401
    _curves_fn, _eval_steps, eval_step_schedule, multi_seed_training_curves,
    single_task_training_curves, training_curves_fn)
