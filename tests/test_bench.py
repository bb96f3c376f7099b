"""The benchmark harness (spmd_lopt.bench): scaling math on known timings, the plan, the
optimisation prototype's equivalence, and tiny end-to-end runs (in-process and via a
worker subprocess)."""

import json
import os

import jax
import numpy as np
import pytest

from spmd_lopt import bench
from spmd_lopt import sharding


def test_weak_and_strong_scaling_math():
  weak = bench.weak_scaling({1: 1.0, 2: 1.25, 4: 2.0})
  assert weak[1]["efficiency"] == 1.0
  assert weak[2]["efficiency"] == pytest.approx(0.8)
  assert weak[4]["efficiency"] == pytest.approx(0.5)
  assert weak[2]["throughput_speedup"] == pytest.approx(1.6)
  strong = bench.strong_scaling({1: 8.0, 2: 4.0, 4: 4.0})
  assert strong[2]["speedup"] == pytest.approx(2.0)
  assert strong[2]["efficiency"] == pytest.approx(1.0)
  assert strong[4]["efficiency"] == pytest.approx(0.5)
  with pytest.raises(ValueError):
    bench.strong_scaling({2: 1.0})


def test_time_stats_throughput_and_memory_math():
  st = bench.summarize_times([3.0, 1.0, 100.0, 2.0, 4.0])
  assert (st["median"], st["q25"], st["q75"], st["min"], st["max"], st["n"]) == \
      (3.0, 2.0, 4.0, 1.0, 100.0, 5)
  assert bench.inner_steps_per_meta_step([16, 16], 50) == 3200
  fixed, per_task = bench.fit_memory([(2, 300.0), (4, 500.0), (8, 900.0)])
  assert fixed == pytest.approx(100.0) and per_task == pytest.approx(100.0)
  assert bench.max_tasks_within(1000.0, fixed, per_task) == 9
  assert bench.max_tasks_within(1000.0, fixed, per_task, multiple=4) == 8
  assert bench.fit_memory([(4, 400.0)]) == (0.0, 100.0)
  assert bench.corrected_cost(10.0, 3.0, 50) == 10.0 + 49 * 3.0


def _rec(kind, n, tpd, t, spc=1, scaling=(), nproc=1, flops=None):
  return {"kind": kind, "families": ["quadratic"], "estimator": "pes", "num_devices": n,
          "num_processes": nproc, "tasks_per_device": tpd, "steps_per_call": spc,
          "step_time_s": bench.summarize_times([t]), "scaling": list(scaling),
          "achieved_flops_per_s": flops, "memory_per_device": {"total": 100 + 10 * tpd}}


def test_summarize_on_synthetic_records():
  recs = [_rec("fused", 1, 16, 1.0, scaling=["strong:16", "spc:16"], flops=5e9),
          _rec("fused", 2, 8, 0.6, scaling=["strong:16"]),
          _rec("fused", 1, 2, 0.2, scaling=["weak:2"]),
          _rec("fused", 2, 2, 0.25, scaling=["weak:2"]),
          _rec("fused", 1, 16, 0.5, spc=4, scaling=["spc:16"]),
          _rec("host_baseline", 1, 16, 3.0, scaling=["host:16"]),
          _rec("multiprocess", 1, 8, 1.0, scaling=["multiprocess:8"]),
          _rec("multiprocess", 2, 8, 1.25, nproc=2, scaling=["multiprocess:8"])]
  recs[-1]["num_devices"] = 2
  s = bench.summarize(recs, peak_flops=1e10, platform_="cpu", budget_bytes=1000.0)
  assert s["strong"]["quadratic/pes/16"]["2"]["efficiency"] == pytest.approx(1 / 1.2)
  assert s["weak"]["quadratic/pes/2"]["2"]["efficiency"] == pytest.approx(0.8)
  assert s["host_ratio"]["quadratic/pes/16"]["fused_speedup"] == pytest.approx(3.0)
  assert s["steps_per_call"]["quadratic/pes/16"]["4"]["gain"] == pytest.approx(2.0)
  assert s["multiprocess"]["quadratic/pes/8"]["2"]["throughput_speedup"] == \
      pytest.approx(1.6)
  assert recs[0]["roofline_fraction"] == pytest.approx(0.5)
  mem = s["memory"]["quadratic/pes"]
  assert mem["bytes_per_task"] == pytest.approx(10.0)
  assert mem["max_tasks_per_device"] == 90


