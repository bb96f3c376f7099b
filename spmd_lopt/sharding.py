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


def is_logging_process() -> bool:
  """Only process 0 writes logs, plots and progress bars."""
  return jax.process_index() == 0
