"""What a run shows and writes: metrics records, progress, strict JSON, the summary.

Per logged step one JSON object goes to ``<workdir>/metrics.jsonl`` (``step``, ``loss``
= that step's meta-loss, ``loss_avg`` over the steps since the last log, the learner's
metrics averaged over that window, and ``eval/*`` keys when an evaluation ran). Every
file is strict JSON: a non-finite number is written as ``null``. Only process 0 writes.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Optional

from absl import logging
import jax
import numpy as np

# A terminal gets a tqdm bar; a log file one progress line at most this often.
_PLAIN_PROGRESS_EVERY_S = 30.0


def strict(obj):
  """``obj`` with every non-finite float replaced by None (valid strict JSON)."""
  if isinstance(obj, dict):
    return {k: strict(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [strict(v) for v in obj]
  if isinstance(obj, (float, np.floating)):
    return float(obj) if math.isfinite(obj) else None
  return obj


def dumps(obj, **kw) -> str:
  return json.dumps(strict(obj), allow_nan=False, **kw)


def write_json(path: str, obj):
  """Atomically write ``obj`` as strict JSON."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(dumps(obj, indent=1))
  os.replace(tmp, path)


def read_records(path: str, upto_step: int) -> list[dict]:
  """The metrics.jsonl records with ``step <= upto_step`` (a resumed run redoes the
  steps after its checkpoint, so their old records are dropped, not duplicated)."""
  if not os.path.exists(path):
    return []
  out = []
  with open(path) as f:
    for line in f:
      try:
        rec = json.loads(line)
      except json.JSONDecodeError:  # a torn last line from a killed run (or a blank one)
        continue
      if rec.get("step", 0) <= upto_step:
        out.append(rec)
  return out


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

  def write(self, step: int, scalars: dict[str, Any]):
    if self._writer is not None:
      for k, v in scalars.items():
        if isinstance(v, (int, float)):
          self._writer.add_scalar(k.replace("||", "/"), v, step)

  def close(self):
    if self._writer is not None:
      self._writer.close()


class Log:
  """The run's metrics: buffers each step's loss and metrics on device, and at log steps
  copies them to the host once, averages the window and writes one record.

  ``records`` holds every record of the run (those kept from before a resume too).
  """

  def __init__(self, cfg, workdir: str, first_step: int, resumed: bool, pending: list,
               is_main: bool, show_progress: bool):
    self.cfg, self.is_main = cfg, is_main
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.records = read_records(self.path, first_step) if resumed else []
    self.pending, self._metrics = list(pending), []  # metrics are not checkpointed
    self._file = self._writer = self._bar = None
    self._t_start, self._last_line = time.time(), 0.0
    if is_main:  # keep the records up to the checkpoint, then append
      tmp = self.path + ".tmp"
      with open(tmp, "w") as f:
        f.writelines(dumps(r) + "\n" for r in self.records)
      os.replace(tmp, self.path)
      self._file = open(self.path, "a")
      self._writer = _ScalarWriter(workdir)
      if show_progress and sys.stderr.isatty():
        from tqdm import tqdm  # pylint: disable=import-outside-toplevel
        self._bar = tqdm(total=cfg.outer_steps, initial=first_step, desc="meta-train",
                         unit="step")

  def add(self, loss, metrics):
    self.pending.append(loss)
    self._metrics.append(metrics)

  def pending_losses(self) -> list[float]:
    """The losses since the last log as host floats (for a checkpoint)."""
    return [float(x) for x in np.concatenate(
        [np.atleast_1d(np.asarray(x)) for x in jax.device_get(self.pending)]
        or [np.zeros(0)])]

  def due(self, step: int) -> bool:
    return step % self.cfg.log_every == 0 or step == self.cfg.outer_steps

  def write(self, step: int, extra: dict[str, Any]):
    """One record for the window ending at ``step`` (one device-to-host copy)."""
    host_losses, host_metrics = jax.device_get((self.pending, self._metrics))
    stack = lambda *xs: np.concatenate([np.atleast_1d(x) for x in xs])
    losses = stack(*host_losses)
    window = jax.tree.map(lambda *xs: stack(*xs).mean(), *host_metrics)
    rec = {"step": step, "loss": float(losses[-1]), "loss_avg": float(losses.mean()),
           "time": time.time() - self._t_start, **_to_python(window), **extra}
    self.records.append(rec)
    self.pending, self._metrics = [], []
    if self.is_main:
      self._file.write(dumps(rec) + "\n")
      self._file.flush()
      self._writer.write(step, rec)

  def progress(self, step: int, steps: int):
    """Advance the bar by ``steps``; without a terminal, a plain line now and then."""
    if not self.is_main:
      return
    loss = self.records[-1]["loss_avg"] if self.records else None
    if self._bar is not None:
      self._bar.update(steps)
      if loss is not None:
        self._bar.set_postfix(meta_loss=f"{loss:.4f}")
      return
    now = time.time()
    if loss is not None and (now - self._last_line >= _PLAIN_PROGRESS_EVERY_S
                             or step == self.cfg.outer_steps):
      self._last_line = now
      print(f"meta-train: step {step}/{self.cfg.outer_steps}, meta-loss {loss:.4f}",
            file=sys.stderr, flush=True)

  def close(self):
    if self._bar is not None:
      self._bar.close()
      self._bar = None
    if self._file is not None:
      self._file.close()
      self._writer.close()
      self._file = None


