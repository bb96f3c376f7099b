"""Measuring one benchmark point in this process: the fused meta step, its host-fed and
host round-trip variants.

Per point: the first call (trace + lower + compile + one step, ``first_call_s``;
``compile_s = first_call_s - median step``), then ``warmup`` untimed calls and at least
``repeats`` timed calls (more, up to ``max_repeats``, until ``min_time_s`` of timed calls),
each ``jax.block_until_ready``-ed. Times are summarised by ``stats.summarize_times``;
costs come from ``cost_model``. A point whose workload is missing is returned as
``{"skipped": reason}``; any other failure as ``{"error": ..., "traceback": ...}``.
"""

from __future__ import annotations

import time

import numpy as np

from spmd_lopt.bench import cost_model
from spmd_lopt.bench import stats
from spmd_lopt.bench import workloads


def time_calls(call, state, keys, warmup: int, repeats: int, min_time_s: float = 0.0):
  """``warmup`` untimed calls, then at least ``repeats`` timed calls (more, up to
  ``len(keys) - warmup``, until ``min_time_s`` of timed calls): per-call seconds."""
  import jax  # pylint: disable=import-outside-toplevel
  for i in range(warmup):
    state = call(state, keys[i])
  jax.block_until_ready(state)
  times = []
  i = warmup
  limit = len(keys)
  while i < limit and (len(times) < repeats or sum(times) < min_time_s):
    t0 = time.perf_counter()
    state = call(state, keys[i])
    jax.block_until_ready(state)
    times.append(time.perf_counter() - t0)
    i += 1
    if jax.process_count() > 1 and len(times) == 1:
      # Every process must make the same number of calls (each holds a collective that
      # waits for all): process 0's first timing fixes the count for all of them.
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      want = max(repeats, int(min_time_s / max(times[0], 1e-6)) + 1)
      limit = warmup + int(multihost_utils.broadcast_one_to_all(np.int32(want)))
      limit = min(limit, len(keys))
      repeats, min_time_s = limit - warmup, float("inf")
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
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  makers = []
  for est in learner.gradient_estimators:
    family = est.truncated_step.task_family
    ds = family.task_fn(family.sample(jax.random.key(0))).datasets
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


def _device_fields(nd: int, per_step: int, st: dict) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  return {"step_time_s": st, "meta_steps_per_s": 1.0 / st["median"],
          "inner_steps_per_meta_step": per_step,
          "inner_steps_per_s": per_step / st["median"],
          "inner_steps_per_s_per_device": per_step / st["median"] / nd,
          "device_kind": jax.devices()[0].device_kind, "platform": jax.devices()[0].platform}


def measure_fused(bcfg, spec: dict) -> dict:
  """One fused point: ``spec`` has families, estimator, num_devices, tasks_per_device,
  steps_per_call, optionally kind ("host_fed") and reset_mode. Runs in the current process
  on its first ``num_devices`` devices (or all global devices when several processes share
  the mesh)."""
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
  reset_mode = spec.get("reset_mode", "")
  lrn, impls = workloads.build_learner(bcfg, spec["families"], spec["estimator"], num_tasks,
                                       mesh, reset_mode)
  state = lrn.init(sharding.replicate(jax.random.key(bcfg.seed), mesh))
  jax.block_until_ready(state)
  keys = _keys(mesh, 1 + bcfg.warmup + max(bcfg.repeats, bcfg.max_repeats), bcfg.seed)

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

  cost, mem, n_allreduce, size = {"flops": None, "bytes": None}, {}, None, {}
  inner, flops, bytes_ = None, None, None
  if not host_fed:
    # The step ``update`` just ran: its executable is in jax's cache, so no second compile.
    lowered = lrn.lower_update(state, keys[0], steps_per_call=spc)
    size = cost_model.program_size(lowered)
    compiled = lowered.compile()
    cost, mem = cost_model.xla_cost(compiled), cost_model.memory(compiled)
    n_allreduce = cost_model.all_reduce_ops(compiled)
    if spc == 1:
      inner = cost_model.inner_step_cost(lrn, nd)
      flops = cost_model.corrected_cost(cost["flops"], inner["flops"], bcfg.trunc_length)
      bytes_ = cost_model.corrected_cost(cost["bytes"], inner["bytes"], bcfg.trunc_length)

  state, times = time_calls(call, state, keys[1:], bcfg.warmup, bcfg.repeats,
                            bcfg.min_time_s)
  del state
  st = stats.summarize_times([t / spc for t in times])
  per_step = stats.inner_steps_per_meta_step([e.num_tasks for e in lrn.gradient_estimators],
                                             bcfg.trunc_length)
  return {
      "kind": "host_fed" if host_fed else "fused", "families": list(spec["families"]),
      "task_impl": impls, "lopt": bcfg.lopt,
      "estimator": spec["estimator"], "num_devices": nd,
      "num_processes": jax.process_count(), "tasks_per_device": int(spec["tasks_per_device"]),
      "total_tasks_per_estimator": num_tasks, "num_estimators": len(spec["families"]),
      "trunc_length": int(bcfg.trunc_length), "steps_per_call": spc,
      "reset_mode": reset_mode or None,
      # first call = trace + lower + compile + one call; compile_s removes the steady call.
      "first_call_s": first_call_s, "compile_s": max(first_call_s - st["median"] * spc, 0.0),
      **_device_fields(nd, per_step, st),
      "xla_flops_per_step_per_device_raw": cost["flops"],
      "xla_bytes_per_step_per_device_raw": cost["bytes"],
      "inner_step_cost_per_device": inner,
      "flops_per_step": None if flops is None else flops * nd,
      "bytes_per_step": None if bytes_ is None else bytes_ * nd,
      "achieved_flops_per_s": None if flops is None else flops * nd / st["median"],
      "memory_per_device": mem, "all_reduce_ops": n_allreduce, "program_size": size,
  }


