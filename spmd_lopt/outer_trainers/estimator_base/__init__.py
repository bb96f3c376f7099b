"""What every gradient estimator builds on, one room per idea:

- ``interface``: the data types estimators and learners exchange (``OuterState``,
  ``WorkerWeights``, ``LocalEstimate``, ...) and ``GradientEstimator`` (the sharded
  ``init_local`` / ``estimate_local`` core and the reference's host API on top of it);
- ``per_task``: per-task reverse-mode gradients, NaN handling, the average over a slice;
- ``arguments``: constructor checks and the truncated step built from parts;
- ``antithetic``: the base of the antithetic truncated ES estimators (PES, NRES);
- ``whole_unroll``: the base of the whole-unroll estimators (FullES, FullGrad).

The estimators themselves (``truncated_pes``, ``truncated_nres``, ``truncated_grad``,
``full_es``, ``full_grad``) and the learner import these names from here.
"""

from spmd_lopt.outer_trainers.estimator_base.interface import (
    GradientEstimator, GradientEstimatorOut, LocalEstimate, MetaParams, OuterState,
    UnrollInfo, WorkerWeights, has_host_datasets)
from spmd_lopt.outer_trainers.estimator_base.per_task import (
    finish_estimate, per_task_grads, sanitize_per_task)
from spmd_lopt.outer_trainers.estimator_base.arguments import (
    build_truncated_step, check_step, check_steps_per_jit, positive_int)
from spmd_lopt.outer_trainers.estimator_base.antithetic import (
    AntitheticTruncatedEstimator, pes_weights)
from spmd_lopt.outer_trainers.estimator_base.whole_unroll import (
    FullUnrollWorkerState, WholeUnrollEstimator, check_never_ending, sample_length,
    whole_unroll_lengths)

__all__ = [
    "GradientEstimator", "GradientEstimatorOut", "LocalEstimate", "MetaParams", "OuterState",
    "UnrollInfo", "WorkerWeights", "has_host_datasets", "finish_estimate", "per_task_grads",
    "sanitize_per_task", "build_truncated_step", "check_step", "check_steps_per_jit",
    "positive_int", "AntitheticTruncatedEstimator", "pes_weights", "FullUnrollWorkerState",
    "WholeUnrollEstimator", "check_never_ending", "sample_length", "whole_unroll_lengths",
]
