"""The command-line trainer: ``python -m spmd_lopt.launch --config configs/X.py``.

``train`` is the loop: build the learner a config describes, start it (fresh, or from
the newest valid checkpoint with exactly the keys an uninterrupted run would use), run
``outer_steps`` fused meta steps, then write the learned optimizer's weights, plots and
``summary.json``. The helpers around the loop live in ``spmd_lopt.train``: ``resume``
(checkpoints), ``keys`` (the key schedule), ``stopping`` (SIGTERM/SIGINT and the per-step
multi-process agreement), ``outputs`` (metrics records, progress, strict JSON, summary).

Flags: ``--config`` (a config file; ``--config.KEY=VALUE`` overrides any key, e.g.
``--config.estimators.0.num_tasks=16``; ``--print_config`` prints the resolved config),
``--workdir`` (default ``runs/<config.name>``), ``--restore_from``, ``--mesh`` (the task
axis only, for now), ``--verbosity`` (absl; library INFO lines only when given) and the
multi-process ``--coordinator_address/--num_processes/--process_id/--init_timeout_s``.
Only process 0 writes files (checkpoints: every process writes its own shards).

SIGTERM/SIGINT on any process: every process finishes the current step, one checkpoint
is written, and each exits with 128 + the signal. A workdir already at ``outer_steps``
is left untouched ("nothing to train").
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from typing import Any, Optional

from absl import app
from absl import flags
from absl import logging
import jax

from spmd_lopt import checkpoints
from spmd_lopt import config as config_lib
from spmd_lopt import multihost
from spmd_lopt import sharding
from spmd_lopt.evaluation import periodic  # periodic evaluation (config.eval_every)
from spmd_lopt.learned_optimizers import checkpoint as lopt_checkpoint
from spmd_lopt.train import keys
from spmd_lopt.train import outputs
from spmd_lopt.train import resume
from spmd_lopt.train import stopping

Preempted = stopping.Preempted  # raised by train()

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "default_config.py")
_FLAGS = {}


_S, _B, _I, _F = (flags.DEFINE_string, flags.DEFINE_boolean, flags.DEFINE_integer,
                  flags.DEFINE_float)
# key in _FLAGS: (absl definer, flag name, default, help); the module docstring says more.
_FLAG_SPECS = {
    "config": (_S, "config", _DEFAULT_CONFIG,
               "Config file (Python, get_config()); --config.KEY=VALUE overrides any key, "
               "also in sections and list entries (--config.estimators.0.num_tasks=16)."),
    "print_config": (_B, "print_config", False, "Print the resolved config (every key) and "
                     "exit without training."),
    "workdir": (_S, "workdir", None, "Where outputs and checkpoints go (default: "
                "runs/<config.name>); one that holds a checkpoint is resumed."),
    "restore_from": (_S, "restore_from", None, "Start from the latest valid checkpoint of "
                     "this run or checkpoint directory when --workdir holds none."),
    "mesh": (_S, "mesh", None, "Mesh axes over all global devices, e.g. 'tasks=4,model=2' "
             "(default: one 'tasks' axis)."),
    "coordinator": (_S, "coordinator_address", None, "HOST:PORT of process 0 for "
                    "multi-process runs; 'auto': jax.distributed.initialize() configures "
                    "itself (Cloud TPU VMs); omit on SLURM (detected)."),
    "num_processes": (_I, "num_processes", None, "Processes in the run."),
    "process_id": (_I, "process_id", None, "This process's index."),
    "init_timeout": (_F, "init_timeout_s", 300.0,
                     "Seconds to wait for the coordinator and the other processes."),
}


def _define_flags():
  """Defined at start-up, not import, so importing this module defines no flags.
  ``--config.KEY=VALUE`` overrides are not absl flags: ``_parse_flags`` takes them out
  and ``config.load`` applies them."""
  for key, (define, name, default, help_text) in _FLAG_SPECS.items():
    _FLAGS[key] = define(name, default, help_text)


def _finished(workdir: str, step: int, cfg) -> dict[str, Any]:
  """A workdir already at ``outer_steps``: say so, touch nothing, return its summary."""
  if multihost.is_logging_process():
    print(f"spmd_lopt: {workdir} is already at outer step {step} >= outer_steps="
          f"{cfg.outer_steps}: nothing to train (its files are left as they are). Raise "
          "--config.outer_steps to continue, or use another --workdir for a fresh run.",
          file=sys.stderr, flush=True)
  path = os.path.join(workdir, "summary.json")
  previous = {}
  if os.path.exists(path):
    with open(path) as f:
      previous = json.load(f)
  return dict(previous, nothing_to_train=True)


def _finish(cfg, learner, workdir, state, step, log, timer, start, evaluator):
  """Write theta, plots and summary.json (process 0); return the summary."""
  summary = outputs.summary(cfg, learner, log.records, timer,
                            start.step if start.resumed else None)
  summary["workdir"] = os.path.abspath(workdir)
  if not multihost.is_logging_process():
    return summary
  theta_path = os.path.join(workdir, "theta.lopt")
  lopt_checkpoint.save_parameter_checkpoint(
      theta_path, learner.meta_init, jax.device_get(learner.get_meta_params(state)),
      extra={"outer_step": step, "config": cfg.name})
  plot_path = os.path.join(workdir, "meta_loss.png")
  if log.records:
    outputs.plot_meta_loss(log.records, plot_path, f"{cfg.name}: meta-loss")
  ckdir = os.path.join(workdir, "checkpoints")
  summary.update(theta=theta_path, plot=plot_path if log.records else None,
                 metrics=log.path, eval_plot=evaluator.finish(workdir),
                 summary=os.path.join(workdir, "summary.json"),
                 config_file=os.path.join(workdir, "config.json"),
                 checkpoints=ckdir + os.sep if os.path.isdir(ckdir) else None)
  outputs.write_json(summary["summary"], summary)
  return summary


def train(cfg, workdir: str, mesh: Optional[jax.sharding.Mesh] = None,
          show_progress: bool = True, restore_from: Optional[str] = None,
          mesh_spec: str = "") -> dict[str, Any]:
  """Meta-train as ``cfg`` says, writing into ``workdir``; returns the summary.

  Resumes from ``<workdir>/checkpoints`` when it holds a checkpoint (else from
  ``restore_from``'s latest) with exactly the keys of an uninterrupted run
  (``train.resume``). On SIGTERM/SIGINT, on any process: every process finishes the
  step, one checkpoint is written, ``Preempted`` is raised. A workdir already at
  ``outer_steps`` is left alone (the summary says ``nothing_to_train``), unless its
  ``summary.json`` is missing (killed while finishing): then the outputs are written
  from the final checkpoint.
  """
  # Before anything that could enter a collective: all processes must run one program.
  multihost.check_same_across_processes(dict(cfg.to_dict(), __mesh__=mesh_spec))
  if mesh is not None:
    sharding.check_tasks_axis_only(mesh, mesh_spec)
  learner = config_lib.make_learner(cfg, mesh=mesh)
  is_main = multihost.is_logging_process()
  if is_main:
    os.makedirs(workdir, exist_ok=True)
  ckpt = resume.RunCheckpoints(cfg, learner, workdir)
  timer = outputs.Timer()
  start = ckpt.start(keys.init_key(cfg.seed), restore_from)
  # summary.json is written last: without it, a run killed after its final checkpoint
  # still gets its outputs (from that checkpoint, no step run).
  if start.step >= cfg.outer_steps and os.path.exists(os.path.join(workdir, "summary.json")):
    ckpt.close()
    return _finished(workdir, start.step, cfg)
  if is_main:
    outputs.write_json(os.path.join(workdir, "config.json"), cfg.to_dict())
  call_keys = keys.step_keys(cfg, learner.mesh, start.step)
  log = outputs.Log(cfg, workdir, start.step, start.resumed, start.pending, is_main,
                    show_progress)
  # Evaluation runs on every process (same program, replicated theta): none waits.
  evaluator = periodic.PeriodicEvaluator.from_config(cfg, learner)
  spc, state, step = cfg.steps_per_call, start.state, start.step
  with stopping.StopRequest() as stop:
    try:
      first, num_calls = start.step // spc, cfg.outer_steps // spc
      ahead = keys.keys_ahead(call_keys, lambda: state)
      for c in range(first, num_calls):
        key = next(ahead)
        if spc == 1:
          state, loss, metrics = learner.update(state, key, with_metrics=True)
        else:
          state, loss, metrics = learner.update_many(state, key, spc, with_metrics=True)
        # The previous checkpoint's write overlapped this step's dispatch; it must be
        # durable before this step is recorded (a kill then loses <= one interval).
        ckpt.settle()
        step = (c + 1) * spc
        timer.tick(loss, spc)
        if c == num_calls - 1:
          timer.stop(loss)  # before the final checkpoint
        log.add(loss, metrics)
        if log.due(step):
          log.write(step, evaluator.maybe_evaluate(step, state))
        log.progress(step, spc)
        due, signum = stopping.agree(ckpt.due(step), stop.signum or 0)
        if due or signum or (c == num_calls - 1 and ckpt.enabled):  # the last: to continue
          ckpt.save(step, state, log.pending_losses())
        if signum:
          raise stopping.Preempted(signum, step, ckpt.directory)
    finally:
      log.close()
      ckpt.close()
  jax.block_until_ready(state)
  return _finish(cfg, learner, workdir, state, step, log, timer, start, evaluator)


def _quiet_by_default():
  """Default output is the progress bar, the summary and warnings: library INFO chatter
  (orbax logs ~60 lines per checkpoint) only with an explicit ``--verbosity``."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
    for var in ("TPU_STDERR_LOG_LEVEL", "TPU_MIN_LOG_LEVEL"):  # libtpu's start-up INFO
      os.environ.setdefault(var, "1")


def _main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  _quiet_by_default()
  # Before anything touches a device: join the other processes (if any).
  multihost.initialize(_FLAGS['coordinator'].value, _FLAGS['num_processes'].value,
                      _FLAGS['process_id'].value, timeout_s=_FLAGS['init_timeout'].value)
  cfg = config_lib.load(_FLAGS['config'].value, _OVERRIDES)
  if _FLAGS['print_config'].value:
    print(config_lib.format_config(cfg), flush=True)
    return
  workdir = _FLAGS['workdir'].value or os.path.join("runs", cfg.name)
  mesh = sharding.mesh_from_spec(_FLAGS['mesh'].value) if _FLAGS['mesh'].value else None
  summary = train(cfg, workdir, mesh=mesh, restore_from=_FLAGS['restore_from'].value,
                  mesh_spec=_FLAGS['mesh'].value or "")
  if multihost.is_logging_process() and not summary.get("nothing_to_train"):
    print(outputs.summary_text(summary), flush=True)


def main(argv):
  try:
    _main(argv)
  except Preempted as e:
    print(f"spmd_lopt: {e}", file=sys.stderr, flush=True)
    sys.exit(128 + e.signum)
  except (ValueError, TimeoutError, FileNotFoundError,
          checkpoints.NoValidCheckpointError) as e:
    # Errors raised by spmd_lopt itself (config checks, ConfigMismatchError, coordinator
    # timeout, ...) say what to fix: one line, no traceback. Anything raised elsewhere
    # (a bug, a JAX error) keeps its traceback.
    frames = traceback.extract_tb(e.__traceback__)
    if not frames or f"{os.sep}spmd_lopt{os.sep}" not in frames[-1].filename:
      raise
    _fail(str(e))


def _fail(message: str):
  print(f"spmd_lopt: error: {message}", file=sys.stderr, flush=True)
  sys.exit(2)


_OVERRIDES = []


def _parse_flags(argv):
  """absl's parsing of everything but ``--config.KEY=VALUE`` (kept for config.load);
  bad flags are reported in one line."""
  try:
    rest, overrides = config_lib.split_args(argv)
    _OVERRIDES[:] = overrides
    return flags.FLAGS(rest)
  except (flags.Error, ValueError) as e:
    _fail(" ".join(f"bad flag: {e}".split()))


def run():
  _define_flags()
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
