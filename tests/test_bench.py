"""The benchmark harness (spmd_lopt.bench): scaling math on known timings, the plan,
program-size accounting, skipped workloads, and tiny end-to-end runs (in-process and via
a worker subprocess)."""

import importlib
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spmd_lopt import bench
from spmd_lopt import sharding
from spmd_lopt.bench import cost_model, measure, report, stats, workloads


def _script(name: str):
  """The module ``scripts/<name>.py`` (the scripts directory is not a package)."""
  scripts = os.path.join(os.path.dirname(__file__), "..", "scripts")
  if scripts not in sys.path:
    sys.path.insert(0, scripts)
  return importlib.import_module(name)


def test_weak_and_strong_scaling_math():
  weak = stats.weak_scaling({1: 1.0, 2: 1.25, 4: 2.0})
  assert weak[1]["efficiency"] == 1.0
  assert weak[2]["efficiency"] == pytest.approx(0.8)
  assert weak[4]["efficiency"] == pytest.approx(0.5)
  assert weak[2]["throughput_speedup"] == pytest.approx(1.6)
  strong = stats.strong_scaling({1: 8.0, 2: 4.0, 4: 4.0})
  assert strong[2]["speedup"] == pytest.approx(2.0)
  assert strong[2]["efficiency"] == pytest.approx(1.0)
  assert strong[4]["efficiency"] == pytest.approx(0.5)
  with pytest.raises(ValueError):
    stats.strong_scaling({2: 1.0})


def test_time_stats_throughput_and_memory_math():
  st = stats.summarize_times([3.0, 1.0, 100.0, 2.0, 4.0])
  assert (st["median"], st["q25"], st["q75"], st["min"], st["max"], st["n"]) == \
      (3.0, 2.0, 4.0, 1.0, 100.0, 5)
  assert stats.inner_steps_per_meta_step([16, 16], 50) == 3200
  fixed, per_task = stats.fit_memory([(2, 300.0), (4, 500.0), (8, 900.0)])
  assert fixed == pytest.approx(100.0) and per_task == pytest.approx(100.0)
  assert stats.max_tasks_within(1000.0, fixed, per_task) == 9
  assert stats.max_tasks_within(1000.0, fixed, per_task, multiple=4) == 8
  assert stats.fit_memory([(4, 400.0)]) == (0.0, 100.0)
  assert cost_model.corrected_cost(10.0, 3.0, 50) == 10.0 + 49 * 3.0


