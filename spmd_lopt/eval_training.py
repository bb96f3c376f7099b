"""Kept import path: the training-curve programs live in ``spmd_lopt.evaluation.training``."""

from spmd_lopt.evaluation.training import (  # noqa: F401
    eval_step_schedule, multi_seed_training_curves, single_task_training_curves,
    training_curves_fn)
