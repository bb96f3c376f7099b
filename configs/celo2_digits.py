"""The Celo2 recipe offline: ``configs/celo2.py`` on four tasks made from the embedded digits.

Trains: ``Celo2`` (347 meta-parameters) with the paper's recipe, unchanged (PES with trunc 50
and std 0.01, 8 tasks per estimator, lengths log-uniform in [100, 2000] staggered by up to
2,000 steps, global reparametrisation in [1e-3, 1e3], AdamW 5e-5 with weight decay 1e-4,
100,000 outer iterations, a checkpoint every 5,000), on the task set ``celo2_digits``: the
1,797 8x8 digits shipped in the package as they are, inverted, pixel-permuted and
label-permuted (README "Tasks"). Every task has the paper's per-iteration shapes (batch 64
of 8x8x1 images, MLP 64-32-10 ReLU, 2,410 parameters, meta-loss clipped to [0, 1.5 ln 10]),
so an iteration costs what one of the paper's does. Nothing is downloaded.

Time on this 2-core CPU, 1 device, (loaded: 8 developers sharing it): TIME_FIGURES
Expected result: META_LOSS_FIGURES

Commands:
  python -m spmd_lopt.launch --config configs/celo2_digits.py --workdir runs/celo2_digits
A short run that shows the meta-loss falling (SHORT_RUN_MINUTES):
  SHORT_RUN_COMMAND
"""

import ml_collections

TASK_SET = ("ImageMLP_Digits8_Relu32_B64", "ImageMLP_Digits8Inverted_Relu32_B64",
            "ImageMLP_Digits8PixelPerm_Relu32_B64", "ImageMLP_Digits8LabelPerm_Relu32_B64")


def get_config():
  c = ml_collections.ConfigDict()
  c.name = "celo2_digits"
  c.seed = 0
  c.outer_steps = 100_000
  c.log_every = 50
  c.checkpoint_every = 5_000
  c.lopt = dict(name="celo2", step_mult=1e-3, regex_1d="/b$")
  c.outer_opt = dict(name="adamw", learning_rate=5e-5, weight_decay=1e-4, b1=0.9, b2=0.999,
                     eps=1e-8, schedule=dict(name="constant"))
  common = dict(name="pes", num_tasks=8, trunc_length=50, std=0.01,
                random_initial_iteration_offset=2000,
                truncation=dict(name="log_uniform", min_length=100, max_length=2000),
                augmentation=dict(name="reparam_global", param_scale_range=[1e-3, 1e3]))
  c.estimators = [dict(common, task=t) for t in TASK_SET]
  return c