def _rec(kind, n, tpd, t, spc=1, scaling=(), nproc=1, flops=None):
  return {"kind": kind, "families": ["quadratic"], "estimator": "pes", "num_devices": n,
          "num_processes": nproc, "tasks_per_device": tpd, "steps_per_call": spc,
          "step_time_s": stats.summarize_times([t]), "scaling": list(scaling),
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
  out = bench.run_bench(_tiny_cfg(project_outer_iterations=1000), str(tmp_path),
                        log=lambda *_: None)
  with open(tmp_path / "results.json") as f:
    data = json.load(f)
  assert set(data) >= {"meta", "peak_matmul", "results", "summary"}
  assert set(data["meta"]) >= {"device_kind", "jax_version", "cpu_count", "load_avg_before",
                               "load_avg_after", "platform", "config", "per_entry_mlp_kernel",
                               "celo2_matrix_kernel"}
  assert data["meta"]["per_entry_mlp_kernel"]  # "available" or why not
  assert data["meta"]["celo2_matrix_kernel"]
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
      assert r["program_size"]["text_bytes"] > r["program_size"]["constant_bytes"] >= 0
    assert r["projected_wall_s"] == pytest.approx(1000 * r["step_time_s"]["median"])
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
  lrn, _ = workloads.build_learner(cfg, ["quadratic", "image_mlp"], "pes", 2, mesh)
  quad, image = measure.host_batch_makers(lrn, trunc_length=2, seed=0)
  assert quad is None
  batch = image()
  task = lrn.gradient_estimators[1].truncated_step.task_family.task_fn(0)
  ref = task.sample_batch(jax.random.key(0))
  assert batch["image"].shape == (2, 2) + ref["image"].shape
  assert batch["label"].shape == (2, 2) + ref["label"].shape
  assert batch["image"].dtype == ref["image"].dtype
  assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
  assert float(np.asarray(ref["image"]).max()) > 0.5


def test_program_size_sees_closed_over_arrays_but_not_arguments():
  data = np.arange(4096, dtype=np.float32).reshape(64, 64)
  closed = jax.jit(lambda x: x @ data).lower(np.ones((2, 64), np.float32))
  passed = jax.jit(lambda x, d: x @ d).lower(np.ones((2, 64), np.float32), data)
  size_closed = cost_model.program_size(closed)
  size_passed = cost_model.program_size(passed)
  assert size_closed["largest_constant_bytes"] == data.nbytes
  assert size_closed["constant_bytes"] >= data.nbytes
  assert size_passed["constant_bytes"] < 64
  assert size_closed["text_bytes"] > size_passed["text_bytes"] + data.nbytes


def test_results_json_is_strict(tmp_path):
  report.write_json({"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": 2}},
                    str(tmp_path / "r.json"))
  text = (tmp_path / "r.json").read_text()
  assert json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict {c}")) == \
      {"a": None, "b": [1.0, None], "c": {"d": 2}}


def test_missing_workloads_are_skipped_with_a_reason(devices):
  """Names that a later version adds (a task family, a learned optimizer, the
  reset_mode option) give a skipped record saying what is missing, not an error."""
  cfg = _tiny_cfg(lopt="no_such_lopt")
  point = {"kind": "fused", "num_devices": 1, "tasks_per_device": 1,
           "families": ["quadratic"], "estimator": "pes", "steps_per_call": 1}
  (rec,) = measure.run_worker(cfg, {"points": [point]})
  assert "error" not in rec and "no_such_lopt" in rec["skipped"]
  (rec,) = measure.run_worker(_tiny_cfg(), {"points": [{**point,
                                                        "families": ["NoSuchFamily_8x8"]}]})
  assert "error" not in rec and "NoSuchFamily_8x8" in rec["skipped"]
  assert "SKIPPED" in report.one_line(rec) and "SKIPPED" in report.format_table([rec])
  summ = bench.summarize([rec], peak_flops=1.0, platform_="cpu", budget_bytes=1.0)
  assert summ["strong"] == {} and summ["memory"] == {}
  if not workloads.has_reset_mode():
    (rec,) = measure.run_worker(_tiny_cfg(), {"points": [{**point, "reset_mode": "select"}]})
    assert "error" not in rec and "reset_mode" in rec["skipped"]


def test_reset_mode_ab_is_planned_and_summarised():
  cfg = bench.default_config()
  cfg.device_counts, cfg.strong_total_tasks, cfg.reset_modes = "1", "4", "cond,select"
  cfg.steps_per_call, cfg.host_baseline = "", False
  pts = [p for p in bench.plan(cfg)[1] if p.get("reset_mode")]
  assert sorted(p["reset_mode"] for p in pts) == ["cond", "select"]
  assert all(p["scaling"] == ["reset:4"] for p in pts)
  recs = [{**_rec("fused", 1, 4, t, scaling=["reset:4"]), "reset_mode": m}
          for m, t in (("cond", 2.0), ("select", 1.0))]
  s = bench.summarize(recs, peak_flops=1.0, platform_="cpu", budget_bytes=1e9)
  r = s["reset_mode"]["quadratic/pes/4"]
  assert r["fastest"] == "select" and r["ratio_to_fastest"]["cond"] == pytest.approx(2.0)
  assert s["memory"] == {}  # A/B variants do not enter the memory fit


