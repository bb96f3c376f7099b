"""``PeriodicEvaluator``: held-out final losses of theta during meta-training.

``launch`` (with ``config.eval_every > 0``) calls ``maybe_evaluate`` at every logged outer
step and logs ``eval/<task>/final_loss``; ``finish`` plots them to ``eval.png``.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Mapping, Optional

import jax

from spmd_lopt.evaluation.sweep import TaskLike, evaluate_theta


class PeriodicEvaluator:
  """Runs ``evaluate_theta`` every ``every`` outer steps of a meta-training run.

  ``maybe_evaluate(step, state)`` is called at every logged step; it evaluates when a
  multiple of ``every`` was reached since the last evaluation (so with ``every`` not a
  multiple of ``log_every`` it runs at the next log step) and at the final step, and
  returns ``{"eval/<task>/final_loss": float, "eval/time_s": float}`` (``{}`` otherwise,
  or when disabled). Evaluation uses a fixed key, so every evaluation
  sees the same held-out tasks, inits and batches and the curve shows theta's change,
  not sampling noise. ``finish(workdir)`` plots the evaluations to ``eval.png``.
  The launcher runs it on every process (each on its first local device, from the
  replicated theta), so no process waits at the next collective for another's
  evaluation; its time counts in the launcher's steps/s; ``eval/time_s`` says how much.
  """

  def __init__(self, lopt, theta_fn: Callable[[Any], Any], tasks: Mapping[str, TaskLike],
               every: int, num_steps: int, seeds: int, key: jax.Array, final_step: int,
               enabled: bool = True):
    self.lopt, self.theta_fn, self.tasks = lopt, theta_fn, dict(tasks)
    self.every, self.num_steps, self.seeds = int(every), int(num_steps), int(seeds)
    self.key, self.final_step = key, int(final_step)
    self.enabled = enabled and self.every > 0
    self.history: list[dict[str, float]] = []
    self._last = 0

  @classmethod
  def from_config(cls, cfg, learner, enabled: bool = True) -> "PeriodicEvaluator":
    """From the config keys ``eval_every`` (0: off), ``eval_tasks`` (comma-separated;
    "" = the training tasks), ``eval_steps`` and ``eval_seeds``; tasks are built as the
    launcher builds its training families (``quadratic_dim``, ``data_dir`` apply)."""
    from spmd_lopt import config as config_lib  # pylint: disable=import-outside-toplevel
    every = int(cfg.get("eval_every", 0))
    steps, seeds = int(cfg.get("eval_steps", 300)), int(cfg.get("eval_seeds", 4))
    if every < 0:
      raise ValueError(f"config.eval_every must be >= 0 (0 = off), got {every}.")
    tasks = {}
    if every > 0:
      if steps <= 0 or seeds <= 0:
        raise ValueError(f"config.eval_steps and config.eval_seeds must be positive, got "
                         f"{steps}, {seeds}.")
      names = [n.strip() for n in (cfg.get("eval_tasks", "")
                                     or ",".join(config_lib.task_names(cfg))).split(",")
               if n.strip()]
      if not names:
        raise ValueError("config.eval_tasks names no task.")
      # Built now, so a bad name fails before meta-training starts, not at the first eval.
      tasks = {n: config_lib.make_task_family(n, cfg) for n in names}
    key = jax.random.fold_in(jax.random.key(cfg.seed), 0x5EED)  # not a training key
    return cls(learner.meta_init, learner.get_meta_params, tasks, every, steps, seeds, key,
               final_step=cfg.outer_steps, enabled=enabled)

  def maybe_evaluate(self, step: int, state) -> dict[str, float]:
    if not self.enabled:
      return {}
    due = step // self.every > self._last // self.every or (
        step == self.final_step and self._last < step)
    if not due:
      return {}
    self._last = step
    t = time.time()
    theta = jax.device_get(self.theta_fn(state))  # host copy: the eval runs off the mesh
    losses = evaluate_theta(self.lopt, theta, self.tasks, self.num_steps, self.key,
                            self.seeds)
    rec = {f"eval/{n}/final_loss": v for n, v in losses.items()}
    rec["eval/time_s"] = time.time() - t
    self.history.append({"step": step, **rec})
    return rec

  def finish(self, workdir: str) -> Optional[str]:
    """Write ``<workdir>/eval.png`` (final loss per task vs outer step); its path, or
    None when nothing was evaluated."""
    if not self.history:
      return None
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    names = list(self.tasks)
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.2), squeeze=False)
    steps = [h["step"] for h in self.history]
    for ax, n in zip(axes[0], names):
      ax.plot(steps, [h[f"eval/{n}/final_loss"] for h in self.history], "o-", ms=3)
      ax.set_title(f"{n}\n{self.num_steps} inner steps, {self.seeds} seeds", fontsize=9)
      ax.set_xlabel("outer step")
      ax.set_ylabel("final test loss")
      ax.grid(alpha=0.3)
    fig.tight_layout()
    path = os.path.join(workdir, "eval.png")
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


