"""The shipped ``pretrained:celo2_digits_short``: Celo2 meta-trained briefly, offline.

Trains: ``Celo2`` (347 meta-parameters, ``step_mult`` 1e-3, biases on its Adam branch via
``regex_1d`` "/b$") with the Celo2 recipe shortened for a 2-core CPU: 4 PES estimators (one
per task of the offline set ``celo2_digits``: the embedded 8x8 digits as they are, inverted,
pixel-permuted, label-permuted), 8 tasks each, truncations of 50 steps, std 0.01, antithetic
halves unstacked, trajectories log-uniform in [100, 1000] staggered by up to 1,000 steps,
global reparametrisation in [1e-3, 1e3]; outer AdamW 1e-3 (the paper's 5e-5 moves theta too
little in a short run, see ``configs/celo2_digits.py``) with weight decay 1e-4; a checkpoint
every 100 steps.

Time on this 2-core CPU, 1 device, with other jobs on the machine: compile 3-4 minutes, then
about 2 s per outer step; the shipped theta is the checkpoint at ``outer_steps`` below (its
metadata records the wall time). Expected: the meta-loss falls from ~2.9 (10-step means) as
in the short runs of ``configs/celo2_digits.py``; the held-out suite's figures for the shipped
theta are in the README, "Results".

Commands:
  python -m spmd_lopt.launch --config configs/celo2_digits_short.py --workdir runs/celo2_short
  python scripts/ship_pretrained.py --workdir runs/celo2_short --name celo2_digits_short \\
      --reproduce configs/celo2_digits_short.py
"""

import ml_collections

TASK_SET = ("ImageMLP_Digits8_Relu32_B64", "ImageMLP_Digits8Inverted_Relu32_B64",
            "ImageMLP_Digits8PixelPerm_Relu32_B64", "ImageMLP_Digits8LabelPerm_Relu32_B64")


def get_config():
  c = ml_collections.ConfigDict()
  c.name = "celo2_digits_short"
  c.seed = 0
  c.outer_steps = 1100
  c.log_every = 20
  c.checkpoint_every = 100
  c.checkpoint_every_secs = 0.0
  c.lopt = dict(name="celo2", step_mult=1e-3, regex_1d="/b$")
  c.outer_opt = dict(name="adamw", learning_rate=1e-3, weight_decay=1e-4)
  common = dict(name="pes", num_tasks=8, trunc_length=50, std=0.01,
                random_initial_iteration_offset=1000,
                truncation=dict(name="log_uniform", min_length=100, max_length=1000),
                augmentation=dict(name="reparam_global", param_scale_range=[1e-3, 1e3]),
                options=dict(stack_antithetic_samples=False))
  c.estimators = [dict(common, task=t) for t in TASK_SET]
  return c
