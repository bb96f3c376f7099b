"""``pretrained:celo2_digits``: ``celo2_digits_short`` meta-trained further, offline.

Continues from the shipped theta ``pretrained:celo2_digits_short`` (1,100 outer steps of
``configs/celo2_digits_short.py``) with the same recipe: Celo2 (347 meta-parameters,
``step_mult`` 1e-3, biases on its Adam branch), 4 PES estimators on the offline digit set
``celo2_digits`` (plain, inverted, pixel-permuted, label-permuted), 8 tasks each,
truncations of 50 steps, trajectories log-uniform in [100, 1000], global reparametrisation
in [1e-3, 1e3], outer AdamW 1e-3 with weight decay 1e-4. What changes: the seed (1, so the
PES tasks, truncations and perturbations are new draws rather than a replay of the first
run's) and the outer optimizer's state, which starts fresh (only theta is carried over).

Commands (the first run is ``configs/celo2_digits_short.py``'s):
  python -m spmd_lopt.launch --config configs/celo2_digits_long.py --workdir runs/celo2_long
  python scripts/ship_pretrained.py --workdir runs/celo2_long --name celo2_digits \\
      --reproduce configs/celo2_digits_long.py --suite eval_quick/suite.json
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import celo2_digits_short  # noqa: E402  (configs/ is not a package)


def get_config():
  c = celo2_digits_short.get_config()
  c.name = "celo2_digits_long"
  c.seed = 1
  c.outer_steps = 1200
  c.lopt.init_from = "pretrained:celo2_digits_short"
  return c
