"""PES meta-training of MLPLOpt on random 10-d quadratic bowls (the issue-2 vertical slice).

Trains: ``MLPLOpt`` (1,762 meta-parameters) with antithetic truncated PES (std 0.01,
truncations of 50 inner steps, trajectories of log-uniform length 100-300, staggered) on
16 tasks of ``FixedDimQuadraticFamily(10)``, outer Adam(1e-3), 300 outer steps.

Time on this 2-core CPU: about 6 s on a quiet machine (4.4 s of it compiling, then ~300
outer steps/s).
Expected result: the meta-loss (mean inner training loss over a truncation) falls; seed 0:
18.1 -> 12.8 (means of the first and last 3 of 30 logs).

Command:
  python -m spmd_lopt.launch --config configs/pes_quadratic.py --workdir runs/pes_quadratic
"""

from spmd_lopt import config


def get_config():
  c = config.base_config()
  c.name = "pes_quadratic"
  c.tasks = "quadratic"
  c.quadratic_dim = 10
  c.num_tasks = 16
  c.trunc_length = 50
  c.min_length, c.max_length = 100, 300
  c.random_initial_iteration_offset = 300
  c.outer_steps = 300
  c.outer_lr = 1e-3
  return c
