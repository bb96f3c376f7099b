"""The command-line trainer: ``python -m spmd_lopt.launch --config configs/X.py``.

One readable loop: build the learner a config describes, initialise its sharded state,
run ``outer_steps`` fused meta steps, and log. Per logged step one JSON object goes to
``<workdir>/metrics.jsonl`` (``step``, ``loss`` = that step's meta-loss, ``loss_avg`` over
the steps since the last log, and the learner's metrics). At the end: the learned
optimizer's weights, a plot of the meta-loss, ``summary.json`` and a printed summary.

Flags: ``--config`` (a config file; ``--config.KEY=VALUE`` overrides any key, e.g.
``--config.estimators.0.num_tasks=16``; ``--print_config`` prints the resolved config),
``--workdir`` (default ``runs/<config.name>``), ``--restore_from``, ``--mesh`` and the
multi-process ``--coordinator_address/--num_processes/--process_id/--init_timeout_s``.
Only process 0 writes files (checkpoints: every process writes its own shards).

Never lose a run: checkpoints go to ``<workdir>/checkpoints`` (``config.checkpoint_*``,
``spmd_lopt.checkpoints``); launching into a workdir that holds one resumes from its
newest valid checkpoint with exactly the keys an uninterrupted run would have used;
SIGTERM/SIGINT finish the current step, checkpoint, and exit with 128 + the signal.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import traceback
from typing import Any, Optional

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np

from spmd_lopt import checkpoints
from spmd_lopt import config as config_lib
from spmd_lopt import sharding
from spmd_lopt import evaluate as evaluate_lib  # periodic evaluation (config.eval_every)
from spmd_lopt.learned_optimizers import checkpoint as lopt_checkpoint

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "default_config.py")
_FLAGS = {}


def _define_flags():
  """Defined at start-up, not import, so importing this module defines no flags.
  ``--config.KEY=VALUE`` overrides are not absl flags: ``_parse_flags`` takes them out
  and ``config.load`` applies them."""
  _FLAGS['config'] = flags.DEFINE_string(
      "config", _DEFAULT_CONFIG, "Config file (Python, get_config()); override any key "
      "with --config.KEY=VALUE, also in sections and list entries "
      "(--config.estimators.0.num_tasks=16). See --print_config for every key.")
  _FLAGS['print_config'] = flags.DEFINE_boolean(
      "print_config", False, "Print the full resolved config (every section, every "
      "default written out) and exit without training.")
  _FLAGS['workdir'] = flags.DEFINE_string(
      "workdir", None, "Where metrics, weights, plots and checkpoints go (default: "
      "runs/<config.name>). A workdir that holds a checkpoint is resumed.")
  _FLAGS['restore_from'] = flags.DEFINE_string(
      "restore_from", None, "Start from the latest valid checkpoint of another run (its "
      "workdir or checkpoint directory) when --workdir holds none.")
  _FLAGS['mesh'] = flags.DEFINE_string(
      "mesh", None, "Mesh axes over all global devices, e.g. 'tasks=4,model=2' (default: "
      "one 'tasks' axis).")
  _FLAGS['coordinator'] = flags.DEFINE_string(
      "coordinator_address", None, "HOST:PORT of process 0 for multi-process runs; 'auto' "
      "lets jax.distributed.initialize() configure itself (Cloud TPU VMs); omit on SLURM "
      "(detected).")
  _FLAGS['num_processes'] = flags.DEFINE_integer("num_processes", None,
                                                 "Processes in the run.")
  _FLAGS['process_id'] = flags.DEFINE_integer("process_id", None, "This process's index.")
  _FLAGS['init_timeout'] = flags.DEFINE_float(
      "init_timeout_s", 300.0, "Seconds to wait for the coordinator and the other processes.")


def _to_python(tree) -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    v = np.asarray(v)
    out[k] = v.item() if v.size == 1 else v.tolist()
  return out


class _ScalarWriter:
  """TensorBoard scalars when a writer library is installed; otherwise nothing."""

  def __init__(self, workdir: str):
    self._writer = None
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      self._writer = SummaryWriter(os.path.join(workdir, "tb"))
    except ImportError:
      logging.info("tensorboardX not installed: no TensorBoard scalars.")

  def write(self, step: int, scalars: dict[str, float]):
    if self._writer is not None:
      for k, v in scalars.items():
        if isinstance(v, (int, float)):
          self._writer.add_scalar(k.replace("||", "/"), v, step)

  def close(self):
    if self._writer is not None:
      self._writer.close()


def _plot(records, path: str, title: str):
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  steps = [r["step"] for r in records]
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.plot(steps, [r["loss_avg"] for r in records], label="meta-loss (mean since last log)")
  ax.set_xlabel("outer step")
  ax.set_ylabel("meta-loss")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


class Preempted(RuntimeError):
  """Training stopped on SIGTERM/SIGINT after writing a checkpoint."""

  def __init__(self, signum: int, step: int, directory: str):
    self.signum, self.step, self.directory = signum, step, directory
    super().__init__(
        f"Stopped by {signal.Signals(signum).name} after outer step {step}; checkpoint "
        f"written to {directory}/{step}. Launch again with the same --workdir to resume.")


class _StopRequest:
  """Remembers the first SIGTERM/SIGINT; the loop stops after the current step.

  A second SIGINT falls through to Python's default (KeyboardInterrupt) so a stuck run
  can still be interrupted.
  """

  def __init__(self):
    self.signum = None
    self._old = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._old[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    if self.signum is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.signum = signum
    logging.warning("Got %s: finishing the current step, then checkpointing.",
                    signal.Signals(signum).name)

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)


def _agree(local: tuple[bool, bool, int]) -> tuple[bool, bool, int]:
  """(checkpoint due, stop, signal) agreed across processes: process 0's clock decides
  time-based checkpoints, any process's signal stops everyone (a collective, so every
  process must call it at the same steps)."""
  if jax.process_count() == 1:
    return local
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  rows = np.asarray(multihost_utils.process_allgather(
      np.asarray([int(local[0]), int(local[1]), int(local[2])], np.int32)))
  rows = rows.reshape(jax.process_count(), 3)
  stops = rows[rows[:, 1] > 0]
  return bool(rows[0, 0]), bool(len(stops)), int(stops[0, 2]) if len(stops) else 0


def _read_records(path: str, upto_step: int) -> list[dict]:
  """The metrics.jsonl records with ``step <= upto_step`` (a resumed run redoes the
  steps after its checkpoint, so their old records are dropped, not duplicated)."""
  if not os.path.exists(path):
    return []
  out = []
  with open(path) as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        rec = json.loads(line)
      except json.JSONDecodeError:  # a torn last line from a killed run
        continue
      if rec.get("step", 0) <= upto_step:
        out.append(rec)
  return out


def _restore(learner, cfg, workdir: str, restore_from: Optional[str], ckpt):
  """``(state, meta)`` from ``workdir``'s newest valid checkpoint, else from
  ``restore_from``'s, else ``None``."""
  restored = ckpt.restore_latest(learner, cfg.to_dict())
  if restored is not None:
    logging.info("Resuming %s from its checkpoint at step %d.", workdir,
                 restored[1]["step"])
    return restored
  if restore_from:
    other = checkpoints.Checkpointer(checkpoints.find_checkpoint_dir(restore_from),
                                     read_only=True)
    try:
      restored = other.restore_latest(learner, cfg.to_dict())
    finally:
      other.close()
    if restored is None:
      raise FileNotFoundError(f"--restore_from {restore_from!r} holds no checkpoint.")
    logging.info("Starting from %s's checkpoint at step %d.", restore_from,
                 restored[1]["step"])
  return restored


