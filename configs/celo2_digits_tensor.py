"""Ablation "tensor": ``pretrained:celo2_digits`` meta-trained further with per-tensor scales.

Trains: ``Celo2`` (347 meta-parameters, ``step_mult`` 1e-3, biases on its Adam branch),
starting from the shipped theta ``pretrained:celo2_digits`` (2,300 outer steps of the
offline recipe), with the recipe of ``configs/celo2_digits_long.py`` (the four offline
digit tasks ``celo2_digits``, 4 PES estimators x 8 tasks, truncations of 50 steps, std
0.01, lengths log-uniform in [100, 1000] staggered by up to 1,000 steps, outer AdamW 1e-3,
weight decay 1e-4) except the augmentation: ``reparam_tensor``, one log-uniform scale in
[1e-3, 1e3] per parameter tensor instead of one per task (Celo2's ``reparam_global``).
Seed 4. The question: do layers whose gradients and weights live at different scales (the
suite's wider and deeper MLPs, the LayerNorm MLP, the autoencoder) get a better step from
a rule trained to be invariant to each tensor's scale separately?

Time: an outer iteration costs what the parent recipe's does (the scales are one multiply
per tensor); on this 2-core CPU, 1 device, shared (load average ~10): compile 3 minutes,
then 0.62 outer steps/s, 15 minutes wall for the 450 steps. Result: meta-loss 1.04 -> 0.98
(first vs last 6 logs; lower than the others' because of the augmentation, not comparable);
on the ``full`` suite's five 300-step digits entries loss-ratio IQM 1.57 as trained and 1.18
[0.825, 1.57] tuned (worse than the parent's 0.982), speedup IQM 0.704 / 0.759 [0.535,
1.17] (better than the parent's 0.694; best on the autoencoder: 0.726 / 1.38). Figures:
docs/eval/ablations.md.

Command:
  nice python -m spmd_lopt.launch --config configs/celo2_digits_tensor.py \\
      --workdir runs/tensor
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import celo2_digits_short  # noqa: E402  (configs/ is not a package)


def get_config():
  c = celo2_digits_short.get_config()
  c.name = "celo2_digits_tensor"
  c.seed = 4
  c.outer_steps = 450
  c.log_every = 10
  c.checkpoint_every = 50
  c.lopt.init_from = "pretrained:celo2_digits"
  c.estimators = [dict(e, augmentation=dict(e["augmentation"], name="reparam_tensor"))
                  for e in c.estimators]
  return c
