"""Ablation "long": ``pretrained:celo2_digits`` meta-trained further on the paper's lengths.

Trains: ``Celo2`` (347 meta-parameters, ``step_mult`` 1e-3, biases on its Adam branch),
starting from the shipped theta ``pretrained:celo2_digits`` (2,300 outer steps of the
offline recipe), with the recipe of ``configs/celo2_digits_long.py`` (the four offline
digit tasks ``celo2_digits``, 4 PES estimators x 8 tasks, truncations of 50 steps, std
0.01, global reparametrisation in [1e-3, 1e3], outer AdamW 1e-3, weight decay 1e-4)
except the trajectories: log-uniform in [100, 2000] with starts staggered by up to 2,000
steps, as in the paper (the parent saw [100, 1000] and 1,000). Seed 3. The question: does
training on longer trajectories fix the parent's slow start and carry over to the suite's
5x horizon (1,500 steps)?

Time: an outer iteration costs what the parent recipe's does (the truncation is still 50
steps); on this 2-core CPU, 1 device, shared (load average 8-10): compile 1.6 minutes,
then 0.6 outer steps/s, 15.5 minutes wall for the 500 steps. Result: meta-loss flat (1.48 ->
1.51, first vs last 6 logs); on the ``full`` suite's five 300-step digits entries (see
``celo2_digits_mix.py``) loss-ratio IQM 1.44 as trained, 1.02 [0.816, 1.3] with a tuned
multiplier, speedup IQM 0.646 / 0.673: slightly worse than the parent at 300 steps (its
1,500-step entries were not run). Figures: docs/eval/ablations.md.

Command:
  nice python -m spmd_lopt.launch --config configs/celo2_digits_longtraj.py \\
      --workdir runs/longtraj
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import celo2_digits_short  # noqa: E402  (configs/ is not a package)


def get_config():
  c = celo2_digits_short.get_config()
  c.name = "celo2_digits_longtraj"
  c.seed = 3
  c.outer_steps = 500
  c.log_every = 10
  c.checkpoint_every = 50
  c.lopt.init_from = "pretrained:celo2_digits"
  c.estimators = [dict(e, random_initial_iteration_offset=2000,
                       truncation=dict(e["truncation"], max_length=2000))
                  for e in c.estimators]
  return c
