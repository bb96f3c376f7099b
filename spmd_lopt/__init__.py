"""spmd_lopt: meta-train learned optimizers with one fused SPMD program per meta step.

The core (everything one meta step touches, and nothing else), named as in
google/learned_optimization so that its scripts port by changing imports:

- ``tasks``: inner problems (``Task``, ``TaskFamily``; quadratics, fixed and parametric
  image tasks) and ``datasets``, the on-device image data they sample from;
- ``optimizers`` and ``learned_optimizers``: hand-designed and learned update rules;
- ``inner_step``: the one inner training step every unroll and evaluation uses;
- ``outer_trainers``: truncation schedules, the vectorized truncated step, the gradient
  estimators (one ``init``/``estimate`` interface) and the learner's fused ``meta_step``;
- ``sharding``: meshes and shardings (replicated theta, task-sharded unroll states).

The shell, each in a room of its own: ``launch`` + ``train`` (the command-line trainer
and its loop helpers), ``multihost`` (multi-process start-up and agreement), ``config``
(run configs to learners), ``checkpoints`` (orbax run state), ``evaluation`` (curves,
sweeps, the held-out suite; ``python -m spmd_lopt.evaluate``), ``bench`` (throughput,
scaling and cost), ``compat`` (the reference's host-driven API), ``summary`` and
``tree_utils`` (the reference's helpers).
"""

__version__ = "0.1.0"
