"""Bench: what a data set costs each compiled meta step (issue 16, item 10).

One PES estimator, 8 tasks, trunc_length 20, MLPLOpt, 1 device, on two data sets: the
embedded 8x8 digits (``image_mlp``: 1,797 x 8x8 uint8, 115 KB) and an MNIST-size data
set (``mnist_size``: random uint8 28x28x1 images in MNIST's split sizes, 55 MB). Records
``compile_s`` / ``first_call_s`` and ``program_size`` (lowered StableHLO text bytes and the
bytes of its dense constants): a data set closed over by the program shows up there as a
constant, one passed as an argument does not.

Takes about 1-2 minutes on the shared 2-core CPU machine.

Command::

  PYTHONPATH=$PWD python -m spmd_lopt.bench --config configs/bench/data_args.py
"""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.name = "data_args"
  c.workloads = "image_mlp;mnist_size"
  c.device_counts = "1"
  c.tasks_per_device = ""
  c.strong_total_tasks = "8"
  c.trunc_length = 20
  c.min_length = 100
  c.max_length = 300
  c.random_initial_iteration_offset = 300
  c.warmup = 1
  c.repeats = 3
  c.min_time_s = 1.0
  c.steps_per_call = ""
  c.host_baseline = False
  c.mp_processes = 0
  c.peak_matmul_n = 512
  c.plots = False
  return c
