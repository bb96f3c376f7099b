"""The command-line trainer: ``python -m spmd_lopt.launch --config configs/X.py``.

One readable loop: build the learner a config describes, initialise its sharded state,
run ``outer_steps`` fused meta steps, and log. Per logged step one JSON object goes to
``<workdir>/metrics.jsonl`` (``step``, ``loss`` = that step's meta-loss, ``loss_avg`` over
the steps since the last log, and the learner's metrics). At the end: the learned
optimizer's weights, a plot of the meta-loss, ``summary.json`` and a printed summary.

Flags: ``--config`` (a config file; ``--config.KEY=VALUE`` overrides any key) and
``--workdir`` (default ``runs/<config.name>``). Only process 0 writes files.
"""

from __future__ import annotations

import json
import sys
import os
import time
from typing import Any, Optional

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_flags

from spmd_lopt import config as config_lib
from spmd_lopt import evaluate as evaluate_lib  # periodic evaluation (config.eval_every)
from spmd_lopt import sharding
from spmd_lopt.learned_optimizers import checkpoint as lopt_checkpoint

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "default_config.py")
_FLAGS = {}


def _define_flags():
  """Defined at start-up, not import: config_flags reads ``sys.argv`` overrides as soon
  as the flag is defined, and a bad override must become a clear error, not an import
  traceback."""
  _FLAGS["config"] = config_flags.DEFINE_config_file(
      "config", _DEFAULT_CONFIG, "Config file (Python, get_config()); override keys with "
      "--config.KEY=VALUE.", lock_config=True)
  _FLAGS["workdir"] = flags.DEFINE_string(
      "workdir", None, "Where metrics, weights and plots go (default: runs/<config.name>).")


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


def train(cfg, workdir: str, mesh: Optional[jax.sharding.Mesh] = None,
          show_progress: bool = True) -> dict[str, Any]:
  """Meta-train as ``cfg`` says, writing into ``workdir``; returns the summary."""
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

  k_init, k_steps = jax.random.split(jax.random.key(cfg.seed))
  spc = cfg.steps_per_call
  num_calls = cfg.outer_steps // spc
  # All step keys made on device at once, replicated: the loop never ships a key.
  keys = jax.jit(lambda k: jax.random.split(k, num_calls),
                 out_shardings=sharding.replicated(learner.mesh))(
                     sharding.replicate(k_steps, learner.mesh))

  t_start = time.time()
  state = learner.init(sharding.replicate(k_init, learner.mesh))

  metrics_path = os.path.join(workdir, "metrics.jsonl")
  writer = _ScalarWriter(workdir) if is_main else None
  records, pending = [], []
  evaluator = evaluate_lib.PeriodicEvaluator.from_config(cfg, learner, enabled=is_main)
  progress = None
  if is_main and show_progress:
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel
    progress = tqdm(total=cfg.outer_steps, desc="meta-train", unit="step",
                    disable=not sys.stderr.isatty())
  compile_s, t_steady, steady_steps = None, None, 0
  with open(metrics_path, "w") if is_main else open(os.devnull, "w") as mfile:
    for c in range(num_calls):
      if spc == 1:
        state, loss, metrics = learner.update(state, keys[c], with_metrics=True)
      else:
        state, loss, metrics = learner.update_many(state, keys[c], spc, with_metrics=True)
      step = (c + 1) * spc
      if compile_s is None:
        jax.block_until_ready(loss)
        compile_s = time.time() - t_start
        t_steady = time.time()
      else:
        steady_steps += spc
      pending.append((loss, metrics))
      if step % cfg.log_every == 0 or step == cfg.outer_steps:
        # One device-to-host copy per log; metrics are averaged over the logged window.
        host = jax.device_get(pending)
        stack = lambda *xs: np.concatenate([np.atleast_1d(x) for x in xs])
        losses = stack(*[h[0] for h in host])
        window = jax.tree.map(lambda *xs: stack(*xs).mean(), *[h[1] for h in host])
        rec = {"step": step, "loss": float(losses[-1]), "loss_avg": float(losses.mean()),
               "time": time.time() - t_start, **_to_python(window)}
        rec.update(evaluator.maybe_evaluate(step, state))  # {} unless an eval is due
        records.append(rec)
        pending = []
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
  jax.block_until_ready(state)
  elapsed = time.time() - t_steady
  if progress is not None:
    progress.close()

  # Start/end figures average the first and last tenth of the logged records: a single
  # step's meta-loss depends on where each task is in its trajectory and is noisy.
  k = max(1, len(records) // 10)
  head_tail = lambda key: (float(np.mean([r[key] for r in records[:k]])),
                           float(np.mean([r[key] for r in records[-k:]])))
  summary = {
      "config": cfg.name,
      "devices": int(learner.mesh.size),
      "device_kind": jax.devices()[0].device_kind,
      "outer_steps": cfg.outer_steps,
      "averaged_records": k,
      "meta_loss_start": head_tail("loss_avg")[0],
      "meta_loss_end": head_tail("loss_avg")[1],
      "per_family": {name: head_tail(f"mean||{name}/mean_loss")
                     for name in learner.metric_names},
      "compile_and_first_step_s": compile_s,
      "steps_per_s": steady_steps / elapsed if steady_steps else float("nan"),
      "workdir": os.path.abspath(workdir),
  }
  if is_main:
    theta_path = os.path.join(workdir, "theta.lopt")
    lopt_checkpoint.save_parameter_checkpoint(
        theta_path, learner.meta_init, jax.device_get(learner.get_meta_params(state)),
        extra={"outer_step": cfg.outer_steps, "config": cfg.name})
    plot_path = os.path.join(workdir, "meta_loss.png")
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


def _fail(message: str):
  print(f"spmd_lopt.launch: error: {message}", file=sys.stderr, flush=True)
  sys.exit(2)


def _parse_flags(argv):
  """absl's parsing, with bad flags and config overrides reported in one line."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    _fail(f"bad flag or config override: {e}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    cfg = config_lib.validate(_FLAGS["config"].value)
    cfg.lock()
    config_lib.check_values(cfg)
    workdir = _FLAGS["workdir"].value or os.path.join("runs", cfg.name)
    summary = train(cfg, workdir)
  except (ValueError, TypeError, FileNotFoundError) as e:
    _fail(str(e))
  if sharding.is_logging_process():
    _print_summary(summary)


def run():
  try:
    _define_flags()
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    _fail(f"bad config override: {e}")
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
