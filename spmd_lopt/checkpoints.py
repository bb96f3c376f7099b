"""Checkpoints of a whole meta-training run, with orbax: save, find the latest valid one,
restore it on any mesh.

What one checkpoint holds (one orbax step directory ``<dir>/<step>/``):

- ``state``: the learner's whole ``SingleMachineState`` (outer-optimizer state incl. theta,
  every estimator's task-sharded unroll states incl. PES accumulators), written by orbax's
  (multi-process) array handler: each process writes the shards it owns.
- ``meta`` (JSON, written by process 0): ``step`` (outer steps done = the PRNG position:
  the launcher derives the key of the call starting at step ``s`` as
  ``fold_in(k_steps, s)`` from ``seed``), ``seed``, the ``config`` that made the run,
  ``pending_losses`` (meta-losses since the last log, so ``loss_avg`` resumes exactly),
  and ``fingerprint``: one uint32 per state leaf (see ``fingerprint``).

Durability: ``save`` returns once the arrays are on the host; the files are written in the
background while the next step runs. ``settle`` (called by the train loop after
dispatching that step, before recording it) waits for the write to be committed, so no
step after ``s`` is recorded before checkpoint ``s`` is durable: a kill at any moment
loses at most the steps since the newest checkpoint, i.e. at most one interval. (Without
it a slow write, e.g. the cross-process barriers of a 2-process commit, lagged several
steps behind, and a kill then lost up to two intervals.)

Atomicity is orbax's: a step is written into ``<step>.orbax-checkpoint-tmp-*`` and renamed
to ``<step>`` only after every process has finished (``commit_success.txt`` + rename), so
a crash mid-write leaves a tmp directory that ``all_steps`` never lists (and that is
removed on the next start, ``cleanup_tmp_directories``).

Validity: a finalised step can still be damaged later (disk errors, a partial copy, a
truncated file). ``restore_latest`` tries steps newest first; a step whose files cannot be
read, or whose restored state does not match the fingerprint stored at save time, is
reported, moved to ``<dir>/../checkpoints_corrupt/`` and the previous step is used.

Elastic restore: the target is ``learner.abstract_state()`` with
``learner.state_shardings()`` (``ShapeDtypeStruct(shape, dtype, sharding=...)``), so
orbax reads each saved global array into the *current* mesh's layout: a checkpoint
written on 8 devices restores on 4 or 1 (and back).
"""

from __future__ import annotations

import math
import os
import shutil
import time
from typing import Any, Mapping, Optional

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

FORMAT_VERSION = 1

# Config keys that may differ between a checkpoint and the run that resumes it: they
# change neither the state's shapes nor the trajectory of keys and updates.
# (``outer_steps`` only sets where the run stops: the step keys are fold_in(k, step) and
# the outer optimizers here ignore ``num_steps``; periodic evaluation uses its own fixed
# key and only reads theta, so the ``eval_*`` keys never change the trajectory.) Every
# other key must match; a new key
# added to the schema is therefore "must match" until someone lists it here.
RESUMABLE_DIFFERENCES = frozenset({
    "name", "outer_steps", "log_every", "num_devices", "checkpoint_every",
    "checkpoint_every_secs", "keep_checkpoints",
    "eval_every", "eval_tasks", "eval_steps", "eval_seeds",
})


class ConfigMismatchError(ValueError):
  """The checkpoint was made by a config that changes the state or the trajectory."""


class NoValidCheckpointError(RuntimeError):
  """Checkpoints exist but none of them can be read back intact."""


# --- fingerprint ---------------------------------------------------------------------

