"""Bench: the reference tutorial workload (acceptance workload of issue 8).

Measures two workloads. (1) The acceptance workload: one fused learner with two PES
estimators, FixedDimQuadraticFamily(10) and the 8x8 image MLP (``image_mlp``:
``ImageMLP_Digits8_Relu32`` on the embedded digits), 16 tasks each,
trunc_length 50, MLPLOpt, LogUniformLengthSchedule(100, 300). (2) The quadratic estimator
alone (small tasks: dispatch-bound). For each: strong scaling at 16 tasks per estimator over
1, 2, 4, 8 (virtual) devices; weak scaling at 2 tasks/device/estimator; the 1-device points
at 2 and 16 tasks feed the memory fit; host round-trip baseline at 16 tasks; for (1) the
ablation of batches drawn on device vs made on the host and fed in (host_fed); steps_per_call
1 vs 4. Multi-process weak scaling 1 vs 2 processes (one core each, gloo) on workload (1)
at 8 tasks per process per estimator.

Takes about 6 minutes on the 2-core CPU machine when quiet (5 min 50 s on 2026-12-07, load
1.1 -> 2.3), ~10 at load ~7 (compiles of 5-30 s per point, ~0.2 s per meta step of workload
(1) at 16+16 tasks). Expect (that run): fused vs host round trip ~1.5x, 2 processes vs 1
~1.9x in weak scaling; figures in the README's *Benchmark*.

Command::

  PYTHONPATH=$PWD python -m spmd_lopt.bench --config configs/bench/tutorial.py
"""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.name = "tutorial"
  c.workloads = "quadratic,image_mlp;quadratic"
  c.estimators = "pes"
  c.device_counts = "1,2,4,8"
  c.tasks_per_device = "2"
  c.strong_total_tasks = "16"
  c.trunc_length = 50
  c.min_length = 100
  c.max_length = 300
  c.random_initial_iteration_offset = 300
  c.warmup = 1
  c.repeats = 5
  c.min_time_s = 3.0
  c.steps_per_call = "1,4"
  c.host_baseline = True
  c.host_fed = True               # ablation: batches drawn on device vs host-fed
  c.mp_processes = 2
  c.mp_tasks_per_process = 8
  c.peak_matmul_n = 2048
  return c
