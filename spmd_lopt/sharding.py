"""Meshes, shardings and multi-host start-up: where the task population lives.

The whole design is stated here once:

- theta, the outer-optimizer state and every metric are **replicated** (``P()``);
- every estimator's unroll state has a leading task axis that is **sharded** over the mesh
  axis ``axis_name`` (``P(axis_name)``); other mesh axes, if any, replicate it;
- inside the learner's ``shard_map`` device ``d`` owns the global task indices
  ``d * n_local + arange(n_local)``, ``n_local = num_tasks // mesh.shape[axis_name]``.

``jax.make_mesh`` gives *Explicit* axes on current JAX: arrays passed to a ``shard_map``
must already carry the ``NamedSharding`` that its ``in_specs`` name. The learner's ``init``
therefore builds its state with ``out_shardings`` from ``state_shardings`` below.

Multi-host: ``initialize`` starts ``jax.distributed`` (explicit coordinator flags, or
auto-detected on SLURM / Open MPI / multi-host Cloud TPU) before any device is touched;
after it ``jax.devices()`` lists every process's devices and the meshes here span them.
The state is then made of global arrays: theta replicated on every device, unroll states
split over the task axis, and each process computes and holds only the shards of its own
devices (the learner's ``init`` is one jitted ``shard_map``, so process ``p`` runs the
task indices of its devices only). Host values (keys) enter through ``replicate``, which
builds the global array from every process's identical copy; ``check_same_across_processes``
refuses to start when processes got different configs; ``is_logging_process`` picks the
one process that writes logs. ``mesh_from_spec`` reads ``--mesh tasks=4,model=2``.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from typing import Any, Mapping, Optional, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DEFAULT_AXIS = "tasks"


def make_mesh(axis_name: str = DEFAULT_AXIS, num_devices: Optional[int] = None,
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A 1-D mesh named ``axis_name`` over ``devices`` (default: the first ``num_devices``
  of ``jax.devices()``, i.e. all global devices)."""
  if devices is None:
    devices = jax.devices()
    if num_devices is not None:
      if not 0 < num_devices <= len(devices):
        raise ValueError(f"num_devices={num_devices} but {len(devices)} devices exist "
                         f"({devices[0].platform}).")
      devices = devices[:num_devices]
  devices = list(devices)
  return jax.make_mesh((len(devices),), (axis_name,), devices=devices)


def axis_size(mesh: Mesh, axis_name: str) -> int:
  if axis_name not in mesh.shape:
    raise ValueError(f"The mesh has axes {tuple(mesh.shape)}, none called {axis_name!r}; "
                     "pass axis_name= the axis to shard tasks over.")
  return int(mesh.shape[axis_name])


def check_divisible(num_tasks: int, mesh: Mesh, axis_name: str, who: str) -> int:
  """Return tasks per shard; raise a clear error when they do not split evenly."""
  size = axis_size(mesh, axis_name)
  if num_tasks % size:
    lower, upper = (num_tasks // size) * size, (num_tasks // size + 1) * size
    raise ValueError(
        f"{who}: num_tasks={num_tasks} is not divisible by the {size} devices of mesh "
        f"axis {axis_name!r}. Use a multiple of {size} (e.g. {lower or upper} or {upper}), "
        "or a mesh whose task axis divides num_tasks.")
  return num_tasks // size


def local_task_ids(num_local: int, axis_name: str) -> jax.Array:
  """Inside ``shard_map``: the global indices of this shard's tasks, ``[num_local]``."""
  return jax.lax.axis_index(axis_name) * num_local + jnp.arange(num_local)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def task_sharded(mesh: Mesh, axis_name: str) -> NamedSharding:
  return NamedSharding(mesh, P(axis_name))


def replicate(tree, mesh: Mesh):
  """Place host values (identical on every process) replicated over ``mesh``.

  Works in multi-process runs too, where ``jax.device_put`` onto devices of other
  processes is not possible: each process builds the global array from its own copy.
  """
  sharding = replicated(mesh)

  def put(x):
    if isinstance(x, jax.Array) and x.sharding == sharding:
      return x
    if jax.process_count() == 1:
      return jax.device_put(x, sharding)
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      data = np.asarray(jax.random.key_data(x))
      impl = jax.random.key_impl(x)
      arr = jax.make_array_from_callback(data.shape, sharding, lambda idx: data[idx])
      return jax.random.wrap_key_data(arr, impl=impl)
    data = np.asarray(x)
    return jax.make_array_from_callback(data.shape, sharding, lambda idx: data[idx])

  return jax.tree.map(put, tree)


def is_logging_process() -> bool:
  """Only process 0 writes logs, plots and progress bars."""
  return jax.process_index() == 0


# --- meshes from a flag -----------------------------------------------------------------

def mesh_from_spec(spec: str, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A mesh from ``"tasks=4,model=2"`` over ``devices`` (default: all global devices).

  Axis sizes must multiply to the number of devices; one size may be ``-1`` (the rest).
  Only the task axis shards the learner's state; other axes replicate it (room for
  sharding the inner model later).
  """
  devices = list(jax.devices() if devices is None else devices)
  names, sizes = [], []
  for part in spec.split(","):
    part = part.strip()
    if not part:
      continue
    name, sep, size = part.partition("=")
    try:
      if not sep or not name.strip():
        raise ValueError
      sizes.append(int(size))
    except ValueError:
      raise ValueError(f"--mesh {spec!r}: expected comma-separated NAME=SIZE entries, "
                       f"e.g. 'tasks=4,model=2'; could not read {part!r}.") from None
    names.append(name.strip())
  if not names:
    raise ValueError(f"--mesh {spec!r} names no axis.")
  if len(set(names)) != len(names):
    raise ValueError(f"--mesh {spec!r} repeats an axis name.")
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"--mesh {spec!r}: sizes must be positive, at most one may be -1.")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"--mesh {spec!r}: {len(devices)} devices do not split into "
                       f"axes of sizes {sizes}.")
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f"--mesh {spec!r} has {int(np.prod(sizes))} devices but "
                     f"{len(devices)} ({devices[0].platform}, over {jax.process_count()} "
                     "process(es)) are available; the sizes must multiply to that.")
  return jax.make_mesh(tuple(sizes), tuple(names), devices=devices)


def check_tasks_axis_only(mesh: Mesh, spec: str = "", axis_name: str = DEFAULT_AXIS):
  """Refuse mesh axes other than ``axis_name`` with more than one device.

  Nothing shards over another axis yet: state replicated over a ``model=2`` axis would
  compute every task twice and quietly waste half the machine.
  """
  extra = {str(k): int(v) for k, v in mesh.shape.items() if k != axis_name and v > 1}
  if extra:
    total = int(mesh.size)
    raise ValueError(
        f"--mesh {spec or dict(mesh.shape)!r}: axis/axes {extra} would only replicate "
        f"every task (nothing is sharded over them yet); use --mesh {axis_name}={total}.")


# --- multi-process start-up -------------------------------------------------------------

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
