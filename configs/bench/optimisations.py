"""Bench: optimisation trials on the tutorial workload, 1 device, 16+16 tasks.

Measures the fused step of the reference tutorial workload (quadratic + 8x8 digits image
MLP, PES, trunc_length 50, MLPLOpt) on one device with one knob changed from the tutorial
config; pick the knob with ``--config.KEY=VALUE``:

- ``--config.stack_antithetic=false``: PES runs the + and - halves as two scans;
- ``--config.reset_modes=cond,select``: the truncated step's reset branch, both ways
  (needs the ``reset_mode`` option; skipped otherwise);
- ``--config.lopt=NAME``: another registered learned optimizer;
- ``--config.xla_flags=...``: extra XLA flags for the worker process.

Each run takes about 1-2 minutes on the shared 2-core CPU machine (one compile of ~20-40 s
plus >= 5 s of timed steps). Run the baseline (no override) in the same session and compare
medians; docs/PERFORMANCE.md has the results.

Command::

  PYTHONPATH=$PWD python -m spmd_lopt.bench --config configs/bench/optimisations.py \
      --config.stack_antithetic=false --outdir bench_results/opt_unstacked
"""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.name = "optimisations"
  c.workloads = "quadratic,image_mlp"
  c.device_counts = "1"
  c.tasks_per_device = ""
  c.strong_total_tasks = "16"
  c.trunc_length = 50
  c.min_length = 100
  c.max_length = 300
  c.random_initial_iteration_offset = 300
  c.warmup = 1
  c.repeats = 7
  c.min_time_s = 5.0
  c.steps_per_call = ""
  c.host_baseline = False
  c.mp_processes = 0
  c.peak_matmul_n = 2048
  c.plots = False
  return c
