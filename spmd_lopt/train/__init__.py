"""The pieces around ``spmd_lopt.launch.train``'s loop, one job each.

- ``stopping``: SIGTERM/SIGINT become a stop request; the processes of a multi-process
  run agree, every step, on stopping and on checkpointing (so a preemption is acted on
  at the next step everywhere);
- ``resume``: the run's checkpoints (restore, periodic and final saves);
- ``keys``: the run's key schedule from ``config.seed`` (learner init, theta, step keys);
- ``outputs``: metrics records, strict JSON files, progress, the summary.
"""
