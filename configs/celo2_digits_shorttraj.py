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
steps); on this 2-core CPU, 1 device, shared (load average 10-14): compile 4 minutes,
then 0.55 outer steps/s, 17 minutes wall for the 450 steps. Result: meta-loss 1.69 -> 1.64
(first vs last 6 logs); on the ``full`` suite's five 300-step digits entries loss-ratio IQM
1.57 as trained and 1.17 [0.898, 1.58] tuned (parent 0.982), speedup IQM 0.699 / 0.749
[0.526, 1.03] (parent 0.694): faster early, worse final loss. Figures: docs/eval/ablations.md.

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
