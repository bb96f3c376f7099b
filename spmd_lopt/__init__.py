"""spmd_lopt: meta-train learned optimizers with one fused SPMD program per meta step.

The public layout mirrors google/learned_optimization so that its scripts port by changing
imports:

- ``spmd_lopt.tasks``: inner problems (``base.Task``, ``base.TaskFamily``, ``quadratics``).
- ``spmd_lopt.optimizers``: hand-designed optimizers behind the ``Optimizer`` interface.
- ``spmd_lopt.learned_optimizers``: ``LearnedOptimizer`` and ``MLPLOpt``.
- ``spmd_lopt.outer_trainers``: truncation schedules, the vectorized truncated step,
  gradient estimators and the learners.
- ``spmd_lopt.sharding``: meshes, shardings and multi-host start-up.
"""

__version__ = "0.1.0"
