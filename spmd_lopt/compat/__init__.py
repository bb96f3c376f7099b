"""The reference library's host-side surface, kept apart from the fused core.

- ``host_api``: ``GradientLearner``, ``gradient_worker_compute``, ``AggregatedGradient``,
  ``WorkerComputeOut``, ``GradientLearnerState``, ``ParameterCheckpoint``,
  ``OptCheckpoint`` and ``HostSingleMachineGradientLearner`` (the fallback that
  ``SingleMachineGradientLearner`` uses for estimators written to the reference's
  interface only). Re-exported from ``outer_trainers.gradient_learner``, the reference's
  import path.
- ``state_files``: ``save_state`` / ``load_state`` (flax msgpack, the reference's bytes),
  re-exported from ``spmd_lopt.checkpoints``.
"""

from spmd_lopt.compat.host_api import (  # noqa: F401
    AggregatedGradient, GradientLearner, GradientLearnerState,
    HostSingleMachineGradientLearner, OptCheckpoint, ParameterCheckpoint, WorkerComputeOut,
    gradient_worker_compute, has_fused_contract, warn_host_fallback)
from spmd_lopt.compat.state_files import load_state, load_state_dict, save_state  # noqa: F401