def _mix32(h):
  """murmur3's 32-bit finaliser: a cheap bijective avalanche on uint32."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _as_uint32_bits(x):
  """The raw bits of ``x`` as uint32, shape ``x.shape`` (+ ``[2]`` for 64-bit types)."""
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  width = jnp.dtype(x.dtype).itemsize
  if width == 4:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  if width == 8:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)  # [..., 2]
  unsigned = {1: jnp.uint8, 2: jnp.uint16}[width]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _leaf_fingerprint(x):
  """``sum_i mix(bits_i ^ mix(i * golden)) mod 2**32`` over the flat index ``i``.

  Integer addition mod 2**32 is exact and associative, so the value does not depend on
  how the array is sharded or in which order XLA reduces it: the same on 8 devices, on 1
  and across processes. Any changed element (bit flip, zeroed block, swapped elements)
  changes the sum with probability ~1 - 2**-32.
  """
  bits = _as_uint32_bits(x)
  idx = jnp.zeros(bits.shape, jnp.uint32)
  stride = 1
  for d in range(bits.ndim - 1, -1, -1):  # row-major flat index, wrapping mod 2**32
    idx = idx + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, d) * jnp.uint32(stride)
    stride = (stride * bits.shape[d]) % 2**32
  return jnp.sum(_mix32(bits ^ _mix32(idx * jnp.uint32(0x9E3779B9) + jnp.uint32(1))),
                 dtype=jnp.uint32)


_fingerprint_jit = jax.jit(lambda tree: jax.tree.map(_leaf_fingerprint, tree))


def fingerprint(state) -> dict[str, str]:
  """One hex uint32 per leaf of ``state``, keyed by the leaf's path; computed on device
  (a global reduction: every process gets the same replicated values)."""
  fps = jax.device_get(_fingerprint_jit(state))
  flat = jax.tree_util.tree_flatten_with_path(fps)[0]
  return {jax.tree_util.keystr(p): f"{int(v):08x}" for p, v in flat}


# --- config comparison ---------------------------------------------------------------

def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any],
                       allowed=RESUMABLE_DIFFERENCES) -> list[str]:
  """Sorted keys whose values differ (or exist on one side only), minus ``allowed``."""
  keys = set(saved) | set(current)
  missing = object()
  return sorted(k for k in keys if k not in allowed and
                saved.get(k, missing) != current.get(k, missing))


def check_config(saved: Mapping[str, Any], current: Mapping[str, Any], where: str):
  diff = config_differences(saved, current)
  if diff:
    detail = ", ".join(f"{k}: checkpoint={saved.get(k, '<absent>')!r} "
                       f"now={current.get(k, '<absent>')!r}" for k in diff)
    raise ConfigMismatchError(
        f"Refusing to resume from {where}: the config differs in key(s) {diff} that change "
        f"the state or the trajectory ({detail}). Use the checkpoint's values, or start "
        f"a fresh run in another --workdir. Keys that may differ: "
        f"{sorted(RESUMABLE_DIFFERENCES)}.")


# --- the checkpointer ----------------------------------------------------------------

def abstract_target(learner):
  """``ShapeDtypeStruct``s of the learner's state carrying the *current* mesh's
  shardings: orbax reshards the saved global arrays into them."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      learner.abstract_state(), learner.state_shardings())


def _drop_empty(tree):
  """``tree`` with zero-size leaves replaced by None: orbax refuses to write them (e.g. the
  empty factored moments Celo2 keeps for 1-D parameters), and they hold no values."""
  return jax.tree.map(lambda x: None if math.prod(x.shape) == 0 else x, tree)


def _refill_empty(target, restored):
  """``restored`` (read with ``_drop_empty(target)``) with the empty leaves put back, laid
  out as ``target`` says."""
  full = iter(jax.tree.leaves(restored))
  def leaf(t):
    if math.prod(t.shape) == 0:
      return jax.device_put(np.zeros(t.shape, t.dtype), t.sharding)
    return next(full)
  return jax.tree.map(leaf, target)


def _sync(name: str):
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices(name)


