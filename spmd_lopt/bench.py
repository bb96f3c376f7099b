"""Throughput and scaling benchmark of the fused SPMD meta step: ``python -m spmd_lopt.bench``.

Usage::

  python -m spmd_lopt.bench --config configs/bench/tutorial.py [--config.KEY=VALUE ...] \
      [--outdir bench_results/<config.name>]

For one config (``configs/bench/*.py``, ``get_config()`` returning overrides of
``default_config()`` below) it measures, over a grid of device counts, tasks per device,
estimators and task-family workloads:

- **compile**: the first call of ``learner.update`` (``first_call_s`` = trace + lower +
  compile + one step) and ``compile_s = first_call_s - median step``, apart from the steady
  state;
- **steady state**: ``warmup`` untimed calls, then ``repeats`` timed calls, each
  ``jax.block_until_ready``-ed; median and IQR/min/max of the time per meta step; meta
  steps/s and inner task-steps/s (``tasks x trunc_length x 2`` antithetic per meta step),
  total and per device;
- **weak scaling** (fixed tasks per device, 1..N devices; efficiency ``T1 / TN``) and
  **strong scaling** (fixed total tasks; efficiency ``T1 / (N * TN)``);
- **FLOPs and bytes** of one step from XLA's cost analysis (corrected for XLA counting a
  ``while`` body once: ``+ (trunc_length - 1) x`` the cost of one inner step), achieved
  FLOP/s and its fraction of a measured f32 matmul peak (roofline fraction); device memory
  from ``compiled.memory_analysis()``, bytes per task from a linear fit over tasks per
  device, and the largest tasks/device that fits ``memory_budget_gb``;
- **host round-trip baseline**: the same estimators driven the reference way
  (``gradient_worker_compute`` per step, numpy aggregation on the host, then
  ``GradientLearner.update``), as a ratio to the fused step;
- **steps_per_call**: several meta steps per dispatch (``learner.update_many``) vs 1;
- **multi-process** weak scaling on one machine: 1 vs ``mp_processes`` processes, each
  pinned to its own core, one CPU device each, gloo collectives.

On CPU every device count runs in a fresh subprocess (``--worker``), because the forced
device count (``XLA_FLAGS=--xla_force_host_platform_device_count=N``) is fixed when jax is
imported. With real accelerators the points run in-process on subsets of
``jax.devices()``. Writes ``results.json``, ``results.csv``, PNG plots and prints a table.

``results.json``: ``meta`` (config, device_kind, platform, jax_version, python, cpu_count,
cpu_affinity, hostname, load_avg_before/after, wall_s, date), ``peak_matmul`` (n,
flops_per_s), ``results`` (one record per point: kind = fused | host_baseline |
multiprocess, families, task_impl, estimator, num_devices, num_processes, tasks_per_device,
total_tasks_per_estimator, trunc_length, steps_per_call, first_call_s, compile_s,
step_time_s {median, q25, q75, min, max, n}, meta_steps_per_s, inner_steps_per_meta_step,
inner_steps_per_s, inner_steps_per_s_per_device, flops_per_step, bytes_per_step (totals over
devices, loop-corrected), xla_flops_per_step_per_device_raw, inner_step_cost_per_device,
achieved_flops_per_s, roofline_fraction, memory_per_device {argument, output, alias, temp,
generated_code, total}, all_reduce_ops, scaling tags, error if it failed) and ``summary``
(weak, strong, host_ratio, steps_per_call, multiprocess, memory).

Task families are pluggable by name (``TASK_FAMILIES``). ``image_mlp`` is the 8x8-digits
MLP of the reference tutorial; until ``spmd_lopt.tasks.fixed.image_mlp`` is merged it
resolves to ``StandInImageMLP`` (same shapes and cost, synthetic data), and every result
records which implementation ran (``task_impl``).
"""

from __future__ import annotations

import csv
import json
import os
import platform
import socket
import subprocess
import sys
import time
from typing import Any, Callable, Optional, Sequence

import numpy as np

# --- pure helpers (no jax): statistics and scaling math -------------------------------


def summarize_times(times: Sequence[float]) -> dict[str, float]:
  """Median, quartiles, min, max and count of per-step times (seconds)."""
  t = np.asarray(list(times), dtype=np.float64)
  if t.size == 0:
    raise ValueError("summarize_times needs at least one timing.")
  q25, med, q75 = np.percentile(t, [25, 50, 75])
  return {"median": float(med), "q25": float(q25), "q75": float(q75),
          "min": float(t.min()), "max": float(t.max()), "n": int(t.size)}


def weak_scaling(times_by_n: dict[int, float]) -> dict[int, dict[str, float]]:
  """Weak scaling (fixed work per device): efficiency ``T1 / TN``, speedup ``N * T1 / TN``
  in throughput. ``times_by_n``: device count -> time per meta step; needs ``1``."""
  if 1 not in times_by_n:
    raise ValueError("weak_scaling needs the 1-device time.")
  t1 = times_by_n[1]
  return {n: {"time_s": t, "efficiency": t1 / t, "throughput_speedup": n * t1 / t}
          for n, t in sorted(times_by_n.items())}


def strong_scaling(times_by_n: dict[int, float]) -> dict[int, dict[str, float]]:
  """Strong scaling (fixed total work): speedup ``T1 / TN``, efficiency ``T1 / (N TN)``."""
  if 1 not in times_by_n:
    raise ValueError("strong_scaling needs the 1-device time.")
  t1 = times_by_n[1]
  return {n: {"time_s": t, "speedup": t1 / t, "efficiency": t1 / (n * t)}
          for n, t in sorted(times_by_n.items())}


def inner_steps_per_meta_step(tasks_per_estimator: Sequence[int], trunc_length: int,
                              antithetic: int = 2) -> int:
  """Inner task-steps in one meta step: ``sum(tasks) x trunc_length x 2`` (PES)."""
  return int(sum(tasks_per_estimator)) * int(trunc_length) * int(antithetic)


def fit_memory(points: Sequence[tuple[int, float]]) -> tuple[float, float]:
  """Least-squares ``bytes = fixed + per_task * tasks`` over ``(tasks, bytes)`` points.

  With one distinct task count, ``fixed = 0`` and ``per_task = bytes / tasks`` (an upper
  bound on the per-task cost, so the fitted capacity is a lower bound)."""
  pts = sorted(set((int(n), float(b)) for n, b in points))
  if not pts:
    raise ValueError("fit_memory needs at least one point.")
  ns = np.array([p[0] for p in pts], np.float64)
  bs = np.array([p[1] for p in pts], np.float64)
  if len(set(ns)) < 2:
    return 0.0, float(np.max(bs / ns))
  per_task, fixed = np.polyfit(ns, bs, 1)
  return float(max(fixed, 0.0)), float(max(per_task, 1.0))


