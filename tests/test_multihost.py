"""From one host to many (issue 7): 2 processes x 2 CPU devices (gloo, coordinator on
127.0.0.1) against 1 process x 4 devices; checkpoints across process counts; refused
mismatched configs; an unreachable coordinator; meshes from ``--mesh``.

The subprocesses run the real CLI (``python -m spmd_lopt.launch``); the 1-process
baselines run in this pytest process on 4 of its 8 virtual devices.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from spmd_lopt import checkpoints
from spmd_lopt import config as config_lib
from spmd_lopt import launch
from spmd_lopt import multihost
from spmd_lopt import sharding

from helpers import SLOW_STEPS as _SLOW_STEPS
from helpers import global_rel_err
from helpers import run_records as _records
from helpers import run_theta as _theta

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = dict(tasks="quadratic", num_tasks=8, trunc_length=5, min_length=10, max_length=20,
            random_initial_iteration_offset=20, quadratic_dim=4, lopt_hidden_size=8,
            log_every=5, checkpoint_every=5, checkpoint_every_secs=0.0, std=0.1,
            outer_steps=10)


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _spawn(workdir, num_processes, port, per_process=None, timeout_s=120, only=None,
           prelude="", env=None, **overrides):
  """Start ``num_processes`` CLI processes (or just those in ``only``) with 2 CPU devices
  each; return them. ``prelude``: Python run first, or ``{process_id: code}``."""
  procs = []
  for i in (range(num_processes) if only is None else only):
    conf = {**TINY, **overrides, **((per_process or {}).get(i, {}))}
    code = prelude.get(i, "") if isinstance(prelude, dict) else prelude
    environ = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
                   JAX_PLATFORMS="cpu", PYTHONPATH=REPO + os.pathsep +
                   os.environ.get("PYTHONPATH", ""), **(env or {}))
    # No persistent compilation cache (conftest sets one): process 0 would load what
    # process 1 compiles, and the gap can outlast gloo's connect timeout (README,
    # "Why no compilation cache with 2 processes").
    environ.pop("JAX_COMPILATION_CACHE_DIR", None)
    argv = [f"--workdir={workdir}", f"--coordinator_address=127.0.0.1:{port}",
            f"--num_processes={num_processes}", f"--process_id={i}",
            f"--init_timeout_s={timeout_s}"]
    argv += [f"--config.{k}={v}" for k, v in conf.items()]
    cmd = [sys.executable, "-c", f"import sys; sys.argv = ['launch'] + {argv!r}\n"
           f"{code}\nfrom spmd_lopt.launch import run\nrun()\n"]
    procs.append(subprocess.Popen(cmd, env=environ, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
  return procs


def _finish(procs, timeout=400):
  outs = []
  try:
    for p in procs:
      out, err = p.communicate(timeout=timeout)
      outs.append((p.returncode, out, err))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  return outs


def _cfg(**overrides):
  cfg = config_lib.base_config()
  cfg.update({**TINY, **overrides})
  cfg.lock()
  return cfg


# Marks each process that runs a periodic evaluation (in $EVAL_MARKS/eval_<process>).
_MARK_EVALS = """
import os, jax
from spmd_lopt.evaluation import periodic as _ev  # the name PeriodicEvaluator calls
_orig_eval = _ev.evaluate_theta
def _marked_eval(*a, **k):
  with open(os.path.join(os.environ["EVAL_MARKS"], f"eval_{jax.process_index()}"), "a") as f:
    f.write("x")
  return _orig_eval(*a, **k)
