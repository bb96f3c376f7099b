"""The command-line trainer, run as a user runs it (a subprocess)."""

import json
import os

import pytest

from helpers import run_module


def _run(args, timeout=300):
  return run_module("spmd_lopt.launch", args, num_devices=2, timeout=timeout)


def test_cli_meta_trains_and_writes_its_outputs(tmp_path):
  workdir = tmp_path / "run"
  proc = _run(["--config", "configs/pes_quadratic.py", f"--workdir={workdir}",
               "--config.log_every=25"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == list(range(25, 301, 25))
  assert all({"step", "loss", "loss_avg", "none||mean_loss"} <= set(r) for r in records)
  first = (records[0]["loss_avg"] + records[1]["loss_avg"]) / 2
  last = (records[-1]["loss_avg"] + records[-2]["loss_avg"]) / 2
  assert last < 0.85 * first, (first, last)
  for name in ("theta.lopt", "meta_loss.png", "summary.json", "config.json"):
    assert (workdir / name).stat().st_size > 0
  from spmd_lopt.learned_optimizers import checkpoint, mlp_lopt
  ckpt = checkpoint.load_parameter_checkpoint(str(workdir / "theta.lopt"),
                                              expect=mlp_lopt.MLPLOpt())
  assert ckpt.extra["outer_step"] == 300
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["devices"] == 2 and summary["outer_steps"] == 300
  assert "meta-loss:" in proc.stdout and "steps/s" in proc.stdout


def test_unknown_config_key_override_is_a_clear_error(tmp_path):
  proc = _run([f"--workdir={tmp_path}", "--config.num_taskz=8"], timeout=120)
  assert proc.returncode != 0
  assert "num_taskz" in proc.stderr
  assert "Traceback" not in proc.stderr.splitlines()[-1]


def test_unknown_key_in_config_file_is_a_clear_error(tmp_path):
  cfg = tmp_path / "bad.py"
  cfg.write_text("from spmd_lopt import config\n"
                 "def get_config():\n"
                 "  c = config.base_config()\n"
                 "  c.trunc_lenght = 5\n"
                 "  return c\n")
  proc = _run([f"--config={cfg}", f"--workdir={tmp_path}/w"], timeout=120)
  assert proc.returncode != 0
  assert "Unknown config key(s) ['trunc_lenght']" in proc.stderr


@pytest.mark.parametrize("override,message", [
    ("--config.num_tasks=3", "not divisible by the 2 devices"),
    ("--config.trunc_length=0", "config.trunc_length must be a positive integer"),
])
def test_bad_values_are_clear_errors(tmp_path, override, message):
  proc = _run([f"--workdir={tmp_path}", override], timeout=120)
  assert proc.returncode != 0
  assert message in proc.stderr


TINY = [f"--config.{k}={v}" for k, v in dict(
    tasks="quadratic", num_tasks=4, trunc_length=5, min_length=10, max_length=20,
    random_initial_iteration_offset=20, quadratic_dim=4, lopt_hidden_size=8, log_every=2,
    checkpoint_every=2, checkpoint_every_secs=0, outer_steps=6).items()]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("tiny") / "run"
  proc = _run([f"--workdir={workdir}", *TINY])
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir, proc


def test_default_output_is_the_summary_and_nothing_else(tiny_run):
  """orbax/absl INFO lines (dozens per checkpoint) stay behind --verbosity."""
  workdir, proc = tiny_run
  lines = (proc.stdout + proc.stderr).splitlines()
  assert not [l for l in lines if l[:1] in "IW" and l[1:5].isdigit()], lines[:5]
  assert len(lines) <= 10, lines
  wrote = [l for l in proc.stdout.splitlines() if l.strip().startswith("wrote:")]
  assert wrote, proc.stdout
  for name in ("metrics.jsonl", "theta.lopt", "summary.json", "config.json",
               "checkpoints" + os.sep):
    assert os.path.join(str(workdir), name) in wrote[0], wrote[0]


@pytest.mark.slow  # one more launcher process
def test_verbosity_flag_shows_library_info(tmp_path):
  proc = _run([f"--workdir={tmp_path / 'v'}", "--verbosity=0", *TINY[:-1],
               "--config.outer_steps=2"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert any(l.startswith("I") and l[1:5].isdigit() for l in proc.stderr.splitlines())


def test_finished_workdir_says_nothing_to_train_and_keeps_its_summary(tiny_run):
  workdir, _ = tiny_run
  before = {n: (workdir / n).read_bytes() for n in ("summary.json", "metrics.jsonl",
                                                     "theta.lopt")}
  proc = _run([f"--workdir={workdir}", *TINY])
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "nothing to train" in proc.stderr
  assert "Meta-trained" not in proc.stdout
  assert {n: (workdir / n).read_bytes() for n in before} == before


def test_mesh_with_a_non_task_axis_is_refused_in_one_line(tmp_path):
  proc = _run([f"--workdir={tmp_path}", "--mesh=tasks=1,model=2", *TINY], timeout=120)
  assert proc.returncode == 2
  err = proc.stderr.strip().splitlines()
  assert len(err) == 1 and "'model': 2" in err[0] and "--mesh tasks=2" in err[0], err


def _strict_load(text):
  def refuse(name):
    raise ValueError(f"non-strict JSON constant {name}")
  return json.loads(text, parse_constant=refuse)


def test_every_json_the_launcher_writes_is_strict(tmp_path, monkeypatch, devices):
  """A run whose meta-loss is NaN (diverged) still writes only strict JSON: metrics,
  summary, config and the checkpoints' metadata (NaN becomes null)."""
  import numpy as np
  from spmd_lopt import config as config_lib
  from spmd_lopt import launch
  from spmd_lopt import sharding
  from spmd_lopt.outer_trainers import gradient_learner

  orig = gradient_learner.SpmdGradientLearner.update

  def nan_update(self, *a, **k):
    state, loss, metrics = orig(self, *a, **k)
    return state, loss * np.float32("nan"), metrics

  monkeypatch.setattr(gradient_learner.SpmdGradientLearner, "update", nan_update)
  cfg = config_lib.base_config()
  cfg.update(dict(tasks="quadratic", num_tasks=4, trunc_length=5, min_length=10,
                  max_length=20, random_initial_iteration_offset=20, quadratic_dim=4,
                  lopt_hidden_size=8,
                  log_every=2, checkpoint_every=3, checkpoint_every_secs=0.0,
                  outer_steps=4))
  workdir = tmp_path / "w"
  launch.train(cfg, str(workdir), mesh=sharding.make_mesh(num_devices=2),
               show_progress=False)
  checked = []
  for root, _, files in os.walk(workdir):
    for name in files:
      path = os.path.join(root, name)
      try:
        text = open(path, encoding="utf-8").read()
      except UnicodeDecodeError:
        continue  # array data
      if name.endswith(".jsonl"):
        [_strict_load(l) for l in text.splitlines() if l.strip()]
      elif name.endswith(".json") or text.lstrip()[:1] in ("{", "["):
        _strict_load(text)
      else:
        continue
      checked.append(os.path.relpath(path, workdir))
  assert {"metrics.jsonl", "summary.json", "config.json",
          os.path.join("checkpoints", "3", "meta", "metadata")} <= set(checked), checked
  assert json.loads((workdir / "summary.json").read_text())["meta_loss_end"] is None


def test_steady_state_rate_ends_with_the_last_step(monkeypatch):
  """Time after ``stop`` (the final checkpoint, the outputs) is not in steps/s."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from spmd_lopt.train import outputs  # pylint: disable=import-outside-toplevel
  now = [100.0]
  monkeypatch.setattr(outputs.time, "time", lambda: now[0])
  timer = outputs.Timer()
  now[0] += 20.0
  timer.tick(jnp.zeros(()), 1)   # compile + first call: 20 s
  for _ in range(10):
    now[0] += 0.5
    timer.tick(jnp.zeros(()), 1)
  timer.stop(jnp.zeros(()))
  now[0] += 30.0                 # final checkpoint, plots
  assert timer.compile_s == pytest.approx(20.0)
  assert timer.steps_per_s() == pytest.approx(2.0)