def test_plan_groups_by_device_count_and_dedupes():
  cfg = bench.default_config()
  cfg.device_counts, cfg.tasks_per_device, cfg.strong_total_tasks = "1,2,4", "2", "4"
  cfg.steps_per_call, cfg.host_baseline = "1,4", True
  by_n = bench.plan(cfg)
  assert sorted(by_n) == [1, 2, 4]
  # 2 devices: weak (2/device) and strong (4 total = 2/device) are one point, both tagged.
  (p2,) = by_n[2]
  assert set(p2["scaling"]) == {"weak:2", "strong:4"}
  kinds_1 = sorted((p["kind"], p["tasks_per_device"], p["steps_per_call"]) for p in by_n[1])
  assert kinds_1 == [("fused", 2, 1), ("fused", 4, 1), ("fused", 4, 4),
                     ("host_baseline", 4, 1)]


def test_factored_mlp_lopt_matches_the_unfactored_formulation():
  """MLPLOpt's factored first layer takes the same inner steps as the MLP applied to the
  full 19-feature matrix (the bench's A/B baseline)."""
  from spmd_lopt.learned_optimizers import mlp_lopt
  ref, fac = bench.unfactored_mlp_lopt(), mlp_lopt.MLPLOpt()
  theta = ref.init(jax.random.key(0))
  k = jax.random.split(jax.random.key(1), 3)
  params = {"w": jax.random.normal(k[0], (64, 32)), "b": jax.random.normal(k[1], (10,))}
  grads = jax.tree.map(lambda p: jax.random.normal(k[2], p.shape), params)
  outs = []
  for lo in (ref, fac):
    opt = lo.opt_fn(theta)
    st = opt.init(params)
    st = opt.update(st, grads)
    st = opt.update(st, jax.tree.map(lambda g: -0.5 * g, grads))
    outs.append(jax.device_get(st))
  moved = max(float(np.max(np.abs(a - b))) for a, b in
              zip(jax.tree.leaves(outs[0].params), jax.tree.leaves(params)))
  assert moved > 1e-5
  np.testing.assert_allclose(outs[1].params["w"], outs[0].params["w"], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(outs[1].params["b"], outs[0].params["b"], rtol=1e-6, atol=1e-7)
  assert int(outs[1].iteration) == 2


def _tiny_cfg(**kw):
  cfg = bench.default_config()
  cfg.update(dict(workloads="quadratic", device_counts="1", tasks_per_device="2",
                  strong_total_tasks="2", trunc_length=2, min_length=4, max_length=8,
                  random_initial_iteration_offset=8, warmup=1, repeats=2, min_time_s=0.0,
                  max_repeats=4, steps_per_call="1,2", host_baseline=True, mp_processes=0,
                  peak_matmul_n=128, memory_budget_gb=1.0, subprocess=False, plots=True,
                  lopt="learnable_sgd"))  # cheapest lopt to compile: harness, not lopt, under test
  cfg.update(kw)
  return cfg


def test_end_to_end_in_process_writes_documented_fields(devices, tmp_path):
  out = bench.run_bench(_tiny_cfg(), str(tmp_path), log=lambda *_: None)
  with open(tmp_path / "results.json") as f:
    data = json.load(f)
  assert set(data) >= {"meta", "peak_matmul", "results", "summary"}
  assert set(data["meta"]) >= {"device_kind", "jax_version", "cpu_count", "load_avg_before",
                               "load_avg_after", "platform", "config"}
  assert data["peak_matmul"]["flops_per_s"] > 0
  res = data["results"]
  assert not [r for r in res if r.get("error")], [r["error"] for r in res if r.get("error")]
  kinds = sorted((r["kind"], r["num_devices"], r["steps_per_call"]) for r in res)
  assert kinds == [("fused", 1, 1), ("fused", 1, 2), ("host_baseline", 1, 1)]
  for r in res:
    assert r["step_time_s"]["n"] >= 2 and r["step_time_s"]["min"] > 0
    assert r["inner_steps_per_s"] == pytest.approx(
        r["inner_steps_per_meta_step"] / r["step_time_s"]["median"])
    if r["kind"] == "fused" and r["steps_per_call"] == 1:
      assert r["flops_per_step"] > r["xla_flops_per_step_per_device_raw"] > 0
      assert r["memory_per_device"]["total"] > 0
      assert 0 < r["roofline_fraction"] < 10
      assert r["compile_s"] >= 0 and r["first_call_s"] > 0
  summ = data["summary"]
  assert summ["strong"]["quadratic/pes/2"]["1"]["efficiency"] == 1.0
  assert summ["steps_per_call"]["quadratic/pes/2"]["2"]["gain"] > 0
  assert "quadratic/pes/2" in summ["host_ratio"]
  assert summ["memory"]["quadratic/pes"]["max_tasks_per_device"] > 0
  for name in ("results.csv", "table.md", "scaling.png"):
    assert (tmp_path / name).stat().st_size > 0
  assert out["summary"]["strong"] == summ["strong"]


def test_worker_subprocess_for_2_devices(tmp_path):
  """The CPU path: a fresh process with a forced device count, results back as JSON."""
  cfg = _tiny_cfg(subprocess=True, host_baseline=False, steps_per_call="",
                  device_counts="1,2", tasks_per_device="1")
  if jax.default_backend() != "cpu":
    pytest.skip("subprocess device-count trick is CPU-only")
  by_n = {2: bench.plan(cfg)[2]}
  res = bench.run_points(cfg, by_n, str(tmp_path), log=lambda *_: None)
  assert len(res) == 1 and not res[0].get("error"), res[0].get("error")
  assert res[0]["num_devices"] == 2 and res[0]["total_tasks_per_estimator"] == 2
  assert os.path.exists(tmp_path / "worker_2dev.json")


@pytest.mark.slow  # kept out of the default run for time; `-m slow` runs it
def test_two_process_gloo_run(tmp_path):
  """Multi-process weak scaling: 1 then 2 processes (one CPU device each, gloo) run the
  fused step through the library unchanged and report timings."""
  if jax.default_backend() != "cpu":
    pytest.skip("the multi-process experiment is CPU-only")
  cfg = _tiny_cfg(mp_processes=2, mp_tasks_per_process=1, mp_pin=False)
  res = bench.run_multiprocess(cfg, str(tmp_path), log=lambda *_: None)
  assert [r.get("error") for r in res] == [None, None], [r.get("error") for r in res]
  assert [(r["num_processes"], r["num_devices"], r["total_tasks_per_estimator"])
          for r in res] == [(1, 1, 1), (2, 2, 2)]
  assert res[1]["cpu_collectives"] == "gloo" and res[1]["step_time_s"]["median"] > 0


def test_host_fed_ablation_is_planned_and_makes_batches_like_the_task(devices):
  """The on-device vs host-fed batch ablation: planned for workloads with data, and its
  host batches have the shapes and value range of the task's own on-device batches."""
  cfg = _tiny_cfg(workloads="quadratic,image_mlp", host_fed=True)
  kinds = sorted(p["kind"] for pts in bench.plan(cfg).values() for p in pts)
  assert kinds.count("host_fed") == 1
  mesh = sharding.make_mesh(num_devices=1)
  lrn, _ = bench.build_learner(cfg, ["quadratic", "image_mlp"], "pes", 2, mesh)
  quad, image = bench.host_batch_makers(lrn, trunc_length=2, seed=0)
  assert quad is None
  batch = image()
  task = lrn.gradient_estimators[1].truncated_step.task_family.task_fn(0)
  ref = task.sample_batch(jax.random.key(0))
  assert batch["image"].shape == (2, 2) + ref["image"].shape
  assert batch["label"].shape == (2, 2) + ref["label"].shape
  assert batch["image"].dtype == ref["image"].dtype
  assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
  assert float(np.asarray(ref["image"]).max()) > 0.5
