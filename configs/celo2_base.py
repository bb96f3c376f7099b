"""Celo2-base (ICLR 2026): the Celo2 recipe without Newton-Schulz orthogonalisation.

Trains: ``Celo2Base`` (``Celo2(orthogonalize=False)``, 347 meta-parameters) with exactly the
recipe of ``configs/celo2.py`` (the four 8x8 image-MLP data sets, PES with trunc 50 and std
0.01, 8 tasks per data set, lengths log-uniform in [100, 2000], global reparametrisation,
100,000 outer iterations, a checkpoint every 5,000), except the outer learning rate: AdamW
1e-4 (Celo2 uses 5e-5), weight decay 1e-4, as in the paper.

Data: as ``configs/celo2.py`` (a missing set is one line naming files, directory and URL);
offline, use ``configs/celo2_digits.py --config.lopt.name=celo2_base
--config.outer_opt.learning_rate=1e-4``.

Time: less than an iteration of ``configs/celo2.py`` (no Newton-Schulz): on this 2-core CPU
(2026-12-07, load 1.1-1.4, Celo2's fused CPU kernels), the same shapes offline
(``configs/celo2_digits.py --config.lopt.name=celo2_base``, 100 steps, 2 devices): 27 s of
compiling, then 13.7 outer steps/s (0.073 s per iteration, ~2 hours for 100k).
Expected result: the paper's released Celo2-base after 100k iterations; no full run was made
here.

Command:
  python -m spmd_lopt.launch --config configs/celo2_base.py --workdir runs/celo2_base
Fine-tune the released Celo2-base weights:
  python -m spmd_lopt.launch --config configs/celo2_base.py \
      --config.lopt.init_from=celo2_base=path/to/celo2_base/theta.state
"""

import ml_collections

TASK_SET = ("ImageMLP_Cifar10Gray8_Relu32_B64", "ImageMLP_FashionMnist8_Relu32_B64",
            "ImageMLP_Mnist8_Relu32_B64", "ImageMLP_SvhnGray8_Relu32_B64")


def get_config():
  c = ml_collections.ConfigDict()
  c.name = "celo2_base"
  c.seed = 0
  c.outer_steps = 100_000
  c.log_every = 50
  c.checkpoint_every = 5_000
  c.lopt = dict(name="celo2_base", step_mult=1e-3, regex_1d="/b$")
  c.outer_opt = dict(name="adamw", learning_rate=1e-4, weight_decay=1e-4, b1=0.9, b2=0.999,
                     eps=1e-8, schedule=dict(name="constant"))
  common = dict(name="pes", num_tasks=8, trunc_length=50, std=0.01,
                random_initial_iteration_offset=2000,
                truncation=dict(name="log_uniform", min_length=100, max_length=2000),
                augmentation=dict(name="reparam_global", param_scale_range=[1e-3, 1e3]))
  c.estimators = [dict(common, task=t) for t in TASK_SET]
  return c
