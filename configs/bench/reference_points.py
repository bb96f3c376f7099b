"""Bench: the three points issue 13 compares with the reference library (PES, MLPLOpt,
trunc_length 50, LogUniformLengthSchedule(100, 300), as the tutorial).

- ``quadratic`` (FixedDimQuadraticFamily(10)), 64 tasks, 1 device: reference 22.2 ms per
  meta step (target <= 4.4 ms, 5x);
- ``image_mlp`` (ImageMLP_Digits8_Relu32), 16 tasks, 1 device: reference 297 ms
  (target <= 99 ms, 3x);
- ``image_mlp``, 64 tasks, 2 devices (both cores; the reference's TruncatedPESPMAP on 2
  devices): reference 744 ms (target <= 298 ms, 2.5x).

Strong scaling at 16 and 64 tasks over 1 and 2 devices measures these three points plus
five neighbours (the same workloads at the other task count / device count), which show
how each figure moves with tasks and devices. The points of interest are the rows
``quadratic dev=1 tasks/dev=64``, ``image_mlp dev=1 tasks/dev=16`` and ``image_mlp dev=2
tasks/dev=32``. About 5 minutes on the quiet 2-core machine.

Command::

  PYTHONPATH=$PWD python -m spmd_lopt.bench --config configs/bench/reference_points.py
"""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.name = "reference_points"
  c.workloads = "quadratic;image_mlp"
  c.estimators = "pes"
  c.device_counts = "1,2"
  c.tasks_per_device = ""
  c.strong_total_tasks = "16,64"
  c.trunc_length = 50
  c.min_length = 100
  c.max_length = 300
  c.random_initial_iteration_offset = 300
  c.warmup = 1
  c.repeats = 5
  c.min_time_s = 3.0
  c.steps_per_call = ""
  c.host_baseline = False
  c.host_fed = False
  c.mp_processes = 0
  c.peak_matmul_n = 2048
  c.plots = False
  return c