_ev.evaluate_theta = _marked_eval
"""
EVAL = dict(eval_every=10, eval_steps=5, eval_seeds=1)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
  """2 processes x 2 devices, 10 steps, with a periodic evaluation at step 10 (which
  must not change the trajectory: the 1-process baseline has none)."""
  workdir = str(tmp_path_factory.mktemp("two_proc"))
  marks = str(tmp_path_factory.mktemp("eval_marks"))
  outs = _finish(_spawn(workdir, 2, _free_port(), prelude=_MARK_EVALS,
                        env={"EVAL_MARKS": marks}, **EVAL))
  for rc, out, err in outs:
    assert rc == 0, err[-4000:]
  return workdir, outs, marks


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory, devices):
  workdir = str(tmp_path_factory.mktemp("one_proc"))
  launch.train(_cfg(), workdir, mesh=sharding.make_mesh(num_devices=4),
               show_progress=False)
  return workdir


def test_two_processes_equal_one_process_with_four_devices(two_process_run,
                                                           one_process_run):
  """Same global mesh size (4), same tasks per device: only the cross-process all-reduce
  (gloo) may sum in another order, so 1e-5 (relative, global norm for theta)."""
  workdir, outs, _ = two_process_run
  got, want = _records(workdir), _records(one_process_run)
  assert [r["step"] for r in got] == [5, 10]  # one writer: no duplicated lines
  for g, w in zip(got, want):
    np.testing.assert_allclose([g["loss"], g["loss_avg"]], [w["loss"], w["loss_avg"]],
                               rtol=1e-5)
  assert global_rel_err(_theta(workdir), _theta(one_process_run)) < 1e-5
  # Only process 0 printed the summary and wrote the summary's files.
  assert "Meta-trained" in outs[0][1] and "Meta-trained" not in outs[1][1]
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  assert summary["processes"] == 2 and summary["devices"] == 4
  # Each process wrote its own shards of the checkpoint.
  state_dir = os.path.join(workdir, "checkpoints", "10", "state")
  assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(os.listdir(state_dir))


def test_periodic_evaluation_runs_on_every_process(two_process_run):
  """Not on process 0 alone while the others wait at the next collective."""
  workdir, _, marks = two_process_run
  assert sorted(os.listdir(marks)) == ["eval_0", "eval_1"]
  assert "eval/time_s" in _records(workdir)[-1]


@pytest.mark.parametrize("num_devices", [4, 1])
def test_checkpoint_of_two_processes_restores_in_one(two_process_run, one_process_run,
                                                     num_devices):
  """The whole state written by 2 processes (step 10) restores in 1 process on 4 or 1
  devices and equals the 1-process run's state at step 10."""
  lrn = config_lib.make_learner(_cfg(), mesh=sharding.make_mesh(num_devices=num_devices))
  states = []
  for workdir in (two_process_run[0], one_process_run):
    ck = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
    state, meta = ck.restore_latest(lrn, _cfg().to_dict())
    ck.close()
    assert meta["step"] == 10
    states.append(jax.device_get(state))
  assert global_rel_err(states[0], states[1]) < 1e-5
  assert global_rel_err(lrn.get_meta_params(states[0]), _theta(one_process_run)) < 1e-5


@pytest.mark.slow  # kept out of the default run for time; `-m slow` runs it
def test_resume_two_process_checkpoint_in_one_process(two_process_run, one_process_run,
                                                      tmp_path):
  """... and training continues from it: 5 more steps on 1 process x 4 devices equal 5
  more steps of the 1-process run."""
  cont = {}
  for name, src in (("from_two", two_process_run[0]), ("from_one", one_process_run)):
    workdir = tmp_path / name
    shutil.copytree(os.path.join(src, "checkpoints"), workdir / "checkpoints")
    s = launch.train(_cfg(outer_steps=15), str(workdir),
                     mesh=sharding.make_mesh(num_devices=4), show_progress=False)
    assert s["resumed_from_step"] == 10
    cont[name] = (_records(workdir), _theta(workdir))
  np.testing.assert_allclose(cont["from_two"][0][-1]["loss"], cont["from_one"][0][-1]["loss"],
                             rtol=1e-5)
  assert global_rel_err(cont["from_two"][1], cont["from_one"][1]) < 1e-5


def test_process_with_a_different_config_is_refused(tmp_path):
  outs = _finish(_spawn(str(tmp_path / "w"), 2, _free_port(),
                        per_process={1: {"std": 0.2}}))
  for i, (rc, _, err) in enumerate(outs):
    assert rc == 2, err[-4000:]
    assert "Processes disagree on the config: key(s) ['std']" in err
    assert f"this is process {i}" in err and "Traceback" not in err
  assert not os.path.exists(tmp_path / "w" / "metrics.jsonl")


def test_unreachable_coordinator_times_out_with_a_clear_message(tmp_path):
  port = _free_port()  # nobody listens there
  (rc, _, err), = _finish(_spawn(str(tmp_path / "w"), 2, port, timeout_s=3, only=[1]))
  assert rc == 2, err[-4000:]
  assert f"Could not reach the JAX coordinator at 127.0.0.1:{port} within 3 s" in err
  assert "Traceback" not in err


def test_mesh_from_spec(devices):
  mesh = sharding.mesh_from_spec("tasks=4,model=2")
  assert dict(mesh.shape) == {"tasks": 4, "model": 2}
  assert dict(sharding.mesh_from_spec("tasks=-1,model=2").shape) == {"tasks": 4, "model": 2}
  with pytest.raises(ValueError, match="has 6 devices but 8"):
    sharding.mesh_from_spec("tasks=3,model=2")
  with pytest.raises(ValueError, match="NAME=SIZE"):
    sharding.mesh_from_spec("tasks:4")


