"""A run's checkpoints as the train loop uses them: restore, periodic and final saves.

A run resumed at step ``s`` (from a checkpoint holding the whole learner state) then
replays exactly the keys of an uninterrupted run (``train.keys``).
"""

from __future__ import annotations

import math
import os
from typing import Any, NamedTuple, Optional, Sequence

from absl import logging
import numpy as np

from spmd_lopt import checkpoints
from spmd_lopt import sharding


class Start(NamedTuple):
  """Where a run starts: ``state``, ``step`` (outer steps done), ``pending`` (meta-losses
  since the last log, host floats), ``resumed`` (whether from a checkpoint)."""
  state: Any
  step: int
  pending: list
  resumed: bool


class RunCheckpoints:
  """``<workdir>/checkpoints`` of one run (``config.checkpoint_*``)."""

  def __init__(self, cfg, learner, workdir: str):
    self.cfg, self.learner = cfg, learner
    self._ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"),
                                          every_steps=cfg.checkpoint_every,
                                          every_secs=cfg.checkpoint_every_secs,
                                          keep=cfg.keep_checkpoints)
    self.directory = self._ckpt.directory

  @property
  def enabled(self) -> bool:
    return self._ckpt.enabled

  def due(self, step: int) -> bool:
    return self._ckpt.due(step)

  def start(self, init_key, restore_from: Optional[str] = None) -> Start:
    """The workdir's newest valid checkpoint, else ``restore_from``'s, else a fresh
    ``learner.init``."""
    try:
      restored = self._restore(restore_from)
    except BaseException:
      self.close()  # let orbax's threads end before the error propagates
      raise
    if restored is None:
      state = self.learner.init(sharding.replicate(init_key, self.learner.mesh))
      return Start(state, 0, [], False)
    state, meta = restored
    step = int(meta["step"])
    if step % self.cfg.steps_per_call:
      self.close()
      raise ValueError(f"The checkpoint is at step {step}, not a multiple of "
                       f"steps_per_call={self.cfg.steps_per_call}.")
    # Non-finite losses are stored as null (strict JSON).
    pending = [np.float32("nan" if x is None else x) for x in meta.get("pending_losses", [])]
    return Start(state, step, pending, True)

  def _restore(self, restore_from):
    cfg = self.cfg.to_dict()
    restored = self._ckpt.restore_latest(self.learner, cfg)
    if restored is not None:
      logging.info("Resuming from %s at step %d.", self.directory, restored[1]["step"])
      return restored
    if not restore_from:
      return None
    other = checkpoints.Checkpointer(checkpoints.find_checkpoint_dir(restore_from),
                                     read_only=True)
    try:
      restored = other.restore_latest(self.learner, cfg)
    finally:
      other.close()
    if restored is None:
      raise FileNotFoundError(f"--restore_from {restore_from!r} holds no checkpoint.")
    logging.info("Starting from %s's checkpoint at step %d.", restore_from,
                 restored[1]["step"])
    return restored

  def save(self, step: int, state, pending_losses: Sequence[float]):
    """Checkpoint ``state`` after ``step`` (with the losses since the last log)."""
    pending = [float(x) if math.isfinite(x) else None for x in pending_losses]
    self._ckpt.save(step, state, {
        "seed": int(self.cfg.seed), "config": self.cfg.to_dict(),
        "pending_losses": pending,
        "mesh": {str(k): int(v) for k, v in self.learner.mesh.shape.items()}})

  def settle(self):
    """Block until the last checkpoint started is committed (nothing if none is in
    flight). The loop calls it after dispatching a step and before recording it, so the
    write overlaps one step and a kill loses at most ``checkpoint_every`` steps."""
    self._ckpt.settle()

  def close(self):
    self._ckpt.close()
