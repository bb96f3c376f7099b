"""Multi-process start-up and agreement: one program over every host's devices.

``initialize`` starts ``jax.distributed`` (explicit coordinator flags, or auto-detected on
SLURM / Open MPI / multi-host Cloud TPU) before any device is touched; after it
``jax.devices()`` lists every process's devices and ``spmd_lopt.sharding``'s meshes span
them (the learner's ``init`` is one jitted ``shard_map``, so process ``p`` runs the task
indices of its own devices only). ``check_same_across_processes`` refuses to start when
processes got different configs (before a collective could hang on mismatched programs);
``is_logging_process`` picks the one process that writes logs.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from typing import Any, Mapping, Optional

from absl import logging
import jax
import numpy as np


def is_logging_process() -> bool:
  """Only process 0 writes logs, plots and progress bars."""
  return jax.process_index() == 0


def detected_cluster() -> Optional[str]:
  """The multi-process environment ``jax.distributed.initialize()`` can configure itself
  from (as JAX detects them), or None for a plain single-process run."""
  env = os.environ
  slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
           "SLURM_LOCALID")
  if all(v in env for v in slurm) and int(env.get("SLURM_NTASKS", "1")) > 1:
    return "SLURM"
  if "OMPI_MCA_orte_hnp_uri" in env:
    return "Open MPI"
  if "," in env.get("TPU_WORKER_HOSTNAMES", ""):
    return "Cloud TPU (multi-host)"
  return None


def _parse_address(address: str):
  host, sep, port = address.rpartition(":")
  if not sep or not host or not port.isdigit():
    raise ValueError(f"coordinator_address {address!r} must be HOST:PORT, e.g. "
                     "'10.0.0.2:8476' or '127.0.0.1:12345'.")
  return host.strip("[]"), int(port)


def _wait_for_coordinator(address: str, timeout_s: float):
  """Poll a TCP connect to the coordinator until it answers or ``timeout_s`` passes.

  Why: when the coordinator is unreachable, JAX's client aborts the whole process from
  C++ (``DEADLINE_EXCEEDED``, a core dump and no Python exception), so we check first
  and raise an error that says what to fix.
  """
  host, port = _parse_address(address)
  deadline = time.time() + timeout_s
  last = None
  while True:
    try:
      with socket.create_connection((host, port), timeout=min(2.0, timeout_s)):
        return
    except OSError as e:
      last = e
    if time.time() >= deadline:
      raise TimeoutError(
          f"Could not reach the JAX coordinator at {address} within {timeout_s:g} s "
          f"({last}). Start process 0 (which hosts the coordinator) with the same "
          "--coordinator_address, check the host/port and firewall, or raise "
          "--init_timeout_s.")
    time.sleep(0.2)


def compilation_cache_warning(platform: str, num_processes: int,
                              cache_dir: Optional[str]) -> Optional[str]:
  """The warning for a persistent compilation cache in a multi-process CPU run, or None.

  JAX writes cache entries only from process 0, and on CPU the other processes' cache
  keys differ from process 0's (measured: process 0 hit all 14 programs of a launch,
  process 1 missed all 14). So process 0 loads a program at once while the others compile
  it, and gloo's fixed 30 s connect timeout can expire before they join it.
  """
  if platform != "cpu" or num_processes <= 1 or not cache_dir:
    return None
  return (f"JAX_COMPILATION_CACHE_DIR ({cache_dir}) is set for a {num_processes}-process "
          "CPU run: only process 0 gets cache hits here, so it can reach the first "
          "collective long before the others finish compiling and gloo's 30 s connect "
          "timeout (DEADLINE_EXCEEDED) can fail the launch. Unset it for multi-process "
          "CPU runs (README: 'Why no compilation cache with 2 processes').")


def initialize(coordinator_address: Optional[str] = None,
               num_processes: Optional[int] = None, process_id: Optional[int] = None,
               timeout_s: float = 300.0) -> bool:
  """Start JAX's multi-process runtime when this is a multi-process run.

  - explicit ``coordinator_address``, ``num_processes``, ``process_id`` (all three):
    ``jax.distributed.initialize`` with them (process 0 hosts the coordinator);
  - none given but a cluster is detected (SLURM, Open MPI, multi-host Cloud TPU with
    ``TPU_WORKER_HOSTNAMES``), or ``coordinator_address="auto"``:
    ``jax.distributed.initialize()`` with no arguments, as JAX configures itself there;
  - otherwise: nothing (single process). ``num_processes=1`` also means nothing.

  Must run before anything touches a JAX device. Returns whether it initialised. On CPU
  the cross-process collectives are gloo's. A coordinator that cannot be reached within
  ``timeout_s`` raises ``TimeoutError`` naming the address.
  """
  if coordinator_address == "auto":  # trust JAX's own detection (e.g. GCE TPU VMs)
    coordinator_address, cluster = None, "coordinator_address=auto"
    if num_processes is not None or process_id is not None:
      raise ValueError("coordinator_address=auto lets JAX find num_processes and "
                       "process_id; do not pass them too.")
  else:
    cluster = None
  given = [v is not None for v in (coordinator_address, num_processes, process_id)]
  if not any(given):
    cluster = cluster or detected_cluster()
    if cluster is None:
      return False
    logging.info("%s detected; jax.distributed.initialize() (timeout %g s).", cluster,
                 timeout_s)
    jax.distributed.initialize(initialization_timeout=int(max(1, timeout_s)))
    return True
  if num_processes is not None and num_processes == 1 and coordinator_address is None:
    return False
  if not all(given):
    raise ValueError("Multi-process start needs all of --coordinator_address, "
                     "--num_processes and --process_id (or none of them on SLURM / Cloud "
                     f"TPU); got coordinator_address={coordinator_address!r}, "
                     f"num_processes={num_processes!r}, process_id={process_id!r}.")
  if num_processes < 1 or not 0 <= process_id < num_processes:
    raise ValueError(f"process_id={process_id} must be in [0, num_processes="
                     f"{num_processes}).")
  _parse_address(coordinator_address)
  if num_processes == 1:
    return False
  if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in os.environ:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if process_id != 0:
    _wait_for_coordinator(coordinator_address, timeout_s)
  logging.info("Process %d/%d joining coordinator %s (timeout %g s; if this process "
               "then aborts with DEADLINE_EXCEEDED, not every process reached that "
               "coordinator in time).", process_id, num_processes, coordinator_address,
               timeout_s)
  jax.distributed.initialize(coordinator_address, num_processes=num_processes,
                             process_id=process_id,
                             initialization_timeout=int(max(1, timeout_s)))
  warning = compilation_cache_warning(jax.default_backend(), num_processes,
                                      jax.config.jax_compilation_cache_dir)
  if warning and is_logging_process():
    logging.warning("%s", warning)
  return True


def check_same_across_processes(payload: Mapping[str, Any], what: str = "config"):
  """Refuse to run when processes were started with different ``payload`` (e.g. the
  config): per-key hashes are all-gathered and compared to process 0's.

  Raises ``ValueError`` on every process, naming the differing keys and processes,
  before any collective could hang on mismatched programs.
  """
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

  def h(obj) -> int:
    blob = json.dumps(obj, sort_keys=True, default=repr).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:4], "little") & 0x7FFFFFFF

  keys = sorted(payload)
  # Round 1 (fixed shape on every process): do the key sets agree at all?
  head = multihost_utils.process_allgather(np.asarray([len(keys), h(keys)], np.int32))
  head = np.asarray(head).reshape(jax.process_count(), 2)
  if not np.all(head == head[0]):
    procs = [int(p) for p in np.nonzero(np.any(head != head[0], axis=1))[0]]
    raise ValueError(f"The {what} has different keys on processes {procs} than on process "
                     "0 (different code versions?). Start every process from the same "
                     "checkout with the same flags.")
  # Round 2: one hash per key.
  rows = multihost_utils.process_allgather(
      np.asarray([h(payload[k]) for k in keys], np.int32))
  rows = np.asarray(rows).reshape(jax.process_count(), len(keys))
  differ = np.any(rows != rows[0], axis=0)
  if np.any(differ):
    bad = [keys[j] for j in np.nonzero(differ)[0]]
    procs = [int(p) for p in np.nonzero(np.any(rows != rows[0], axis=1))[0]]
    mine = {k: payload[k] for k in bad}
    raise ValueError(f"Processes disagree on the {what}: key(s) {bad} differ between "
                     f"process 0 and process(es) {procs} (this is process "
                     f"{jax.process_index()}, with {mine}). Every process must be started "
                     "with the same config and flags.")