@pytest.mark.slow  # kept out of the default run for time; `-m slow` runs it
def test_learner_on_a_2d_mesh_shards_tasks_only(devices):
  """On tasks=4 x model=2 the unroll states are split 4 ways (replicated over 'model')
  and one step equals the 1-D 4-device mesh's."""
  out = {}
  for spec in ("tasks=4,model=2", "tasks=4"):
    devs = None if "model" in spec else jax.devices()[:4]
    lrn = config_lib.make_learner(_cfg(), mesh=sharding.mesh_from_spec(spec, devs))
    state = lrn.init(jax.random.key(0))
    state, loss, _ = lrn.update(state, jax.random.key(1))
    leaf = state.gradient_estimator_states[0].accumulator["params"]["Dense_0"]["kernel"]
    assert leaf.addressable_shards[0].data.shape[0] == 2  # 8 tasks / 4
    out[spec] = jax.device_get((loss, lrn.get_meta_params(state)))
  np.testing.assert_allclose(out["tasks=4,model=2"][0], out["tasks=4"][0], rtol=1e-6)
  assert global_rel_err(out["tasks=4,model=2"][1], out["tasks=4"][1]) < 1e-6


def test_cluster_detection(monkeypatch):
  for var in ("SLURM_JOB_ID", "OMPI_MCA_orte_hnp_uri", "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(var, raising=False)
  assert multihost.detected_cluster() is None
  assert multihost.initialize() is False  # single process: nothing to do
  for k, v in dict(SLURM_JOB_ID="1", SLURM_STEP_NODELIST="n[1-2]", SLURM_NTASKS="2",
                   SLURM_PROCID="0", SLURM_LOCALID="0").items():
    monkeypatch.setenv(k, v)
  assert multihost.detected_cluster() == "SLURM"
  with pytest.raises(ValueError, match="needs all of --coordinator_address"):
    multihost.initialize(coordinator_address="127.0.0.1:1234")


# Appends one character per meta step to $STEP_FILE<process index>.
_COUNT_STEPS = """
import os, jax
from spmd_lopt.outer_trainers import gradient_learner as _glc
_orig_counted = _glc.SpmdGradientLearner.update
def _counted_update(self, *a, **k):
  out = _orig_counted(self, *a, **k)
  with open(os.environ["STEP_FILE"] + str(jax.process_index()), "a") as f:
    f.write(".")
  return out
_glc.SpmdGradientLearner.update = _counted_update
"""


def _steps_done(prefix, process):
  try:
    with open(prefix + str(process)) as f:
      return len(f.read())
  except FileNotFoundError:
    return 0


@pytest.mark.slow
def test_sigterm_to_one_process_stops_all_at_the_next_step(tmp_path):
  """SIGTERM reaches only process 1 of a run that logs every 1000 steps: both processes
  stop within a step of it (not at the next log step), write one checkpoint together
  and exit with 143; a new 2-process launch resumes there."""
  workdir, counter = str(tmp_path / "w"), str(tmp_path / "steps_")
  procs = _spawn(workdir, 2, _free_port(), prelude=_SLOW_STEPS + _COUNT_STEPS,
                 env={"STEP_FILE": counter}, outer_steps=100000, checkpoint_every=0,
                 log_every=1000)
  try:
    deadline = time.time() + 300
    while _steps_done(counter, 1) < 3:
      assert time.time() < deadline and all(p.poll() is None for p in procs)
      time.sleep(0.05)
    signalled_at = _steps_done(counter, 1)
    procs[1].send_signal(signal.SIGTERM)
  finally:
    outs = _finish(procs, timeout=120)
  for rc, _, err in outs:
    assert rc == 128 + signal.SIGTERM, err[-4000:]
  (stopped_at,) = [int(d) for d in os.listdir(os.path.join(workdir, "checkpoints"))]
  # The step running when the signal came, and at most the one already dispatched.
  assert signalled_at <= stopped_at <= signalled_at + 2, (signalled_at, stopped_at)
  assert f"after outer step {stopped_at}" in outs[0][2]
  outs = _finish(_spawn(workdir, 2, _free_port(), outer_steps=stopped_at + 5,
                        log_every=1000))
  for rc, _, err in outs:
    assert rc == 0, err[-4000:]
  with open(os.path.join(workdir, "summary.json")) as f:
    assert json.load(f)["resumed_from_step"] == stopped_at
  assert [r["step"] for r in _records(workdir)] == [stopped_at + 5]


# On the process it runs in, the first fingerprint check (the newest checkpoint's)
# fails, as if that host's copy of the checkpoint were damaged.
_DAMAGED_HERE = """
from spmd_lopt import checkpoints as _ck
_orig_fp, _seen = _ck.fingerprint, []
def _damaged_first(state):
  fp = _orig_fp(state)
  if not _seen:
    _seen.append(1)
    k = sorted(fp)[0]
    fp[k] = format(int(fp[k], 16) ^ 1, "08x")
  return fp
_ck.fingerprint = _damaged_first
"""


@pytest.mark.slow
def test_checkpoint_damaged_on_one_process_only(two_process_run, tmp_path):
  """Step 10 reads back damaged on process 1 only: both processes agree to set it aside
  and resume from step 5, and recompute step 10 exactly as before."""
  src, _, _ = two_process_run
  workdir = tmp_path / "w"
  shutil.copytree(os.path.join(src, "checkpoints"), workdir / "checkpoints")
  shutil.copy(os.path.join(src, "metrics.jsonl"), workdir / "metrics.jsonl")
  outs = _finish(_spawn(str(workdir), 2, _free_port(), prelude={1: _DAMAGED_HERE},
                        outer_steps=15, **EVAL))
  for rc, _, err in outs:
    assert rc == 0, err[-4000:]
  with open(workdir / "summary.json") as f:
    assert json.load(f)["resumed_from_step"] == 5
  assert [d.split("-")[0] for d in os.listdir(workdir / "checkpoints_corrupt")] == ["10"]
  got, want = _records(str(workdir)), _records(src)
  assert [r["step"] for r in got] == [5, 10, 15]
  np.testing.assert_allclose([got[1]["loss"], got[1]["loss_avg"]],
                             [want[1]["loss"], want[1]["loss_avg"]], rtol=1e-6)


@pytest.mark.slow
def test_one_process_checkpoint_restored_by_two_processes(one_process_run, tmp_path):
  """Step 10 of the 1-process (4-device) run continues on 2 processes x 2 devices to
  step 15, equal to continuing it in 1 process."""
  runs = {}
  for name in ("two", "one"):
    workdir = tmp_path / name
    shutil.copytree(os.path.join(one_process_run, "checkpoints"), workdir / "checkpoints")
    runs[name] = str(workdir)
  outs = _finish(_spawn(runs["two"], 2, _free_port(), outer_steps=15))
  for rc, _, err in outs:
    assert rc == 0, err[-4000:]
  launch.train(_cfg(outer_steps=15), runs["one"], mesh=sharding.make_mesh(num_devices=4),
               show_progress=False)
  with open(os.path.join(runs["two"], "summary.json")) as f:
    summary = json.load(f)
  assert summary["resumed_from_step"] == 10 and summary["processes"] == 2
  got, want = _records(runs["two"]), _records(runs["one"])
  assert [r["step"] for r in got] == [15]
  np.testing.assert_allclose(got[-1]["loss"], want[-1]["loss"], rtol=1e-5)
  assert global_rel_err(_theta(runs["two"]), _theta(runs["one"])) < 1e-5


@pytest.mark.slow
def test_local_multiprocess_script(tmp_path):
  """``--workdir DIR`` (space form) puts the process logs there, not in the current
  directory, and the script shows process 0's whole summary."""
  workdir = tmp_path / "mp"
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  args = ["--workdir", str(workdir)] + [f"--config.{k}={v}" for k, v in TINY.items()]
  proc = subprocess.run(["bash", os.path.join(REPO, "launch", "local_multiprocess.sh"),
                         "2", "2", "--", *args], cwd=cwd, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert sorted(p.name for p in workdir.glob("process_*.log")) == ["process_0.log",
                                                                    "process_1.log"]
  assert not list(cwd.iterdir())
  lines = proc.stdout.strip().splitlines()
  assert lines[0].startswith("Meta-trained 'default'"), lines
  assert "summary.json" in lines[-1] and "checkpoints" in lines[-1], lines


def test_auto_calls_jax_distributed_without_arguments(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
  assert multihost.initialize("auto", timeout_s=7) is True
  assert calls == [((), {"initialization_timeout": 7})]
  with pytest.raises(ValueError, match="auto lets JAX find"):
    multihost.initialize("auto", num_processes=2)


def test_compilation_cache_warning_only_for_multi_process_cpu_runs():
  """A persistent cache in a multi-process CPU run is warned about (process 1 misses it
  and may not join gloo in time); one process, another platform or no cache: nothing."""
  msg = multihost.compilation_cache_warning("cpu", 2, "/tmp/cache")
  assert msg and "/tmp/cache" in msg and "2-process" in msg and "\n" not in msg
  assert multihost.compilation_cache_warning("cpu", 1, "/tmp/cache") is None
  assert multihost.compilation_cache_warning("tpu", 8, "/tmp/cache") is None
  assert multihost.compilation_cache_warning("cpu", 2, None) is None
  assert multihost.compilation_cache_warning("cpu", 2, "") is None
