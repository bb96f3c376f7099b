"""Meshes and shardings: where the task population lives.

The whole design is stated here once:

- theta, the outer-optimizer state and every metric are **replicated** (``P()``);
- every estimator's unroll state has a leading task axis that is **sharded** over the mesh
  axis ``axis_name`` (``P(axis_name)``); other mesh axes, if any, replicate it;
- inside the learner's ``shard_map`` device ``d`` owns the global task indices
  ``d * n_local + arange(n_local)``, ``n_local = num_tasks // mesh.shape[axis_name]``.

``jax.make_mesh`` gives *Explicit* axes on current JAX: arrays passed to a ``shard_map``
must already carry the ``NamedSharding`` that its ``in_specs`` name. The learner's ``init``
therefore builds its state with ``out_shardings`` from ``state_shardings`` below.

In a multi-process run (started by ``spmd_lopt.multihost.initialize``) ``jax.devices()``
lists every process's devices and the meshes here span them: theta is replicated on every
device, unroll states are split over the task axis, and each process computes and holds
only the shards of its own devices. Host values (keys) enter through ``replicate``, which
builds the global array from every process's identical copy. ``mesh_from_spec`` reads
``--mesh tasks=4,model=2``.
"""

from __future__ import annotations

from typing import Optional, Sequence

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


# Integer sums travel as float32 "limbs" of this many bits: each limb is < 2**11 and a sum
# of at most _MAX_EXACT_DEVICES of them stays below 2**24, where float32 is still exact.
_LIMB_BITS = 11
_MAX_EXACT_DEVICES = 2 ** (24 - _LIMB_BITS)


def mean_and_sum_packed(means, sums, axis_name):
  """``(pmean(means), psum(sums))`` over ``axis_name`` with **one** all-reduce operand when
  ``means``' leaves are float32 and ``sums``' leaves are 32-bit integers (the learner's
  meta-gradients and losses, and its non-finite counts).

  Each integer ``c`` is viewed as ``uint32`` and split into limbs
  ``c = l_0 + 2^11 l_1 + 2^22 l_2`` (``l_k < 2^11``), stored as float32 beside the means;
  the sum over ``D`` devices of a limb is an integer below ``D 2^11 <= 2^24``, exact in
  float32 in any order, and ``sum_k 2^(11k) (sum_d l_k)`` taken modulo ``2^32`` is bit for
  bit the int32 ``psum`` (overflow wraps alike). Means are ``psum / D`` as ``lax.pmean``
  computes them. Leaves of other dtypes, or more than ``2^13`` devices, fall back to one
  operand per dtype (``pmean_packed``).

  Why one: besides the per-operand gloo latency (``pmean_packed``), two *independent*
  all-reduces in one program may run concurrently on XLA CPU's intra-op threads; with as
  many threads as cores (2 here) both can block waiting for a device whose own work then
  finds no free thread, until XLA's collective timeout aborts the process (seen under
  load with 2 CPU devices).
  """
  n = jax.lax.psum(1, axis_name)
  mean_leaves, mean_def = jax.tree.flatten(means)
  sum_leaves, sum_def = jax.tree.flatten(sums)
  packable = (n <= _MAX_EXACT_DEVICES
              and all(jnp.result_type(x) == jnp.float32 for x in mean_leaves)
              and all(jnp.issubdtype(jnp.result_type(x), jnp.integer)
                      and jnp.dtype(jnp.result_type(x)).itemsize == 4 for x in sum_leaves))
  if not packable:
    return pmean_packed(means, axis_name), pmean_packed(sums, axis_name, jax.lax.psum)
  mask = (1 << _LIMB_BITS) - 1
  limbs = []
  for x in sum_leaves:
    u = jnp.ravel(x).astype(jnp.uint32)  # modular view: negative values wrap, as in psum
    limbs += [((u >> (_LIMB_BITS * k)) & mask).astype(jnp.float32) for k in range(3)]
  parts = [jnp.ravel(x) for x in mean_leaves] + limbs
  flat = jax.lax.psum(jnp.concatenate(parts), axis_name)
  out_means, start = [], 0
  for x in mean_leaves:
    size = int(jnp.size(x))
    out_means.append(flat[start:start + size].reshape(jnp.shape(x)) / n)
    start += size
  out_sums = []
  for x in sum_leaves:
    size = int(jnp.size(x))
    total = jnp.zeros((size,), jnp.uint32)
    for k in range(3):
      total = total + (flat[start:start + size].astype(jnp.uint32) << (_LIMB_BITS * k))
      start += size
    out_sums.append(total.astype(jnp.result_type(x)).reshape(jnp.shape(x)))
  return jax.tree.unflatten(mean_def, out_means), jax.tree.unflatten(sum_def, out_sums)


def pmean_packed(tree, axis_name, reduce=jax.lax.pmean):
  """``reduce`` (``lax.pmean``/``lax.psum``) of every leaf of ``tree`` over ``axis_name``,
  as one collective per dtype: the leaves of a dtype are raveled and concatenated into one
  vector ``[sum of sizes]``, reduced, and split back into their shapes.

  Why: XLA's CPU runtime runs each operand of a (tuple) all-reduce as its own cross-process
  collective, and one gloo collective costs a fixed latency of about 4 ms on a 2-core VM,
  so reducing leaf by leaf cost 8 of them per estimator and step with MLPLOpt (6 theta
  leaves, the loss, the counts; ``scripts/repro_two_process.py``). Elementwise the sums are
  the same, and so are the numbers.
  """
  leaves, treedef = jax.tree.flatten(tree)
  groups: dict = {}
  for i, x in enumerate(leaves):
    groups.setdefault(jnp.result_type(x), []).append(i)
  out = list(leaves)
  for idx in groups.values():
    flat = reduce(jnp.concatenate([jnp.ravel(leaves[i]) for i in idx]), axis_name)
    start = 0
    for i in idx:
      size = int(jnp.size(leaves[i]))
      out[i] = flat[start:start + size].reshape(jnp.shape(leaves[i]))
      start += size
  return jax.tree.unflatten(treedef, out)
