"""Throughput, scaling and cost benchmark of the fused SPMD meta step.

``python -m spmd_lopt.bench --config configs/bench/tutorial.py`` measures, for one config
(``configs/bench/*.py``), over a grid of device counts, tasks per device, estimators and
workloads: compile time and program size, steady-state time per meta step (median and
spread) and inner task-steps/s, weak and strong scaling, FLOPs and bytes from XLA's cost
analysis (loop-corrected) with the roofline fraction against a measured matmul peak,
device memory and tasks/device capacity, the host round-trip and host-fed baselines,
``steps_per_call`` and ``reset_mode`` A/Bs, multi-process weak scaling, and a projected
wall time for N outer iterations.

Modules, one idea each:

- ``config``: the config schema (every key and its default), loading, overrides;
- ``workloads``: task families by name and the learners built on them;
- ``measure``: timing one point in this process;
- ``cost_model``: FLOPs, bytes, memory, collectives and program size from XLA;
- ``orchestrate``: the grid of points and the subprocesses that run them;
- ``stats``: timing statistics and scaling arithmetic (pure numpy);
- ``summary``: figures derived from the records;
- ``report``: strict JSON, CSV, PNG, table and text summary;
- ``cli``: ``run_bench`` and the command line.
"""

from spmd_lopt.bench.cli import main, run_bench
from spmd_lopt.bench.config import default_config, load_config
from spmd_lopt.bench.orchestrate import plan, run_multiprocess, run_points
from spmd_lopt.bench.summary import summarize

__all__ = ["main", "run_bench", "default_config", "load_config", "plan", "run_points",
           "run_multiprocess", "summarize"]
