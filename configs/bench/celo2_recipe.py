"""Bench: the Celo2 meta-training recipe's shape (issue 13's target workload).

Four PES estimators (antithetic pairs not stacked), 8 tasks each, on the synthetic 8x8
image MLP (64 -> 32 -> 10 ReLU, inner batch 64: the shape of the paper's four 8x8 data
sets without needing their files), trunc_length 50, lengths LogUniform(100, 2000) with an
initial offset of up to 2000, the ``celo2`` learned optimizer. Per outer iteration
4 x 8 x 2 x 50 = 3,200 inner steps. Measured on 1 and 2 devices (8 tasks per estimator
in total), with the ``reset_mode`` A/B (cond vs select) on 1 device, and every record
carries ``projected_wall_s`` for the paper's 100k outer iterations (compile and
checkpoints excluded). The outer optimizer is the library's Adam (the paper uses AdamW
with weight decay; on 347 meta-parameters its cost is negligible).

PES's halves stay unstacked here, as in every earlier snapshot: on 2 devices that is
1.02-1.05x faster than stacking them, but on 1 device (process free to use both cores)
stacked, the CLI configs' default, is now 1.24x faster (``docs/PERFORMANCE.md``, round
seven), so this file's 1-device point is slower than ``configs/celo2_digits.py`` there.

Names that this install lacks (``celo2`` in the learned-optimizer registry, the
synthetic 8x8 family, the ``reset_mode`` option) make their points ``skipped`` with the
reason; nothing fails.

Time and result on this 2-core CPU (2026-12-07, load 1.2-1.6, matmul peak 250 GFLOP/s,
Celo2's fused CPU kernels; ``docs/bench/celo2_recipe_2026-12-07_kernels/``): ~1.5 minutes
with ``--config.reset_modes=""``; 0.208 s per outer iteration on 1 device and 0.116 s on 2,
projected 5.8 h and 3.2 h for 100k iterations (the paper: ~4.5 A100-hours; before the
kernels 0.61 s and 0.27 s, 17 h and 7.4 h).

Command::

  PYTHONPATH=$PWD python -m spmd_lopt.bench --config configs/bench/celo2_recipe.py
"""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.name = "celo2_recipe"
  c.workloads = "synthetic8,synthetic8,synthetic8,synthetic8"
  c.lopt = "celo2"
  c.batch_size = 64
  c.estimators = "pes"
  c.stack_antithetic = False
  c.device_counts = "1,2"
  c.tasks_per_device = ""
  c.strong_total_tasks = "8"
  c.trunc_length = 50
  c.min_length = 100
  c.max_length = 2000
  c.random_initial_iteration_offset = 2000
  c.std = 0.01
  c.outer_lr = 5e-5
  c.warmup = 1
  c.repeats = 5
  c.min_time_s = 3.0
  c.steps_per_call = ""
  c.reset_modes = "cond,select"
  c.host_baseline = False
  c.mp_processes = 0
  c.project_outer_iterations = 100000
  c.peak_matmul_n = 2048
  return c
