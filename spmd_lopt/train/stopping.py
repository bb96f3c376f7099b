"""Stop requests (SIGTERM/SIGINT) and the per-step agreement of a multi-process run.

A signal usually reaches one process (a preempted host). Every process must stop after
the *same* step and write one checkpoint together, or the others hang in the next
collective. ``agree`` is therefore called after every step on every process: one tiny
all-gather of ``(checkpoint due, signal)`` per step, so a stop is acted on at the next
step whatever ``log_every`` is (a TPU preemption's grace period is ~30 s).
"""

from __future__ import annotations

import signal
import threading

from absl import logging
import jax
import numpy as np


class Preempted(RuntimeError):
  """Training stopped on SIGTERM/SIGINT after writing a checkpoint."""

  def __init__(self, signum: int, step: int, directory: str):
    self.signum, self.step, self.directory = signum, step, directory
    super().__init__(
        f"Stopped by {signal.Signals(signum).name} after outer step {step}; checkpoint "
        f"written to {directory}/{step}. Launch again with the same --workdir to resume.")


class StopRequest:
  """Remembers the first SIGTERM/SIGINT (``signum``, else None) while active.

  A second SIGINT falls through to Python's default (KeyboardInterrupt) so a stuck run
  can still be interrupted. Outside the main thread (no signal handlers possible) it
  never fires.
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


def agree(checkpoint_due: bool, signum: int) -> tuple[bool, int]:
  """``(checkpoint due, signal to stop with or 0)``, the same on every process.

  Process 0's decision on a (possibly time-based) checkpoint counts; any process's
  signal stops everyone (the lowest-numbered signalled process names the signal). A
  collective: every process calls it after every step. One process: the inputs.
  """
  if jax.process_count() == 1:
    return checkpoint_due, signum
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  rows = np.asarray(multihost_utils.process_allgather(
      np.asarray([int(checkpoint_due), int(signum)], np.int32)))
  rows = rows.reshape(jax.process_count(), 2)
  signalled = rows[rows[:, 1] > 0, 1]
  return bool(rows[0, 0]), int(signalled[0]) if len(signalled) else 0
