"""The benchmark's config schema: every key with its default, loading and overrides.

A bench config file (``configs/bench/*.py``) defines ``get_config()`` returning an
``ml_collections.ConfigDict`` of overrides of ``default_config()``; ``--config.KEY=VALUE``
on the command line overrides single keys. Unknown keys are a one-line ``ValueError``.
"""

from __future__ import annotations

import importlib.util
from typing import Optional

import ml_collections


def default_config() -> ml_collections.ConfigDict:
  """Every bench config key with its default (a tiny smoke run)."""
  c = ml_collections.ConfigDict()
  c.name = "smoke"
  c.seed = 0
  # Grid. Workloads: ';'-separated sets of ','-separated family names, one estimator each,
  # all in one learner (one fused step). A name is a bench workload name
  # (``workloads.TASK_FAMILIES``) or any task-registry family name.
  c.workloads = "quadratic"
  c.estimators = "pes"
  c.device_counts = "1,2"
  c.tasks_per_device = "2"        # weak scaling: each value, over device_counts
  c.strong_total_tasks = "4"      # strong scaling: each value (per estimator), over counts
  c.trunc_length = 5
  c.min_length = 20
  c.max_length = 60
  c.random_initial_iteration_offset = 60
  c.std = 0.01
  c.lopt = "mlp_lopt"             # any name in the learned-optimizer registry
  c.outer_lr = 1e-3
  c.batch_size = 0                # image tasks' inner batch; 0 = the task's default
  c.stack_antithetic = True       # TruncatedPES.stack_antithetic_samples
  c.xla_flags = ""                # extra XLA_FLAGS for the CPU worker subprocesses
  # Timing.
  c.warmup = 1
  c.repeats = 3                   # at least this many timed calls ...
  c.min_time_s = 0.5              # ... and more (up to max_repeats) until this much time
  c.max_repeats = 200
  # Extras ('' or 0 disables).
  c.steps_per_call = "1,4"        # measured on 1 device at the smallest strong total
  c.reset_modes = ""              # e.g. "cond,select": A/B of the truncated step's resets
  c.host_baseline = True          # on 1 device at each strong total
  c.host_fed = False              # ablation: host-made batches vs on-device drawing (1 device)
  c.mp_processes = 0              # >1: multi-process weak scaling, 1 vs this many
  c.mp_tasks_per_process = 4
  c.mp_port = 0                   # 0: pick a free port
  c.mp_pin = True                 # pin process i to core i (os.sched_setaffinity)
  c.project_outer_iterations = 0  # >0: every record gets projected_wall_s for this many
  c.peak_matmul_n = 1024          # size of the square f32 matmul timed for the peak
  c.memory_budget_gb = 0.0        # 0: 90% of accelerator memory, or RAM / devices on CPU
  c.subprocess = True             # CPU: a fresh process per device count
  c.worker_timeout_s = 1800
  c.plots = True
  return c


def load_config(path: Optional[str]) -> ml_collections.ConfigDict:
  """``default_config()`` updated with ``path``'s ``get_config()`` (if a path is given)."""
  cfg = default_config()
  if path:
    spec = importlib.util.spec_from_file_location("spmd_lopt_bench_config", path)
    if spec is None or spec.loader is None:
      raise ValueError(f"bench config {path!r} is not a Python file.")
    mod = importlib.util.module_from_spec(spec)
    try:
      spec.loader.exec_module(mod)
    except FileNotFoundError:
      raise ValueError(f"bench config {path!r} does not exist.") from None
    over = mod.get_config()
    unknown = sorted(set(over.keys()) - set(cfg.keys()))
    if unknown:
      raise ValueError(f"Unknown bench config key(s) {unknown}; known: {sorted(cfg.keys())}.")
    cfg.update(dict(over))
  return cfg


def apply_override(cfg: ml_collections.ConfigDict, key: str, value: str) -> None:
  """Set ``cfg[key]`` from the string ``value``, converted to the default's type."""
  if key not in cfg:
    raise ValueError(f"Unknown bench config key {key!r}; known: {sorted(cfg.keys())}.")
  old = cfg[key]
  if isinstance(old, bool):
    cfg[key] = value.lower() in ("1", "true", "yes")
    return
  try:
    cfg[key] = type(old)(value)
  except ValueError:
    raise ValueError(f"bench config key {key!r} wants a {type(old).__name__}, "
                     f"got {value!r}.") from None


def ints(s) -> list[int]:
  """``"1,2,4"`` (or a list) -> ``[1, 2, 4]``; ``""`` -> ``[]``."""
  if isinstance(s, (list, tuple)):
    return [int(x) for x in s]
  return [int(x) for x in str(s).split(",") if str(x).strip()]


def names(s: str) -> list[str]:
  """``"cond, select"`` -> ``["cond", "select"]``."""
  return [x.strip() for x in str(s).split(",") if x.strip()]


def workloads(s: str) -> list[list[str]]:
  """``"quadratic,image_mlp;quadratic"`` -> ``[["quadratic", "image_mlp"], ["quadratic"]]``."""
  return [names(w) for w in s.split(";") if w.strip()]