def max_tasks_within(budget_bytes: float, fixed: float, per_task: float,
                     multiple: int = 1) -> int:
  """Largest tasks/device (a multiple of ``multiple``) with ``fixed + per_task n <= budget``."""
  if per_task <= 0:
    raise ValueError("per_task must be positive.")
  n = int((budget_bytes - fixed) // per_task)
  return max(0, n - n % multiple)


def corrected_cost(step_cost: float, inner_step_cost: float, trunc_length: int) -> float:
  """XLA's cost analysis counts a ``while`` body once; the step runs the inner step
  ``trunc_length`` times, so add ``trunc_length - 1`` more inner steps."""
  return float(step_cost) + (int(trunc_length) - 1) * float(inner_step_cost)


def load_average() -> Optional[list[float]]:
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return None


def _ints(s) -> list[int]:
  if isinstance(s, (list, tuple)):
    return [int(x) for x in s]
  return [int(x) for x in str(s).split(",") if str(x).strip()]


def _workloads(s: str) -> list[list[str]]:
  """``"quadratic,image_mlp;quadratic"`` -> ``[["quadratic", "image_mlp"], ["quadratic"]]``."""
  return [[n.strip() for n in w.split(",") if n.strip()] for w in s.split(";") if w.strip()]


# --- config ---------------------------------------------------------------------------


def default_config():
  """Every bench config key with its default (a tiny smoke run)."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  c = ml_collections.ConfigDict()
  c.name = "smoke"
  c.seed = 0
  # Grid. Workloads: ';'-separated sets of ','-separated family names, one estimator each,
  # all in one learner (one fused step).
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
  c.lopt = "mlp_lopt"              # or "mlp_lopt_unfactored" (the pre-factoring A/B baseline)
  c.outer_lr = 1e-3
  c.stack_antithetic = True       # TruncatedPES.stack_antithetic_samples
  c.xla_flags = ""                # extra XLA_FLAGS for the CPU worker subprocesses
  # Timing.
  c.warmup = 1
  c.repeats = 3                   # at least this many timed calls ...
  c.min_time_s = 0.5              # ... and more (up to max_repeats) until this much time
  c.max_repeats = 200
  # Extras ('' or 0 disables).
  c.steps_per_call = "1,4"        # measured on 1 device at the smallest strong total
  c.host_baseline = True          # on 1 device at each strong total
  c.host_fed = False              # ablation: host-made batches vs on-device drawing (1 device)
  c.mp_processes = 0              # >1: multi-process weak scaling, 1 vs this many
  c.mp_tasks_per_process = 4
  c.mp_port = 0                   # 0: pick a free port
  c.mp_pin = True                 # pin process i to core i (os.sched_setaffinity)
  c.peak_matmul_n = 1024          # size of the square f32 matmul timed for the peak
  c.memory_budget_gb = 0.0        # 0: 90% of accelerator memory, or RAM / devices on CPU
  c.subprocess = True             # CPU: a fresh process per device count
  c.worker_timeout_s = 1800
  c.plots = True
  return c


def load_config(path: Optional[str]):
  import ml_collections  # pylint: disable=import-outside-toplevel
  cfg = default_config()
  if path:
    import importlib.util  # pylint: disable=import-outside-toplevel
    spec = importlib.util.spec_from_file_location("spmd_lopt_bench_config", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    over = mod.get_config()
    unknown = sorted(set(over.keys()) - set(cfg.keys()))
    if unknown:
      raise ValueError(f"Unknown bench config key(s) {unknown}; known: {sorted(cfg.keys())}.")
    cfg.update(dict(over))
  assert isinstance(cfg, ml_collections.ConfigDict)
  return cfg


# --- task families (pluggable by name) ------------------------------------------------


def _standin_image_mlp_family():
  """``StandInImageMLP``: a stand-in for ``ImageMLP_Digits8_Relu32`` (being built on
  another branch): 64 -> 32 (ReLU) -> 10 MLP, softmax cross-entropy, batch 128 drawn from a
  fixed synthetic data set of 1,797 8x8 "images" (the size of sklearn's digits). Same
  shapes and cost per step as the real task; the data is NOT digits. Switch to the real task
  on merge (``image_mlp`` does so automatically when the module exists)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from spmd_lopt.tasks import base  # pylint: disable=import-outside-toplevel

  rng = np.random.RandomState(0)
  images = rng.uniform(0, 16, size=(1797, 64)).astype(np.float32) / 16.0
  labels = rng.randint(0, 10, size=(1797,)).astype(np.int32)

  class StandInImageMLP(base.Task):
    name = "StandInImageMLP_8x8_Relu32"

    def init(self, key):
      k0, k1 = jax.random.split(key)
      return {"w0": jax.random.normal(k0, (64, 32)) / 8.0, "b0": jnp.zeros((32,)),
              "w1": jax.random.normal(k1, (32, 10)) / np.sqrt(32.0), "b1": jnp.zeros((10,))}

    def sample_batch(self, key, split="train"):
      del split
      idx = jax.random.randint(key, (128,), 0, images.shape[0])
      return {"image": jnp.asarray(images)[idx], "label": jnp.asarray(labels)[idx]}

    def loss(self, params, key, data):
      del key
      h = jax.nn.relu(data["image"] @ params["w0"] + params["b0"])
      logits = h @ params["w1"] + params["b1"]
      logp = jax.nn.log_softmax(logits)
      return -jnp.mean(jnp.take_along_axis(logp, data["label"][:, None], axis=1))

  return base.single_task_to_family(StandInImageMLP(), name="StandInImageMLP_8x8_Relu32")


def _image_mlp_family():
  """The real 8x8-digits MLP when merged, else the stand-in. Returns ``(family, impl)``."""
  try:
    from spmd_lopt.tasks.fixed import image_mlp  # pylint: disable=import-outside-toplevel
    from spmd_lopt.tasks import base  # pylint: disable=import-outside-toplevel
    task = image_mlp.ImageMLP_Digits8_Relu32()
    fam = task if hasattr(task, "task_fn") else base.single_task_to_family(task)
    return fam, "real:ImageMLP_Digits8_Relu32"
  except ImportError:
    return _standin_image_mlp_family(), "stand-in:StandInImageMLP (synthetic data)"


def _quadratic_family():
  from spmd_lopt.tasks import quadratics  # pylint: disable=import-outside-toplevel
  return quadratics.FixedDimQuadraticFamily(10), "FixedDimQuadraticFamily(10)"


TASK_FAMILIES: dict[str, Callable[[], tuple[Any, str]]] = {
    "quadratic": _quadratic_family,
    "image_mlp": _image_mlp_family,
    "image_mlp_standin": lambda: (_standin_image_mlp_family(), "stand-in:StandInImageMLP"),
}


def register_task_family(name: str, builder: Callable[[], tuple[Any, str]]) -> None:
  """Add a family: ``builder() -> (TaskFamily, description)``."""
  TASK_FAMILIES[name] = builder


def make_family(name: str):
  if name not in TASK_FAMILIES:
    raise ValueError(f"Unknown bench task family {name!r}; known: {sorted(TASK_FAMILIES)}.")
  return TASK_FAMILIES[name]()


# --- optimisation prototypes (bench-only; proposed for the library) --------------------


def unfactored_mlp_lopt(**kw):
  """``MLPLOpt`` as first written: the MLP applied to the full ``[n, 19]`` feature matrix
  (the A/B baseline of the factored first layer that ``MLPLOpt`` now uses; see
  docs/PERFORMANCE.md). Same theta, same numbers up to float rounding."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from spmd_lopt.learned_optimizers import mlp_lopt as ml  # pylint: disable=import-outside-toplevel

  class UnfactoredMLPLOpt(ml.MLPLOpt):

    def opt_fn(self, theta, is_training=False):
      base_opt = super().opt_fn(theta, is_training)
      exp_mult, step_mult, mlp = self.exp_mult, self.step_mult, self._mlp
      decays = jnp.asarray(ml.MOMENTUM_DECAYS, jnp.float32)

      class _Opt(type(base_opt)):

        def update(self, opt_state, grad, loss=None, model_state=None, key=None, **kw):
          del loss, key, kw
          moms = jax.tree.map(lambda m, g: decays * m + (1 - decays) * g[..., None],
                              opt_state.rolling_features, grad)
          step_features = ml.tanh_embedding(opt_state.iteration)

          def update_tensor(p, g, m):
            n = max(p.size, 1)
            tf = jnp.concatenate([g.reshape(n, 1), p.reshape(n, 1),
                                  m.reshape(n, m.shape[-1])], axis=-1)
            tf = ml.second_moment_normalizer(tf.astype(jnp.float32), [0])
            feats = jnp.concatenate(
                [tf, jnp.broadcast_to(step_features, (n, step_features.shape[0]))], -1)
            out = mlp.apply(theta, feats)
            step = out[:, 0] * jnp.exp(out[:, 1] * exp_mult) * step_mult
            return p - step.reshape(p.shape).astype(p.dtype)

          params = jax.tree.map(update_tensor, opt_state.params, grad, moms)
          state = opt_state.state if model_state is None else model_state
          return ml.MLPLOptState(params=params, rolling_features=moms,
                                 iteration=opt_state.iteration + 1, state=state)

      return _Opt()

  return UnfactoredMLPLOpt(**kw)


# --- building learners ----------------------------------------------------------------


def _library_cfg(bcfg, num_tasks: int):
  from spmd_lopt import config as config_lib  # pylint: disable=import-outside-toplevel
  c = config_lib.base_config()
  c.num_tasks = int(num_tasks)
  for k in ("trunc_length", "min_length", "max_length", "random_initial_iteration_offset",
            "std", "outer_lr"):
    c[k] = bcfg[k]
  c.lopt = "mlp_lopt" if bcfg.lopt == "mlp_lopt_unfactored" else bcfg.lopt
  return c


def build_estimators(bcfg, families: Sequence[str], estimator: str, num_tasks: int, lopt):
  from spmd_lopt import config as config_lib  # pylint: disable=import-outside-toplevel
  c = _library_cfg(bcfg, num_tasks)
  c.estimator = estimator
  ests, impls = [], {}
  for name in families:
    fam, impl = make_family(name)
    impls[name] = impl
    est = config_lib.make_estimator(fam, lopt, c)
    if hasattr(est, "stack_antithetic_samples"):
      est.stack_antithetic_samples = bool(bcfg.stack_antithetic)
    ests.append(est)
  return ests, impls


def make_lopt(bcfg, c):
  from spmd_lopt import config as config_lib  # pylint: disable=import-outside-toplevel
  if bcfg.lopt == "mlp_lopt_unfactored":
    return unfactored_mlp_lopt(exp_mult=c.lopt_exp_mult, step_mult=c.lopt_step_mult,
                             hidden_size=c.lopt_hidden_size,
                             hidden_layers=c.lopt_hidden_layers)
  return config_lib.make_lopt(c)


def build_learner(bcfg, families, estimator, num_tasks, mesh):
  from spmd_lopt import config as config_lib  # pylint: disable=import-outside-toplevel
  from spmd_lopt.outer_trainers import gradient_learner  # pylint: disable=import-outside-toplevel
  c = _library_cfg(bcfg, num_tasks)
  lopt = make_lopt(bcfg, c)
  ests, impls = build_estimators(bcfg, families, estimator, num_tasks, lopt)
  lrn = gradient_learner.SpmdGradientLearner(lopt, ests, config_lib.make_theta_opt(c),
                                             mesh=mesh)
  return lrn, impls


# --- measurements (need jax) ----------------------------------------------------------


def _cost(compiled) -> dict[str, float]:
  ca = compiled.cost_analysis()
  if isinstance(ca, (list, tuple)):
    ca = ca[0] if ca else {}
  ca = ca or {}
  return {"flops": float(ca.get("flops", 0.0)),
          "bytes": float(ca.get("bytes accessed", 0.0))}


def _memory(compiled) -> dict[str, int]:
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    m = None
  if m is None:
    return {}
  out = {k: int(getattr(m, f"{k}_size_in_bytes", 0)) for k in
         ("argument", "output", "alias", "temp", "generated_code")}
  # Live device bytes of a call: inputs + outputs not aliased to inputs (donation) + temps.
  out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
  return out


def inner_step_cost(learner, mesh_size: int) -> dict[str, float]:
  """FLOPs and bytes of ONE inner step of every estimator, per device (the body of the
  truncation scan, which XLA's cost analysis counts once)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from spmd_lopt.outer_trainers.estimator_base import OuterState  # pylint: disable=import-outside-toplevel
  abstract = learner.abstract_state()
  theta = jax.eval_shape(learner.get_meta_params, abstract)
  total = {"flops": 0.0, "bytes": 0.0}
  for est, st in zip(learner.gradient_estimators, abstract.gradient_estimator_states):
    n = est.num_tasks // mesh_size
    stacked = getattr(est, "stack_antithetic_samples", True)
    batch, calls = (2 * n, 1) if stacked else (n, 2)
    per_task = lambda x, b=batch: jax.ShapeDtypeStruct((b,) + x.shape[1:], x.dtype)
    state = jax.tree.map(per_task, st.pos_state)
    th = jax.tree.map(lambda x, b=batch: jax.ShapeDtypeStruct((b,) + x.shape, x.dtype), theta)
    step = est.truncated_step

    def one(th, state, key, ids, it, step=step):
      return step.unroll_step(th, state, key, outer_state=OuterState(it),
                              theta_is_vector=True, task_ids=ids)

    compiled = jax.jit(one).lower(
        th, state, jax.ShapeDtypeStruct((), jax.random.key(0).dtype),
        jax.ShapeDtypeStruct((batch,), jnp.int32),
        jax.ShapeDtypeStruct((), jnp.int32)).compile()
    c = _cost(compiled)
    total["flops"] += calls * c["flops"]
    total["bytes"] += calls * c["bytes"]
  return total


def measure_peak_matmul(n: int = 1024, repeats: int = 5, device=None) -> dict[str, float]:
  """Best-of-``repeats`` FLOP/s of an ``n x n`` f32 matmul on one device."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  device = device or jax.local_devices()[0]
  a = jax.device_put(jax.random.normal(jax.random.key(0), (n, n), jnp.float32), device)
  b = jax.device_put(jax.random.normal(jax.random.key(1), (n, n), jnp.float32), device)
  f = jax.jit(lambda a, b: a @ b)
  f(a, b).block_until_ready()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(a, b).block_until_ready()
    times.append(time.perf_counter() - t0)
  best = min(times)
  return {"n": n, "flops_per_s": 2.0 * n ** 3 / best, "best_s": best,
          "median_s": float(np.median(times))}


def _time_calls(call, state, keys, warmup: int, repeats: int, min_time_s: float = 0.0):
  """``warmup`` untimed calls, then at least ``repeats`` timed calls (more, up to
  ``len(keys) - warmup``, until ``min_time_s`` of timed calls): per-call seconds."""
  import jax  # pylint: disable=import-outside-toplevel
  for i in range(warmup):
    state = call(state, keys[i])
  jax.block_until_ready(state)
  times = []
  i = warmup
  while i < len(keys) and (len(times) < repeats or sum(times) < min_time_s):
    t0 = time.perf_counter()
    state = call(state, keys[i])
    jax.block_until_ready(state)
    times.append(time.perf_counter() - t0)
    i += 1
  return state, times


def _keys(mesh, n, seed):
  import jax  # pylint: disable=import-outside-toplevel
  from spmd_lopt import sharding  # pylint: disable=import-outside-toplevel
  ks = jax.random.split(jax.random.key(seed + 1), n)
  out = [sharding.replicate(ks[i], mesh) for i in range(n)]
  jax.block_until_ready(out)
  return out


def host_batch_makers(learner, trunc_length: int, seed: int):
  """Per estimator: ``None`` (a task without data) or a function making one meta step's
  host-fed batches with numpy, ``{"image": f32[T, n, B, H, W, C], "label": i32[T, n, B]}``,
  drawn like ``ImageDataset.sample_batch`` (uniform with replacement from the train split)
  but on the host: the ablation of on-device batch drawing."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  makers = []
  for est in learner.gradient_estimators:
    family = est.truncated_step.task_family
    ds = family.task_fn(family.sample(jax_key(0))).datasets
    if ds is None:
      makers.append(None)
      continue
    images = np.asarray(ds.images["train"])
    labels = np.asarray(ds.labels["train"])
    scale, n, bsz = np.float32(ds.image_scale), est.num_tasks, ds.batch_size

    def make(images=images, labels=labels, scale=scale, n=n, bsz=bsz):
      idx = rng.integers(0, labels.shape[0], size=(trunc_length, n, bsz))
      return {"image": images[idx].astype(np.float32) * scale, "label": labels[idx]}
    makers.append(make)
  return makers


def jax_key(seed: int):
  import jax  # pylint: disable=import-outside-toplevel
  return jax.random.key(seed)


def measure_fused(bcfg, spec: dict) -> dict:
  """One fused point: ``spec`` has families, estimator, num_devices, tasks_per_device,
  steps_per_call. Runs in the current process on its first ``num_devices`` devices (or all
  global devices when several processes share the mesh)."""
  import jax  # pylint: disable=import-outside-toplevel
  from spmd_lopt import sharding  # pylint: disable=import-outside-toplevel
  nd = int(spec["num_devices"])
  if jax.process_count() > 1:
    mesh = sharding.make_mesh()
    nd = mesh.size
  else:
    mesh = sharding.make_mesh(num_devices=nd)
  num_tasks = int(spec["tasks_per_device"]) * nd
  spc = int(spec.get("steps_per_call", 1))
  lrn, impls = build_learner(bcfg, spec["families"], spec["estimator"], num_tasks, mesh)
  state = lrn.init(sharding.replicate(jax.random.key(bcfg.seed), mesh))
  jax.block_until_ready(state)
  n_keys = 1 + bcfg.warmup + max(bcfg.repeats, bcfg.max_repeats)
  keys = _keys(mesh, n_keys, bcfg.seed)

  host_fed = spec.get("kind") == "host_fed"
  if host_fed:
    makers = host_batch_makers(lrn, bcfg.trunc_length, bcfg.seed)
    # Host-made batches, shipped and sharded every step: the cost being measured.
    call = lambda s, k: lrn.update(s, k, datas=lrn.shard_datas(
        tuple(None if m is None else m() for m in makers)))[0]
  elif spc == 1:
    call = lambda s, k: lrn.update(s, k)[0]
  else:
    call = lambda s, k: lrn.update_many(s, k, spc)[0]
  t0 = time.perf_counter()
  state = call(state, keys[0])
  jax.block_until_ready(state)
  first_call_s = time.perf_counter() - t0

  # The step ``update`` just ran; its executable is in jax's compilation cache by now, so
  # this costs no second compile.
  compiled = None if host_fed else lrn.lower_update(state, keys[0],
                                                     steps_per_call=spc).compile()
  if compiled is None:
    cost, mem, n_allreduce = {"flops": None, "bytes": None}, {}, None
  else:
    cost, mem, n_allreduce = _cost(compiled), _memory(compiled), None
  try:
    hlo = compiled.as_text()
    n_allreduce = hlo.count(" all-reduce(") + hlo.count(" all-reduce-start(")
  except Exception:  # pylint: disable=broad-except
    pass
  if spc == 1 and not host_fed:
    inner = inner_step_cost(lrn, nd)
    flops = corrected_cost(cost["flops"], inner["flops"], bcfg.trunc_length)
    bytes_ = corrected_cost(cost["bytes"], inner["bytes"], bcfg.trunc_length)
  else:
    inner, flops, bytes_ = None, None, None

  state, times = _time_calls(call, state, keys[1:], bcfg.warmup, bcfg.repeats,
                             bcfg.min_time_s)
  del state
  st = summarize_times([t / spc for t in times])
  per_step = inner_steps_per_meta_step([e.num_tasks for e in lrn.gradient_estimators],
                                       bcfg.trunc_length)
  res = {
      "kind": "host_fed" if host_fed else "fused", "families": list(spec["families"]),
      "task_impl": impls,
      "estimator": spec["estimator"], "num_devices": nd,
      "num_processes": jax.process_count(), "tasks_per_device": int(spec["tasks_per_device"]),
      "total_tasks_per_estimator": num_tasks, "num_estimators": len(spec["families"]),
      "trunc_length": int(bcfg.trunc_length), "steps_per_call": spc,
      # first call = trace + lower + compile + one call; compile_s removes the steady call.
      "first_call_s": first_call_s, "compile_s": max(first_call_s - st["median"] * spc, 0.0),
      "step_time_s": st, "meta_steps_per_s": 1.0 / st["median"],
      "inner_steps_per_meta_step": per_step,
      "inner_steps_per_s": per_step / st["median"],
      "inner_steps_per_s_per_device": per_step / st["median"] / nd,
      "xla_flops_per_step_per_device_raw": cost["flops"],
      "xla_bytes_per_step_per_device_raw": cost["bytes"],
      "inner_step_cost_per_device": inner,
      "flops_per_step": None if flops is None else flops * nd,
      "bytes_per_step": None if bytes_ is None else bytes_ * nd,
      "achieved_flops_per_s": None if flops is None else flops * nd / st["median"],
      "memory_per_device": mem, "all_reduce_ops": n_allreduce,
      "device_kind": jax.devices()[0].device_kind, "platform": jax.devices()[0].platform,
  }
  return res


def measure_host_baseline(bcfg, spec: dict) -> dict:
  """The reference's host-driven loop on one device: per meta step
  ``gradient_worker_compute`` (one jitted call per estimator, numpy aggregation on the
  host), then ``GradientLearner.update`` (host mean + one jitted Adam step)."""
  import jax  # pylint: disable=import-outside-toplevel
  from spmd_lopt import config as config_lib  # pylint: disable=import-outside-toplevel
  from spmd_lopt.outer_trainers import gradient_learner as gl  # pylint: disable=import-outside-toplevel
  num_tasks = int(spec["tasks_per_device"])
  c = _library_cfg(bcfg, num_tasks)
  lopt = make_lopt(bcfg, c)
  ests, impls = build_estimators(bcfg, spec["families"], spec["estimator"], num_tasks, lopt)
  learner = gl.GradientLearner(lopt, config_lib.make_theta_opt(c))
  k_theta, k_est = jax.random.split(jax.random.key(bcfg.seed))
  gl_state = learner.init(k_theta)
  ww = learner.get_state_for_worker(gl_state)
  unroll = [e.init_worker_state(ww, key=jax.random.fold_in(k_est, i))
            for i, e in enumerate(ests)]
  ks = jax.random.split(jax.random.key(bcfg.seed + 1),
                        1 + bcfg.warmup + max(bcfg.repeats, bcfg.max_repeats))
  keys = [ks[i] for i in range(ks.shape[0])]

  def call(carry, key):
    gl_state, unroll = carry
    out = gl.gradient_worker_compute(learner.get_state_for_worker(gl_state), ests, unroll,
                                     key=key)
    gl_state, _ = learner.update(gl_state, [out.to_put])
    return gl_state, out.unroll_states

  t0 = time.perf_counter()
  carry = call((gl_state, unroll), keys[0])
  jax.block_until_ready(carry)
  first = time.perf_counter() - t0
  carry, times = _time_calls(call, carry, keys[1:], bcfg.warmup, bcfg.repeats,
                             bcfg.min_time_s)
  st = summarize_times(times)
  per_step = inner_steps_per_meta_step([num_tasks] * len(ests), bcfg.trunc_length)
  return {"kind": "host_baseline", "families": list(spec["families"]), "task_impl": impls,
          "estimator": spec["estimator"], "num_devices": 1, "num_processes": 1,
          "tasks_per_device": num_tasks, "total_tasks_per_estimator": num_tasks,
          "num_estimators": len(ests), "trunc_length": int(bcfg.trunc_length),
          "steps_per_call": 1, "first_call_s": first,
          "compile_s": max(first - st["median"], 0.0), "step_time_s": st,
          "meta_steps_per_s": 1.0 / st["median"], "inner_steps_per_meta_step": per_step,
          "inner_steps_per_s": per_step / st["median"],
          "inner_steps_per_s_per_device": per_step / st["median"],
          "device_kind": jax.devices()[0].device_kind, "platform": jax.devices()[0].platform}


def run_worker(bcfg, spec: dict) -> list[dict]:
  """Run every point of ``spec["points"]`` in this process; returns their records."""
  out = []
  for p in spec["points"]:
    t0 = time.perf_counter()
    try:
      rec = measure_host_baseline(bcfg, p) if p.get("kind") == "host_baseline" else \
          measure_fused(bcfg, p)
    except Exception as e:  # pylint: disable=broad-except
      import traceback  # pylint: disable=import-outside-toplevel
      rec = {"kind": p.get("kind", "fused"), "error": f"{type(e).__name__}: {e}",
             "traceback": traceback.format_exc()[-4000:], **{k: v for k, v in p.items()
                                                               if k != "kind"}}
    rec["scaling"] = p.get("scaling", [])
    rec["wall_s"] = time.perf_counter() - t0
    out.append(rec)
  return out


# --- orchestration --------------------------------------------------------------------


def plan(bcfg) -> dict[int, list[dict]]:
  """Points to measure, grouped by device count (one process per count on CPU)."""
  counts = _ints(bcfg.device_counts)
  points: dict[tuple, dict] = {}

  def add(kind, n, tpd, fams, est, spc, tag):
    key = (kind, n, tpd, tuple(fams), est, spc)
    p = points.setdefault(key, {"kind": kind, "num_devices": n, "tasks_per_device": tpd,
                                "families": list(fams), "estimator": est,
                                "steps_per_call": spc, "scaling": []})
    if tag not in p["scaling"]:
      p["scaling"].append(tag)

  strong = _ints(bcfg.strong_total_tasks)
  for fams in _workloads(bcfg.workloads):
    for est in [e.strip() for e in bcfg.estimators.split(",") if e.strip()]:
      for tpd in _ints(bcfg.tasks_per_device):
        for n in counts:
          add("fused", n, tpd, fams, est, 1, f"weak:{tpd}")
      for tot in strong:
        for n in counts:
          if tot % n == 0:
            add("fused", n, tot // n, fams, est, 1, f"strong:{tot}")
        if bcfg.host_baseline:
          add("host_baseline", 1, tot, fams, est, 1, f"host:{tot}")
        if bcfg.host_fed and any(f != "quadratic" for f in fams):
          add("host_fed", 1, tot, fams, est, 1, f"host_fed:{tot}")
      if strong:
        for spc in _ints(bcfg.steps_per_call):
          add("fused", 1, min(strong), fams, est, spc, f"spc:{min(strong)}")
  by_n: dict[int, list[dict]] = {}
  for p in points.values():
    by_n.setdefault(p["num_devices"], []).append(p)
  return dict(sorted(by_n.items()))


def _repo_root() -> str:
  return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _spawn(bcfg, spec: dict, env_extra: dict, outfile: str, extra_args=(),
           affinity: Optional[int] = None):
  env = dict(os.environ)
  env.update(env_extra)
  root = _repo_root()
  env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
  cmd = [sys.executable, "-m", "spmd_lopt.bench", "--worker", json.dumps(spec),
         "--worker_config", json.dumps(bcfg.to_dict()), "--worker_out", outfile,
         *extra_args]
  if affinity is not None and hasattr(os, "sched_getaffinity"):
    cpus = sorted(os.sched_getaffinity(0))
    cmd += ["--pin_cpu", str(cpus[affinity % len(cpus)])]  # the worker pins itself
  return subprocess.Popen(cmd, env=env, cwd=root, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _collect(proc, outfile, timeout) -> tuple[list[dict], str]:
  try:
    log, _ = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    log, _ = proc.communicate()
    return [], f"timeout after {timeout}s\n{log[-3000:]}"
  if proc.returncode != 0 or not os.path.exists(outfile):
    return [], f"exit {proc.returncode}\n{log[-3000:]}"
  with open(outfile) as f:
    return json.load(f), log


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_points(bcfg, by_n: dict[int, list[dict]], workdir: str, log=print) -> list[dict]:
  import jax  # pylint: disable=import-outside-toplevel
  results = []
  use_sub = bcfg.subprocess and jax.default_backend() == "cpu"
  for n, pts in by_n.items():
    log(f"[bench] {n} device(s): {len(pts)} point(s)"
        f"{' in a subprocess' if use_sub else ' in-process'}")
    if use_sub:
      out = os.path.join(workdir, f"worker_{n}dev.json")
      flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                       if "xla_force_host_platform_device_count" not in f)
      proc = _spawn(bcfg, {"points": pts}, {
          "XLA_FLAGS": f"{flags} {bcfg.xla_flags} "
                       f"--xla_force_host_platform_device_count={n}".strip(),
          "JAX_PLATFORMS": "cpu"}, out)
      recs, msg = _collect(proc, out, bcfg.worker_timeout_s)
      if not recs:
        recs = [{**p, "error": f"worker failed: {msg}"} for p in pts]
    else:
      if n > len(jax.devices()):
        recs = [{**p, "error": f"only {len(jax.devices())} devices"} for p in pts]
      else:
        recs = run_worker(bcfg, {"points": pts})
    for r in recs:
      log("  " + one_line(r))
    results.extend(recs)
  return results


def run_multiprocess(bcfg, workdir: str, log=print) -> list[dict]:
  """Weak scaling over processes: 1 process, then ``mp_processes``, each pinned to its own
  core with one CPU device, gloo collectives; ``mp_tasks_per_process`` tasks each."""
  fams = _workloads(bcfg.workloads)[0]
  est = bcfg.estimators.split(",")[0].strip()
  results = []
  for nproc in (1, int(bcfg.mp_processes)):
    port = int(bcfg.mp_port) or _free_port()
    spec = {"points": [{"kind": "fused", "num_devices": nproc,
                        "tasks_per_device": int(bcfg.mp_tasks_per_process),
                        "families": fams, "estimator": est, "steps_per_call": 1,
                        "scaling": [f"multiprocess:{bcfg.mp_tasks_per_process}"]}]}
    procs, outs = [], []
    flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                     if "xla_force_host_platform_device_count" not in f)
    for i in range(nproc):
      out = os.path.join(workdir, f"mp_{nproc}proc_{i}.json")
      outs.append(out)
      procs.append(_spawn(bcfg, spec, {"XLA_FLAGS": f"{flags} {bcfg.xla_flags}".strip(),
                                       "JAX_PLATFORMS": "cpu"}, out,
                          ["--mp_num_processes", str(nproc), "--mp_process_id", str(i),
                           "--mp_coordinator", f"127.0.0.1:{port}"],
                          affinity=i if bcfg.mp_pin else None))
    got = [_collect(p, o, bcfg.worker_timeout_s) for p, o in zip(procs, outs)]
    recs, msg = got[0]
    if not recs:
      msgs = "\n---\n".join(f"process {i}: {m}" for i, (_, m) in enumerate(got))
      recs = [{**spec["points"][0], "num_processes": nproc, "error": f"failed: {msgs}"}]
    for r in recs:
      r["kind"] = "multiprocess"
      log("  " + one_line(r))
    results.extend(recs)
  return results


def one_line(r: dict) -> str:
  if r.get("error"):
    return (f"{r.get('kind')} dev={r.get('num_devices')} tpd={r.get('tasks_per_device')} "
            f"ERROR {r['error'].splitlines()[0][:200]}")
  st = r["step_time_s"]
  return (f"{r['kind']:<13} {'+'.join(r['families']):<20} dev={r['num_devices']} "
          f"proc={r.get('num_processes', 1)} tpd={r['tasks_per_device']:<4} "
          f"spc={r['steps_per_call']} step={st['median'] * 1e3:8.2f} ms "
          f"[{st['min'] * 1e3:.2f}-{st['max'] * 1e3:.2f}] "
          f"inner/s={r['inner_steps_per_s']:.3g} compile={r.get('compile_s', float('nan')):.2f}s")


def summarize(results: list[dict], peak_flops: float, platform_: str,
              budget_bytes: float) -> dict:
  """Scaling efficiencies, host ratio, steps_per_call gain, multi-process speedup,
  roofline fractions and memory capacity from the measured records."""
  ok = [r for r in results if not r.get("error")]
  summ: dict[str, Any] = {"weak": {}, "strong": {}, "host_ratio": {}, "steps_per_call": {},
                          "multiprocess": {}, "memory": {}, "host_fed": {}}
  for r in ok:
    if r["kind"] in ("fused", "multiprocess") and r.get("achieved_flops_per_s"):
      # CPU virtual devices share the host's cores: the peak is the machine's, not x N.
      peak = peak_flops if platform_ == "cpu" else peak_flops * r["num_devices"]
      r["roofline_fraction"] = r["achieved_flops_per_s"] / peak
  groups: dict[tuple, dict] = {}
  for r in ok:
    for tag in r.get("scaling", []):
      groups.setdefault((tag, "+".join(r["families"]), r["estimator"]), {}).setdefault(
          r["kind"], []).append(r)
  for (tag, wl, est), kinds in groups.items():
    kind, _, val = tag.partition(":")
    name = f"{wl}/{est}/{val}"
    if kind in ("weak", "strong") and "fused" in kinds:
      tn = {r["num_devices"]: r["step_time_s"]["median"] for r in kinds["fused"]}
      if 1 in tn:
        summ[kind][name] = {str(k): v for k, v in
                            (weak_scaling(tn) if kind == "weak" else strong_scaling(tn)).items()}
    elif kind == "spc" and "fused" in kinds:
      t = {r["steps_per_call"]: r["step_time_s"]["median"] for r in kinds["fused"]}
      if 1 in t:
        summ["steps_per_call"][name] = {str(k): {"time_per_step_s": v, "gain": t[1] / v}
                                        for k, v in sorted(t.items())}
    elif kind == "multiprocess" and "multiprocess" in kinds:
      t = {r["num_processes"]: r["step_time_s"]["median"] for r in kinds["multiprocess"]}
      if 1 in t:
        summ["multiprocess"][name] = {str(k): v for k, v in weak_scaling(t).items()}
  for r in ok:
    if r["kind"] == "host_fed":
      tot = r["tasks_per_device"]
      fused = [f for f in ok if f["kind"] == "fused" and f["num_devices"] == 1 and
               f["steps_per_call"] == 1 and f["families"] == r["families"] and
               f["estimator"] == r["estimator"] and f["tasks_per_device"] == tot]
      if fused:
        summ["host_fed"][f"{'+'.join(r['families'])}/{r['estimator']}/{tot}"] = {
            "host_fed_step_s": r["step_time_s"]["median"],
            "on_device_step_s": fused[0]["step_time_s"]["median"],
            "on_device_speedup": r["step_time_s"]["median"] /
                                 fused[0]["step_time_s"]["median"]}
  for r in ok:
    if r["kind"] == "host_baseline":
      tot = r["tasks_per_device"]
      fused = [f for f in ok if f["kind"] == "fused" and f["num_devices"] == 1 and
               f["steps_per_call"] == 1 and f["families"] == r["families"] and
               f["estimator"] == r["estimator"] and f["tasks_per_device"] == tot]
      if fused:
        name = f"{'+'.join(r['families'])}/{r['estimator']}/{tot}"
        summ["host_ratio"][name] = {
            "host_step_s": r["step_time_s"]["median"],
            "fused_step_s": fused[0]["step_time_s"]["median"],
            "fused_speedup": r["step_time_s"]["median"] / fused[0]["step_time_s"]["median"]}
  mem_groups: dict[tuple, list] = {}
  for r in ok:
    if r["kind"] == "fused" and r.get("memory_per_device", {}).get("total") and \
        r["steps_per_call"] == 1 and r["num_processes"] == 1:
      mem_groups.setdefault(("+".join(r["families"]), r["estimator"]), []).append(
          (r["tasks_per_device"], r["memory_per_device"]["total"]))
  for (wl, est), pts in mem_groups.items():
    fixed, per_task = fit_memory(pts)
    summ["memory"][f"{wl}/{est}"] = {
        "points": [list(p) for p in sorted(set(pts))], "fixed_bytes": fixed, "bytes_per_task": per_task,
        "budget_bytes": budget_bytes,
        "max_tasks_per_device": max_tasks_within(budget_bytes, fixed, per_task)}
  return summ


def write_csv(results: list[dict], path: str) -> None:
  cols = ["kind", "families", "estimator", "num_devices", "num_processes", "tasks_per_device",
          "total_tasks_per_estimator", "steps_per_call", "trunc_length", "compile_s",
          "first_call_s", "step_median_s", "step_q25_s", "step_q75_s", "step_min_s",
          "step_max_s", "meta_steps_per_s", "inner_steps_per_s",
          "inner_steps_per_s_per_device", "flops_per_step", "bytes_per_step",
          "achieved_flops_per_s", "roofline_fraction", "memory_total_bytes_per_device",
          "scaling", "error"]
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=cols)
    w.writeheader()
    for r in results:
      st = r.get("step_time_s") or {}
      row = {k: r.get(k) for k in cols}
      row.update(families="+".join(r.get("families", [])), scaling=";".join(r.get("scaling", [])),
                 step_median_s=st.get("median"), step_q25_s=st.get("q25"),
                 step_q75_s=st.get("q75"), step_min_s=st.get("min"), step_max_s=st.get("max"),
                 memory_total_bytes_per_device=(r.get("memory_per_device") or {}).get("total"),
                 error=(r.get("error") or "").splitlines()[0] if r.get("error") else "")
      w.writerow(row)


def write_plots(results: list[dict], summary: dict, outdir: str) -> list[str]:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  paths = []
  ok = [r for r in results if not r.get("error") and r["kind"] == "fused"]
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
  for kind, ax_t in (("weak", axes[0]), ("strong", axes[0])):
    for name, by_n in summary[kind].items():
      ns = sorted(int(k) for k in by_n)
      thr = []
      for n in ns:
        rec = [r for r in ok if f"{kind}:{name.split('/')[-1]}" in r["scaling"] and
               "+".join(r["families"]) == name.split("/")[0] and r["num_devices"] == n]
        thr.append(rec[0]["inner_steps_per_s"] if rec else np.nan)
      ax_t.plot(ns, thr, "o-" if kind == "weak" else "s--", label=f"{kind} {name}")
      axes[1].plot(ns, [by_n[str(n)]["efficiency"] for n in ns],
                   "o-" if kind == "weak" else "s--", label=f"{kind} {name}")
  axes[0].set(xlabel="devices", ylabel="inner task-steps / s (total)", xscale="log",
              yscale="log", title="throughput")
  axes[1].set(xlabel="devices", ylabel="parallel efficiency", xscale="log",
              title="efficiency (weak T1/TN, strong T1/(N TN))")
  counts = sorted({r["num_devices"] for r in ok})
  for ax in axes[:2]:
    ax.set_xticks(counts)
    ax.set_xticklabels([str(n) for n in counts])
    ax.minorticks_off()
  axes[1].axhline(1.0, color="k", lw=0.5)
  roof = [r for r in ok if r.get("roofline_fraction")]
  labels = [f"{'+'.join(r['families'])}\n{r['num_devices']}d x {r['tasks_per_device']}t"
            for r in roof]
  axes[2].bar(range(len(roof)), [r["roofline_fraction"] for r in roof])
  axes[2].set_xticks(range(len(roof)))
  axes[2].set_xticklabels(labels, rotation=90, fontsize=6)
  axes[2].set(ylabel="achieved FLOP/s / f32 matmul peak", title="roofline fraction")
  for ax in axes[:2]:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
  fig.tight_layout()
  p = os.path.join(outdir, "scaling.png")
  fig.savefig(p, dpi=100)
  plt.close(fig)
  paths.append(p)
  return paths


def format_table(results: list[dict]) -> str:
  head = (f"| {'kind':<13} | {'workload':<22} | dev | proc | tasks/dev | spc | "
          f"step ms (median [min-max]) | meta steps/s | inner steps/s | inner/s/dev | "
          f"compile s | GFLOP/s | roofline |")
  sep = "|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|"
  rows = [head, sep]
  for r in results:
    if r.get("error"):
      rows.append(f"| {r.get('kind', ''):<13} | {'+'.join(r.get('families', [])):<22} | "
                  f"{r.get('num_devices')} | | {r.get('tasks_per_device')} | | ERROR: "
                  f"{r['error'].splitlines()[0][:80]} | | | | | | |")
      continue
    st = r["step_time_s"]
    gf = r.get("achieved_flops_per_s")
    rf = r.get("roofline_fraction")
    rows.append(
        f"| {r['kind']:<13} | {'+'.join(r['families']):<22} | {r['num_devices']:>3} | "
        f"{r.get('num_processes', 1):>4} | {r['tasks_per_device']:>9} | "
        f"{r['steps_per_call']:>3} | {st['median'] * 1e3:9.2f} [{st['min'] * 1e3:.2f}-"
        f"{st['max'] * 1e3:.2f}] | {r['meta_steps_per_s']:12.2f} | "
        f"{r['inner_steps_per_s']:13.4g} | {r['inner_steps_per_s_per_device']:11.4g} | "
        f"{r.get('compile_s') if r.get('compile_s') is not None else float('nan'):9.2f} | "
        f"{(gf or float('nan')) / 1e9:7.2f} | "
        f"{(rf if rf is not None else float('nan')):8.4f} |")
  return "\n".join(rows)


def format_summary(summary: dict) -> str:
  lines = []
  for kind, extra in (("weak", "throughput_speedup"), ("strong", "speedup")):
    for name, by_n in summary[kind].items():
      eff = ", ".join(f"{n}: {v['efficiency']:.2f}" for n, v in by_n.items())
      spd = ", ".join(f"{n}: {v[extra]:.2f}x" for n, v in by_n.items())
      lines.append(f"{kind} scaling {name}: efficiency by devices {{{eff}}}; "
                   f"{extra} {{{spd}}}")
  for name, v in summary["host_ratio"].items():
    lines.append(f"host round-trip baseline {name}: fused speedup {v['fused_speedup']:.2f}x "
                 f"(host {v['host_step_s'] * 1e3:.1f} ms, fused {v['fused_step_s'] * 1e3:.1f} ms "
                 "per meta step)")
  for name, v in summary.get("host_fed", {}).items():
    lines.append(f"batches drawn on device vs host-fed {name}: on-device "
                 f"{v['on_device_step_s'] * 1e3:.1f} ms, host-fed "
                 f"{v['host_fed_step_s'] * 1e3:.1f} ms per meta step "
                 f"({v['on_device_speedup']:.2f}x)")
  for name, v in summary["steps_per_call"].items():
    lines.append(f"steps_per_call {name}: " + ", ".join(
        f"{k}: {x['gain']:.2f}x" for k, x in v.items()))
  for name, v in summary["multiprocess"].items():
    lines.append(f"multi-process weak scaling {name}: " + ", ".join(
        f"{k} proc: eff {x['efficiency']:.2f}, throughput {x['throughput_speedup']:.2f}x"
        for k, x in v.items()))
  for name, v in summary["memory"].items():
    lines.append(f"memory {name}: {v['bytes_per_task'] / 1e3:.1f} kB/task + "
                 f"{v['fixed_bytes'] / 1e6:.2f} MB fixed -> max {v['max_tasks_per_device']} "
                 f"tasks/device in {v['budget_bytes'] / 1e9:.1f} GB")
  return "\n".join(lines)


def memory_budget_bytes(bcfg, max_devices: int) -> float:
  import jax  # pylint: disable=import-outside-toplevel
  if bcfg.memory_budget_gb > 0:
    return bcfg.memory_budget_gb * 1e9
  dev = jax.local_devices()[0]
  stats = None
  try:
    stats = dev.memory_stats()
  except Exception:  # pylint: disable=broad-except
    pass
  if stats and stats.get("bytes_limit"):
    return 0.9 * stats["bytes_limit"]
  try:
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (ValueError, OSError):
    ram = 8e9
  return 0.5 * ram / max(1, max_devices)


def run_bench(bcfg, outdir: str, log=print) -> dict:
  """The whole benchmark for ``bcfg``; writes into ``outdir`` and returns the JSON dict."""
  import jax  # pylint: disable=import-outside-toplevel
  os.makedirs(outdir, exist_ok=True)
  t_start = time.time()
  load_before = load_average()
  platform_ = jax.devices()[0].platform
  # Accelerators need a bigger matmul to approach their peak.
  peak = measure_peak_matmul(bcfg.peak_matmul_n if platform_ == "cpu"
                             else max(bcfg.peak_matmul_n, 8192))
  log(f"[bench] {jax.devices()[0].device_kind}: f32 matmul peak "
      f"{peak['flops_per_s'] / 1e9:.1f} GFLOP/s (n={peak['n']}); load {load_before}")
  by_n = plan(bcfg)
  results = run_points(bcfg, by_n, outdir, log)
  if int(bcfg.mp_processes) > 1 and platform_ != "cpu":
    log("[bench] multi-process skipped: it is a CPU experiment (one CPU device per process, "
        "gloo); on accelerators launch one process per host with jax.distributed instead.")
  elif int(bcfg.mp_processes) > 1:
    log(f"[bench] multi-process: 1 vs {bcfg.mp_processes} processes")
    results.extend(run_multiprocess(bcfg, outdir, log))
  budget = memory_budget_bytes(bcfg, max(by_n) if by_n else 1)
  summary = summarize(results, peak["flops_per_s"], platform_, budget)
  meta = {
      "config": bcfg.to_dict(), "device_kind": jax.devices()[0].device_kind,
      "platform": platform_, "num_local_devices": len(jax.local_devices()),
      "jax_version": jax.__version__, "python": platform.python_version(),
      "cpu_count": os.cpu_count(),
      "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
      "hostname": socket.gethostname(), "load_avg_before": load_before,
      "load_avg_after": load_average(), "wall_s": time.time() - t_start,
      "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
      "standin_note": "image_mlp = StandInImageMLP (synthetic data, same shapes/cost) until "
                      "spmd_lopt.tasks.fixed.image_mlp is merged; see task_impl per record.",
  }
  out = {"meta": meta, "peak_matmul": peak, "results": results, "summary": summary}
  with open(os.path.join(outdir, "results.json"), "w") as f:
    json.dump(out, f, indent=1, default=str)
  write_csv(results, os.path.join(outdir, "results.csv"))
  if bcfg.plots:
    out["plots"] = write_plots(results, summary, outdir)
  table = format_table(results)
  with open(os.path.join(outdir, "table.md"), "w") as f:
    f.write(table + "\n\n" + format_summary(summary) + "\n")
  log(table)
  log(format_summary(summary))
  log(f"[bench] load average before {load_before}, after {meta['load_avg_after']}; "
      f"wrote {outdir}/results.json, results.csv, table.md"
      f"{', scaling.png' if bcfg.plots else ''}")
  return out


# --- command line ---------------------------------------------------------------------


def _arg(argv, name, default=None):
  if name in argv:
    return argv[argv.index(name) + 1]
  for a in argv:
    if a.startswith(name + "="):
      return a.split("=", 1)[1]
  return default


def worker_main(argv) -> None:
  """``--worker SPEC --worker_config CFG --worker_out FILE [--mp_* ...]``."""
  pin = _arg(argv, "--pin_cpu")
  if pin is not None and hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {int(pin)})  # before jax starts its threads
  import ml_collections  # pylint: disable=import-outside-toplevel
  nproc = int(_arg(argv, "--mp_num_processes", "1"))
  if nproc > 1:
    import jax  # pylint: disable=import-outside-toplevel
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(_arg(argv, "--mp_coordinator"), num_processes=nproc,
                               process_id=int(_arg(argv, "--mp_process_id")))
  bcfg = ml_collections.ConfigDict(json.loads(_arg(argv, "--worker_config")))
  spec = json.loads(_arg(argv, "--worker"))
  recs = run_worker(bcfg, spec)
  for r in recs:
    r["load_avg_after"] = load_average()
    r["cpu_affinity"] = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
        else None
    if nproc > 1:
      r["cpu_collectives"] = "gloo"
  with open(_arg(argv, "--worker_out"), "w") as f:
    json.dump(recs, f, default=str)


def main(argv=None) -> None:
  argv = list(sys.argv[1:] if argv is None else argv)
  if "--worker" in argv or any(a.startswith("--worker=") for a in argv):
    worker_main(argv)
    return
  path = _arg(argv, "--config")
  bcfg = load_config(path)
  for a in argv:
    if a.startswith("--config.") and "=" in a:
      k, v = a[len("--config."):].split("=", 1)
      if k not in bcfg:
        raise ValueError(f"Unknown bench config key {k!r}; known: {sorted(bcfg.keys())}.")
      old = bcfg[k]
      bcfg[k] = (v.lower() in ("1", "true", "yes")) if isinstance(old, bool) else type(old)(v)
  outdir = _arg(argv, "--outdir") or os.path.join("bench_results", bcfg.name)
  run_bench(bcfg, outdir)


if __name__ == "__main__":
  main()