def test_every_bench_config_loads_and_plans():
  root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "configs", "bench")
  files = sorted(f for f in os.listdir(root) if f.endswith(".py"))
  assert "celo2_recipe.py" in files
  for f in files:
    cfg = bench.load_config(os.path.join(root, f))
    assert any(bench.plan(cfg).values()), f


def test_bad_override_is_one_line(capsys):
  with pytest.raises(SystemExit) as e:
    bench.main(["--config.no_such_key=1"])
  assert "no_such_key" in str(e.value) and "\n" not in str(e.value)
  with pytest.raises(SystemExit) as e:
    bench.main(["--config.repeats=many"])
  assert "repeats" in str(e.value)


def test_help_prints_usage_and_unknown_arguments_are_one_line(capsys):
  bench.main(["--help"])
  assert "--config" in capsys.readouterr().out
  with pytest.raises(SystemExit) as e:
    bench.main(["--config", "configs/bench/smoke.py", "--out", "x"])
  assert "'--out'" in str(e.value) and "\n" not in str(e.value)


def test_trace_step_reads_thunk_times_from_a_profiler_trace(tmp_path):
  """scripts/trace_step.py's parser finds the executed HLO instructions of a traced program
  with positive times and run counts (guards against the profiler's format changing)."""
  trace_step = _script("trace_step")
  f = jax.jit(lambda x: jnp.tanh(x @ x).sum())
  x = jnp.ones((256, 256))
  f(x).block_until_ready()
  with jax.profiler.trace(str(tmp_path), create_perfetto_trace=True):
    for _ in range(3):
      f(x).block_until_ready()
  total, count, by_thread = trace_step.thunk_times(str(tmp_path))
  assert total and all(v >= 0 for v in total.values())
  assert max(count.values()) >= 3  # each instruction ran once per call
  assert set(by_thread) == set(total)
  assert not any(name.startswith("$") or "::" in name for name in total)


def test_profile_step_counts_a_conditional_by_its_largest_or_smallest_branch():
  """scripts/profile_step.py's executed-ops count of a scan whose body holds a cond with a
  costly and a cheap branch: the largest-branch count exceeds the smallest-branch one, and
  both see the scan's trip count."""
  profile_step = _script("profile_step")

  def body(c, x):
    costly = lambda v: jnp.tanh(jnp.sin(v) @ jnp.cos(v).T) @ jnp.exp(v)
    c = jax.lax.cond(x > 0, costly, lambda v: v, c)
    return c * 2.0, None

  f = jax.jit(lambda c, xs: jax.lax.scan(body, c, xs)[0])
  text = f.lower(jnp.ones((8, 8)), jnp.arange(7.0)).compile().as_text()
  most = profile_step.hlo_op_counts(text)
  least = profile_step.hlo_op_counts(text, pick=min)
  (_, trips, big), = [w for w in most if w[1] == 7]
  (_, _, small), = [w for w in least if w[1] == 7]
  assert trips == 7 and big["conditional"] == 1 == small["conditional"]
  assert sum(big.values()) > sum(small.values()) > 0


def test_profile_step_recipe_fills_only_the_flags_not_given():
  """--recipe supplies the Celo2 recipe's settings for flags left out; one given on the
  command line, even with its default value (--lopt mlp_lopt), is kept."""
  profile_step = _script("profile_step")

  def parsed(*argv):
    parser = profile_step.build_parser()
    args = parser.parse_args(list(argv))
    profile_step.apply_recipe(args, parser, list(argv))
    return args

  args = parsed("--recipe")
  assert (args.lopt, args.tasks) == ("celo2", 8)
  args = parsed("--recipe", "--lopt", "mlp_lopt", "--tasks", "4")
  assert (args.lopt, args.tasks) == ("mlp_lopt", 4)
  assert args.bench_config == profile_step.RECIPE["bench_config"]
  assert parsed("--lopt", "mlp_lopt").bench_config == "configs/bench/tutorial.py"