def measure_host_baseline(bcfg, spec: dict) -> dict:
  """The reference's host-driven loop on one device: per meta step
  ``gradient_worker_compute`` (one jitted call per estimator, numpy aggregation on the
  host), then ``GradientLearner.update`` (host mean + one jitted Adam step)."""
  import jax  # pylint: disable=import-outside-toplevel
  from spmd_lopt import config as config_lib  # pylint: disable=import-outside-toplevel
  # The reference's host API (the baseline); pylint: disable=import-outside-toplevel
  from spmd_lopt.outer_trainers import gradient_learner as gl
  num_tasks = int(spec["tasks_per_device"])
  c = workloads.library_config(bcfg, num_tasks)
  lopt = workloads.make_lopt(bcfg.lopt)
  ests, impls = workloads.build_estimators(bcfg, spec["families"], spec["estimator"],
                                           num_tasks, lopt)
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
  carry, times = time_calls(call, carry, keys[1:], bcfg.warmup, bcfg.repeats,
                            bcfg.min_time_s)
  st = stats.summarize_times(times)
  per_step = stats.inner_steps_per_meta_step([num_tasks] * len(ests), bcfg.trunc_length)
  return {"kind": "host_baseline", "families": list(spec["families"]), "task_impl": impls,
          "lopt": bcfg.lopt, "estimator": spec["estimator"], "num_devices": 1,
          "num_processes": 1, "tasks_per_device": num_tasks,
          "total_tasks_per_estimator": num_tasks, "num_estimators": len(ests),
          "trunc_length": int(bcfg.trunc_length), "steps_per_call": 1, "reset_mode": None,
          "first_call_s": first, "compile_s": max(first - st["median"], 0.0),
          **_device_fields(1, per_step, st)}


def run_worker(bcfg, spec: dict) -> list[dict]:
  """Run every point of ``spec["points"]`` in this process; returns their records."""
  import traceback  # pylint: disable=import-outside-toplevel
  out = []
  n_proj = int(bcfg.get("project_outer_iterations", 0))
  for p in spec["points"]:
    t0 = time.perf_counter()
    try:
      rec = measure_host_baseline(bcfg, p) if p.get("kind") == "host_baseline" else \
          measure_fused(bcfg, p)
      if n_proj > 0:
        rec["projected_outer_iterations"] = n_proj
        rec["projected_wall_s"] = stats.projected_wall_s(rec["step_time_s"]["median"], n_proj)
    except workloads.WorkloadUnavailable as e:
      rec = {**p, "skipped": str(e)}
    except Exception as e:  # pylint: disable=broad-except  (one bad point, not the run)
      rec = {**p, "error": f"{type(e).__name__}: {e}",
             "traceback": traceback.format_exc()[-4000:]}
    rec["scaling"] = p.get("scaling", [])
    rec["wall_s"] = time.perf_counter() - t0
    out.append(rec)
  return out
