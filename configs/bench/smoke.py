"""Bench: a smoke run of the harness (every feature at tiny size).

Measures: PES on 10-d quadratics, trunc_length 5, 2 tasks/device weak scaling and 4 tasks
strong scaling over 1 and 2 (virtual) devices, host round-trip baseline, steps_per_call 1
vs 4, and 1 vs 2 processes (gloo). Numbers are dominated by dispatch overhead; use it to
check the harness, not to judge performance.

Takes about 1-2 minutes on the 2-core CPU machine (mostly compiles).

Command::

  PYTHONPATH=$PWD python -m spmd_lopt.bench --config configs/bench/smoke.py
"""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.name = "smoke"
  c.workloads = "quadratic"
  c.device_counts = "1,2"
  c.tasks_per_device = "2"
  c.strong_total_tasks = "4"
  c.trunc_length = 5
  c.steps_per_call = "1,4"
  c.host_baseline = True
  c.mp_processes = 2
  c.mp_tasks_per_process = 2
  return c