def test_profile_step_option_versions():
  """--options: one item keeps the tag ``opts``; ';' makes one version per item, each with
  its own parsed options (booleans, numbers and enum names as XLA takes them)."""
  profile_step = _script("profile_step")

  assert profile_step.option_versions(None) == {}
  assert profile_step.option_versions("xla_cpu_enable_fast_math=true") == {
      "opts": {"xla_cpu_enable_fast_math": True}}
  several = profile_step.option_versions(
      "xla_cpu_opt_preset=CPU_OPT_PRESET_FAST_RUNTIME;xla_cpu_small_while_loop_byte_threshold=1e6")
  assert several == {
      "opts:xla_cpu_opt_preset=CPU_OPT_PRESET_FAST_RUNTIME":
          {"xla_cpu_opt_preset": "CPU_OPT_PRESET_FAST_RUNTIME"},
      "opts:xla_cpu_small_while_loop_byte_threshold=1e6":
          {"xla_cpu_small_while_loop_byte_threshold": 1000000}}


def test_profile_step_builds_the_workload_with_another_learned_optimizer():
  """--also_lopts: ``build(..., lopt=name)`` gives the same workload (tasks, estimators)
  with that learned optimizer, and leaves ``args.lopt`` alone."""
  profile_step = _script("profile_step")

  parser = profile_step.build_parser()
  args = parser.parse_args(["--workload", "quadratic", "--tasks", "8",
                            "--also_lopts", "learnable_sgd"])
  mesh = sharding.make_mesh(num_devices=1)
  lrn, _ = profile_step.build(args, mesh)
  other, _ = profile_step.build(args, mesh, lopt="learnable_sgd")
  kind = lambda l: type(l.gradient_estimators[0].truncated_step.learned_opt).__name__
  assert (kind(lrn), kind(other)) == ("MLPLOpt", "LearnableSGD")
  assert args.lopt == "mlp_lopt"
  assert ([e.truncated_step.num_tasks for e in lrn.gradient_estimators] ==
          [e.truncated_step.num_tasks for e in other.gradient_estimators] == [8])


def test_celo2_kernel_floor_pieces():
  """scripts/celo2_kernel_floor.py: ``timed_scan`` traces the body once inside a scan and
  returns a time; its MLP keeps Celo2's layout (``[lanes, 3, entries]``) and computes the
  3-layer ReLU chain."""
  floor = _script("celo2_kernel_floor")

  traced = []
  def body(c):
    traced.append(c.shape)
    return 2.0 * c
  assert floor.timed_scan(body, jnp.ones(3), steps=3, reps=1) > 0
  assert traced == [(3,)]
  n, e = 2, 16
  w = (jnp.ones((n, 8, 18)), jnp.zeros((n, 8, 1)), jnp.ones((n, 8, 8)), jnp.zeros((n, 8, 1)),
       jnp.ones((n, 3, 8)), jnp.zeros((n, 3, 1)))
  out = floor.mlp(w, jnp.ones((n, 18, e)))
  assert out.shape == (n, 3, e)
  np.testing.assert_allclose(out, 18.0 * 8 * 8)  # all-ones weights, positive activations


def test_per_entry_mlp_rate_builds_both_implementations():
  """scripts/per_entry_mlp_rate.py: its inputs have MLPLOpt's feature layout and both
  implementations it times compute the same outputs."""
  rate = _script("per_entry_mlp_rate")
  feats, k0, b0, tail = rate.inputs(lanes=3, entries=20, hidden=32, layers=2)
  assert [f.shape for f in feats] == [(3, 20, 1), (3, 20, 1), (3, 20, 6)]
  outs = [rate.build(impl, 2)(feats, k0, b0, tail) for impl in ("auto", "reference")]
  assert outs[0].shape == (3, 20, 2)
  np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-5)
  assert rate.timed(rate.build("reference", 2), (feats, k0, b0, tail), reps=1) > 0