class Timer:
  """Compile + first call, then steady-state steps per second: from the end of the first
  call to the end of the last (``stop``), so the final checkpoint and the outputs written
  after the loop do not count (a short run would read several percent slow)."""

  def __init__(self):
    self._t0, self._t_steady, self._t_stop = time.time(), None, None
    self.compile_s, self.steady_steps = None, 0

  def tick(self, loss, steps: int):
    if self.compile_s is None:
      jax.block_until_ready(loss)
      self.compile_s = time.time() - self._t0
      self._t_steady = time.time()
    else:
      self.steady_steps += steps

  def stop(self, loss):
    """The last call's ``loss``: waits for it and ends the steady-state interval."""
    jax.block_until_ready(loss)
    self._t_stop = time.time()

  def steps_per_s(self) -> Optional[float]:
    if not self.steady_steps:
      return None
    end = self._t_stop if self._t_stop is not None else time.time()
    return self.steady_steps / (end - self._t_steady)


def summary(cfg, learner, records, timer: Timer, start_step: Optional[int]) -> dict:
  """The run's summary. Start/end figures average the first and last tenth of the
  logged records: one step's meta-loss depends on where each task is in its trajectory
  and is noisy. Figures that could not be measured are None."""
  k = max(1, len(records) // 10)

  def head_tail(key):
    if not records:
      return None, None
    return (float(np.mean([r[key] for r in records[:k]])),
            float(np.mean([r[key] for r in records[-k:]])))

  return {
      "config": cfg.name,
      "devices": int(learner.mesh.size),
      "processes": jax.process_count(),
      "device_kind": jax.devices()[0].device_kind,
      "outer_steps": cfg.outer_steps,
      "resumed_from_step": start_step,
      "averaged_records": k,
      "meta_loss_start": head_tail("loss_avg")[0],
      "meta_loss_end": head_tail("loss_avg")[1],
      "per_family": {name: head_tail(f"mean||{name}/mean_loss")
                     for name in learner.metric_names},
      "compile_and_first_step_s": timer.compile_s,
      "steps_per_s": timer.steps_per_s(),
  }


def _num(x, fmt: str) -> str:
  return "n/a" if x is None or not math.isfinite(x) else format(x, fmt)


def summary_text(s: dict[str, Any]) -> str:
  files = [s.get(k) for k in ("metrics", "theta", "plot", "eval_plot", "summary",
                              "config_file", "checkpoints")]
  return "\n".join([
      f"Meta-trained '{s['config']}' for {s['outer_steps']} outer steps on "
      f"{s['devices']} device(s) ({s['device_kind']}).",
      f"  meta-loss: {_num(s['meta_loss_start'], '.4f')} -> "
      f"{_num(s['meta_loss_end'], '.4f')} (mean of the first and of the last "
      f"{s['averaged_records']} logs)",
      *[f"    {name}: {_num(a, '.4f')} -> {_num(b, '.4f')}"
        for name, (a, b) in s["per_family"].items()],
      f"  compile + first step: {_num(s['compile_and_first_step_s'], '.1f')} s; steady "
      f"state {_num(s['steps_per_s'], '.1f')} outer steps/s",
      f"  wrote: {', '.join(f for f in files if f)}",
  ])


def plot_meta_loss(records, path: str, title: str):
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
