"""The command-line trainer, run as a user runs it (a subprocess)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, timeout=300):
  env = dict(os.environ)
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
  return subprocess.run([sys.executable, "-m", "spmd_lopt.launch", *args], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=timeout)


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