def train(cfg, workdir: str, mesh: Optional[jax.sharding.Mesh] = None,
          show_progress: bool = True, restore_from: Optional[str] = None,
          mesh_spec: str = "") -> dict[str, Any]:
  """Meta-train as ``cfg`` says, writing into ``workdir``; returns the summary.

  Resumes from ``<workdir>/checkpoints`` when it holds a checkpoint (else from
  ``restore_from``'s latest). The call starting at outer step ``s`` uses the key
  ``fold_in(k_steps, s)``, ``k_steps = split(key(seed))[1]``, so a resumed run replays
  exactly the keys of an uninterrupted one. On SIGTERM/SIGINT: finish the step, write a
  checkpoint, raise ``Preempted``.
  """
  # Before anything that could enter a collective: all processes must run one program.
  sharding.check_same_across_processes(dict(cfg.to_dict(), __mesh__=mesh_spec))
  learner = config_lib.make_learner(cfg, mesh=mesh)
  is_main = sharding.is_logging_process()
  if is_main:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(cfg.to_dict(), f, indent=1)
  logging.info("Mesh %s; %d estimator(s): %s", dict(learner.mesh.shape),
               len(learner.gradient_estimators),
               ", ".join(f"{n} ({e.num_tasks} tasks)" for n, e in
                         zip(learner.metric_names, learner.gradient_estimators)))

  ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"),
                                  every_steps=cfg.checkpoint_every,
                                  every_secs=cfg.checkpoint_every_secs,
                                  keep=cfg.keep_checkpoints)
  k_init, k_steps = jax.random.split(jax.random.key(cfg.seed))
  spc = cfg.steps_per_call
  num_calls = cfg.outer_steps // spc

  t_start = time.time()
  try:
    restored = _restore(learner, cfg, workdir, restore_from, ckpt)
  except BaseException:
    ckpt.close()  # let orbax's threads end before the error propagates
    raise
  if restored is None:
    state, start_step, pending = learner.init(sharding.replicate(k_init, learner.mesh)), 0, []
  else:
    state, meta = restored
    start_step = int(meta["step"])
    pending = [np.float32(x) for x in meta.get("pending_losses", [])]
    if start_step % spc:
      raise ValueError(f"The checkpoint is at step {start_step}, not a multiple of "
                       f"steps_per_call={spc}.")
  start_call = min(start_step // spc, num_calls)
  if start_step >= cfg.outer_steps and is_main:
    print(f"spmd_lopt: {workdir} is already at outer step {start_step} >= outer_steps="
          f"{cfg.outer_steps}: nothing to train. Raise --config.outer_steps to continue, "
          "or use another --workdir for a fresh run.", file=sys.stderr, flush=True)
  # Keys of the remaining calls, made on device at once, replicated: the loop never
  # ships a key. Call c (first step c*spc) gets fold_in(k_steps, c*spc).
  starts = np.arange(start_call, max(num_calls, start_call + 1), dtype=np.int32) * spc
  keys = jax.jit(jax.vmap(jax.random.fold_in, in_axes=(None, 0)),
                 out_shardings=sharding.replicated(learner.mesh))(
                     sharding.replicate(k_steps, learner.mesh),
                     sharding.replicate(starts, learner.mesh))

  metrics_path = os.path.join(workdir, "metrics.jsonl")
  records = _read_records(metrics_path, start_step) if restored is not None else []
  if is_main:  # keep the records up to the checkpoint, then append
    tmp = metrics_path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in records)
    os.replace(tmp, metrics_path)
  writer = _ScalarWriter(workdir) if is_main else None
  progress = None
  if is_main and show_progress:
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel
    progress = tqdm(total=cfg.outer_steps, initial=start_call * spc, desc="meta-train",
                    unit="step", disable=not sys.stderr.isatty())
  multi = jax.process_count() > 1

  def save(step):
    host_pending = [float(x) for x in
                    np.concatenate([np.atleast_1d(np.asarray(x)) for x in
                                    jax.device_get(pending)] or [np.zeros(0)])]
    ckpt.save(step, state, {"seed": int(cfg.seed), "config": cfg.to_dict(),
                            "pending_losses": host_pending,
                            "mesh": {str(k): int(v) for k, v in learner.mesh.shape.items()}})

  pending_metrics = []  # not checkpointed: the first window after a resume is shorter
  evaluator = evaluate_lib.PeriodicEvaluator.from_config(cfg, learner, enabled=is_main)
  compile_s, t_steady, steady_steps = None, None, 0
  step = start_call * spc
  with _StopRequest() as stop, open(metrics_path, "a") if is_main else \
      open(os.devnull, "w") as mfile:
    for c in range(start_call, num_calls):
      key = keys[c - start_call]
      if spc == 1:
        state, loss, metrics = learner.update(state, key, with_metrics=True)
      else:
        state, loss, metrics = learner.update_many(state, key, spc, with_metrics=True)
      step = (c + 1) * spc
      if compile_s is None:
        jax.block_until_ready(loss)
        compile_s = time.time() - t_start
        t_steady = time.time()
      else:
        steady_steps += spc
      pending.append(loss)
      pending_metrics.append(metrics)
      log_now = step % cfg.log_every == 0 or step == cfg.outer_steps
      if log_now:
        # One device-to-host copy per log; metrics are averaged over the logged window.
        host_losses, host_metrics = jax.device_get((pending, pending_metrics))
        stack = lambda *xs: np.concatenate([np.atleast_1d(x) for x in xs])
        losses = stack(*host_losses)
        window = jax.tree.map(lambda *xs: stack(*xs).mean(), *host_metrics)
        rec = {"step": step, "loss": float(losses[-1]), "loss_avg": float(losses.mean()),
               "time": time.time() - t_start, **_to_python(window)}
        rec.update(evaluator.maybe_evaluate(step, state))  # {} unless an eval is due
        records.append(rec)
        pending, pending_metrics = [], []
        if is_main:
          mfile.write(json.dumps(rec) + "\n")
          mfile.flush()
          writer.write(step, rec)
          if progress is None or progress.disable:
            logging.info("step %d meta-loss %.4f", step, rec["loss_avg"])
      if progress is not None:
        progress.update(spc)
        if records:
          progress.set_postfix(meta_loss=f"{records[-1]['loss_avg']:.4f}")
      # Multi-process: decide together, and only at steps every process knows are sync
      # points (log steps, step-count checkpoints); single process: every step.
      due, stopping, signum = ckpt.due(step), stop.signum is not None, stop.signum or 0
      by_steps = cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0
      if multi:
        if log_now or by_steps:
          due, stopping, signum = _agree((due, stopping, signum))
        else:
          due, stopping = False, False
      if due or stopping:
        save(step)
      if stopping:
        ckpt.close()
        if progress is not None:
          progress.close()
        raise Preempted(signum, step, ckpt.directory)
    if ckpt.enabled and num_calls > start_call:
      save(step)  # the final state, so a longer run can continue from here
  ckpt.close()
  jax.block_until_ready(state)
  elapsed = time.time() - t_steady if t_steady is not None else 0.0
  if progress is not None:
    progress.close()

  # Start/end figures average the first and last tenth of the logged records: a single
  # step's meta-loss depends on where each task is in its trajectory and is noisy.
  k = max(1, len(records) // 10)
  head_tail = lambda key: ((float(np.mean([r[key] for r in records[:k]])),
                            float(np.mean([r[key] for r in records[-k:]])))
                           if records else (float("nan"), float("nan")))
  summary = {
      "config": cfg.name,
      "devices": int(learner.mesh.size),
      "processes": jax.process_count(),
      "device_kind": jax.devices()[0].device_kind,
      "outer_steps": cfg.outer_steps,
      "resumed_from_step": start_step if restored is not None else None,
      "averaged_records": k,
      "meta_loss_start": head_tail("loss_avg")[0],
      "meta_loss_end": head_tail("loss_avg")[1],
      "per_family": {name: head_tail(f"mean||{name}/mean_loss")
                     for name in learner.metric_names},
      "compile_and_first_step_s": compile_s if compile_s is not None else float("nan"),
      "steps_per_s": steady_steps / elapsed if steady_steps else float("nan"),
      "workdir": os.path.abspath(workdir),
  }
  if is_main:
    theta_path = os.path.join(workdir, "theta.lopt")
    lopt_checkpoint.save_parameter_checkpoint(
        theta_path, learner.meta_init, jax.device_get(learner.get_meta_params(state)),
        extra={"outer_step": step, "config": cfg.name})
    plot_path = os.path.join(workdir, "meta_loss.png")
    if records:
      _plot(records, plot_path, f"{cfg.name}: meta-loss")
    summary.update(theta=theta_path, plot=plot_path, metrics=metrics_path,
                   eval_plot=evaluator.finish(workdir))  # eval.png, or None if eval off
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=1)
    writer.close()
  return summary


