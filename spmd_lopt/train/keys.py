"""A run's key schedule: every key the launcher uses follows from ``config.seed``.

``k_init, k_steps = split(key(seed))``. ``k_init`` is what ``SpmdGradientLearner.init``
receives; that init splits it again, ``k_theta, k_est = split(k_init)``, and draws theta
from ``k_theta`` (``theta_init_key``) and the estimators' unroll states from ``k_est``.
The call that starts at outer step ``s`` uses ``fold_in(k_steps, s)``, so a run resumed
at step ``s`` replays exactly the keys of an uninterrupted run.
"""

from __future__ import annotations

import jax
import numpy as np

from spmd_lopt import sharding


def _run_keys(seed: int) -> tuple[jax.Array, jax.Array]:
  """``(k_init, k_steps) = split(key(seed))``."""
  k_init, k_steps = jax.random.split(jax.random.key(int(seed)))
  return k_init, k_steps


def init_key(seed: int) -> jax.Array:
  """The key the launcher passes to ``learner.init`` for ``config.seed = seed``."""
  return _run_keys(seed)[0]


def theta_init_key(seed: int) -> jax.Array:
  """The key theta is initialised from when ``config.seed = seed``:
  ``split(init_key(seed))[0]``, the first half of the learner's own split in ``init``.
  ``lopt.init(theta_init_key(seed))`` is the theta a launcher run starts from."""
  return jax.random.split(init_key(seed))[0]


def step_keys(cfg, mesh, first_step: int) -> jax.Array:
  """Keys of the calls from ``first_step`` on, made on device at once and replicated
  (the loop never ships a key): call ``c`` gets ``fold_in(k_steps, c * steps_per_call)``.
  ``[max(1, remaining calls)]`` keys."""
  spc = cfg.steps_per_call
  num_calls, start_call = cfg.outer_steps // spc, first_step // spc
  starts = np.arange(start_call, max(num_calls, start_call + 1), dtype=np.int32) * spc
  k_steps = _run_keys(cfg.seed)[1]
  return jax.jit(jax.vmap(jax.random.fold_in, in_axes=(None, 0)),
                 out_shardings=sharding.replicated(mesh))(
                     sharding.replicate(k_steps, mesh), sharding.replicate(starts, mesh))


def keys_ahead(call_keys: jax.Array, state, block: int = 1024):
  """Yield ``call_keys[0], call_keys[1], ...`` one at a time, cut ``block`` at a time.

  Why not ``call_keys[i]`` in the loop: that eager slice is a program on every device of
  the mesh, and dispatching one while a meta step's all-reduce is in flight deadlocked XLA's
  in-process CPU collectives (2 CPU devices: the step's all-reduce waited for a device that
  never arrived, and XLA aborted after 40 s; reproduced 3 times in 3 tries under load, 0 in
  10 with the keys cut before the loop). So each block is cut only after ``state()`` (the
  newest state, a callable) is ready: one pause of the pipeline per ``block`` steps.
  """
  for start in range(0, call_keys.shape[0], block):
    jax.block_until_ready(state())
    cut = list(call_keys[start:start + block])
    jax.block_until_ready(cut)
    yield from cut

