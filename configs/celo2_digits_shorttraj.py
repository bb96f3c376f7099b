"""Ablation "short": ``pretrained:celo2_digits`` meta-trained further on short trajectories.

Trains: ``Celo2`` (347 meta-parameters, ``step_mult`` 1e-3, biases on its Adam branch),
starting from the shipped theta ``pretrained:celo2_digits`` (2,300 outer steps of the
offline recipe), with the recipe of ``configs/celo2_digits_long.py`` (the four offline
digit tasks ``celo2_digits``, 4 PES estimators x 8 tasks, truncations of 50 steps, std
0.01, global reparametrisation in [1e-3, 1e3], outer AdamW 1e-3, weight decay 1e-4) except
the trajectories: log-uniform in [100, 300] with starts staggered by up to 300 steps (the
parent saw [100, 1000] and 1,000). Seed 5. The opposite of ``celo2_digits_longtraj.py``:
the parent is slow early (it reaches tuned Adam's final loss late on the suite's 300-step
entries); a meta-objective that only sees the first 300 steps weighs that early phase more.
The risk is the suite's 5x horizon (1,500 steps), which it never sees.

Time: an outer iteration costs what the parent recipe's does (the truncation is still 50
steps); on this 2-core CPU, shared, see docs/notes/meta2.md for compile time, seconds per
step and wall time of ``outer_steps`` below. Figures: docs/notes/meta2.md.

Command:
  nice python -m spmd_lopt.launch --config configs/celo2_digits_shorttraj.py \\
      --workdir runs/shorttraj
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import celo2_digits_short  # noqa: E402  (configs/ is not a package)


def get_config():
  c = celo2_digits_short.get_config()
  c.name = "celo2_digits_shorttraj"
  c.seed = 5
  c.outer_steps = 450
  c.log_every = 10
  c.checkpoint_every = 50
  c.lopt.init_from = "pretrained:celo2_digits"
  c.estimators = [dict(e, random_initial_iteration_offset=300,
                       truncation=dict(e["truncation"], max_length=300))
                  for e in c.estimators]
  return c