def _print_summary(s: dict[str, Any]):
  lines = [
      f"Meta-trained '{s['config']}' for {s['outer_steps']} outer steps on "
      f"{s['devices']} device(s) ({s['device_kind']}).",
      f"  meta-loss: {s['meta_loss_start']:.4f} -> {s['meta_loss_end']:.4f} (mean of the "
      f"first and of the last {s['averaged_records']} logs)",
      *[f"    {name}: {a:.4f} -> {b:.4f}" for name, (a, b) in s["per_family"].items()],
      f"  compile + first step: {s['compile_and_first_step_s']:.1f} s; steady state "
      f"{s['steps_per_s']:.1f} outer steps/s",
      f"  wrote: {s.get('metrics')}, {s.get('theta')}, {s.get('plot')}",
  ]
  print("\n".join(lines), flush=True)


def _main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # Before anything touches a device: join the other processes (if any).
  sharding.initialize(_FLAGS['coordinator'].value, _FLAGS['num_processes'].value, _FLAGS['process_id'].value,
                      timeout_s=_FLAGS['init_timeout'].value)
  cfg = config_lib.load(_FLAGS['config'].value, _OVERRIDES)
  if _FLAGS['print_config'].value:
    print(config_lib.format_config(cfg), flush=True)
    return
  workdir = _FLAGS['workdir'].value or os.path.join("runs", cfg.name)
  mesh = sharding.mesh_from_spec(_FLAGS['mesh'].value) if _FLAGS['mesh'].value else None
  summary = train(cfg, workdir, mesh=mesh, restore_from=_FLAGS['restore_from'].value,
                  mesh_spec=_FLAGS['mesh'].value or "")
  if sharding.is_logging_process():
    _print_summary(summary)


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