def _all_processes_ok(ok: bool) -> bool:
  """True only if ``ok`` on every process (so all take the same branch)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  flags = multihost_utils.process_allgather(np.asarray([int(ok)], np.int32))
  return bool(np.all(np.asarray(flags)))


class Checkpointer:
  """Save / restore a run's state in ``directory`` (an orbax ``CheckpointManager``).

  Args:
    directory: where the step directories live (created if needed).
    every_steps: save when ``step % every_steps == 0`` (0: off).
    every_secs: save when this many seconds passed since the last save (0: off).
    keep: keep the newest ``keep`` checkpoints.
    async_save: write in a background thread (orbax copies the arrays to host memory
      before ``save`` returns, so the caller may donate ``state`` right after).
    read_only: never write or move anything (for ``--restore_from``).
  """

  def __init__(self, directory: str, every_steps: int = 0, every_secs: float = 0.0,
               keep: int = 3, async_save: bool = True, read_only: bool = False):
    if keep < 1:
      raise ValueError(f"keep_checkpoints must be >= 1, got {keep}.")
    self.directory = os.path.abspath(directory)
    self.every_steps = int(every_steps)
    self.every_secs = float(every_secs)
    self.read_only = read_only
    self._last_save_time = time.time()
    self._last_saved_step = None
    self._in_flight = False  # a save started and not yet known to be committed
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=not read_only, read_only=read_only,
        cleanup_tmp_directories=not read_only,
        enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "meta"))

  @property
  def enabled(self) -> bool:
    return self.every_steps > 0 or self.every_secs > 0

  def due(self, step: int) -> bool:
    """Is a periodic checkpoint due after ``step`` (process-local decision: in
    multi-process runs the caller agrees on it across processes)."""
    if step == self._last_saved_step:
      return False
    if self.every_steps > 0 and step % self.every_steps == 0:
      return True
    return self.every_secs > 0 and time.time() - self._last_save_time >= self.every_secs

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state, meta: Mapping[str, Any]):
    """Start writing ``state`` + ``meta`` (plus ``step``, the fingerprint) as ``step``.

    Returns once the arrays are on the host; the files are written in the background and
    become visible atomically. A checkpoint already present for ``step`` is kept.
    """
    if self.read_only:
      raise RuntimeError("This Checkpointer is read-only.")
    if step == self._last_saved_step or step in self._manager.all_steps():
      return
    meta = dict(meta, step=int(step), format_version=FORMAT_VERSION,
                fingerprint=fingerprint(state), saved_at=time.time(),
                process_count=jax.process_count())
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(_drop_empty(state)), meta=ocp.args.JsonSave(meta)),
        force=True)
    self._last_save_time = time.time()
    self._last_saved_step = step
    self._in_flight = True

  def wait(self):
    """Block until every save started so far is committed (renamed into place)."""
    self._manager.wait_until_finished()
    self._in_flight = False

  def settle(self):
    """``wait`` if a save is in flight, else nothing (cheap: call it every step).

    Process-local, and safe in multi-process runs: orbax's commit barriers run in its
    background threads, so waiting here needs no collective from the main thread.
    """
    if self._in_flight:
      self.wait()

  def close(self):
    self.wait()
    self._manager.close()

  def _read_meta(self, step: int) -> dict:
    out = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    meta = out["meta"]
    if not isinstance(meta, dict) or "fingerprint" not in meta or "config" not in meta:
      raise ValueError("meta.json lacks 'fingerprint' or 'config'")
    return meta

  def _read_state(self, step: int, learner, meta: dict):
    target = abstract_target(learner)
    out = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_drop_empty(target))))
    state = _refill_empty(target, out["state"])
    got = fingerprint(state)
    bad = sorted(k for k in set(got) | set(meta["fingerprint"])
                 if got.get(k) != meta["fingerprint"].get(k))
    if bad:
      raise ValueError(f"fingerprint mismatch in {len(bad)} leaf/leaves, e.g. {bad[:3]}")
    return state

  def _quarantine(self, step: int, reason: str):
    dest_root = os.path.join(os.path.dirname(self.directory), "checkpoints_corrupt")
    logging.error("Checkpoint %s/%d is damaged (%s); moving it to %s and trying the "
                  "previous one.", self.directory, step, reason, dest_root)
    if jax.process_index() == 0:
      print(f"WARNING: checkpoint {self.directory}/{step} is damaged ({reason}); "
            f"falling back to the previous checkpoint.", flush=True)
    if not self.read_only and jax.process_index() == 0:
      os.makedirs(dest_root, exist_ok=True)
      src = os.path.join(self.directory, str(step))
      if os.path.exists(src):
        shutil.move(src, os.path.join(dest_root, f"{step}-{int(time.time())}"))
    _sync(f"spmd_lopt_quarantine_{step}")
    self._manager.reload()

  def restore_latest(self, learner, config: Optional[Mapping[str, Any]] = None):
    """The newest intact checkpoint as ``(state, meta)``, or ``None`` if there is none.

    ``state`` is laid out for ``learner``'s mesh. A ``config`` that differs from the
    checkpoint's in keys outside ``RESUMABLE_DIFFERENCES`` raises ``ConfigMismatchError``
    (checked on the newest readable checkpoint, before any state is read). Damaged
    checkpoints are reported and skipped (and moved aside unless read-only); if all are
    damaged, ``NoValidCheckpointError``.
    """
    steps = sorted(self._manager.all_steps(), reverse=True)
    if not steps:
      return None
    for step in steps:
      meta, reason = None, None
      try:
        meta = self._read_meta(step)
      except Exception as e:  # pylint: disable=broad-except
        reason = f"cannot read its metadata: {type(e).__name__}: {str(e)[:300]}"
      if _all_processes_ok(reason is None):
        if config is not None:
          check_config(meta["config"], config, f"checkpoint {self.directory}/{step}")
        try:
          state = self._read_state(step, learner, meta)
        except Exception as e:  # pylint: disable=broad-except
          reason = f"cannot read its state: {type(e).__name__}: {str(e)[:300]}"
          state = None
        if _all_processes_ok(reason is None):
          self._last_saved_step = step
          logging.info("Restored checkpoint %s/%d.", self.directory, step)
          return state, meta
      self._quarantine(step, reason or "damaged on another process")
    raise NoValidCheckpointError(
        f"None of the checkpoints {steps} in {self.directory} could be read intact; "
        "see the warnings above. Move the directory away to start fresh.")


def find_checkpoint_dir(path: str) -> str:
  """``path`` itself if it holds step directories, else ``path/checkpoints`` (so
  ``--restore_from`` accepts a run's workdir or its checkpoint directory)."""
  sub = os.path.join(path, "checkpoints")
  if os.path.isdir(sub):
    return sub
  if os.path.isdir(path):
    return path
  raise FileNotFoundError(f"--restore_from {path!r}: no such directory.")


# The reference's single-file state format (flax msgpack), kept in the compat room.
from spmd_lopt.compat.state_files import load_state, save_state  # noqa: E402,F401
