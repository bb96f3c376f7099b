"""The interface between gradient estimators and the inner problems they unroll.

A ``VectorizedTruncatedStep`` owns a batch of inner problems as one pytree whose every leaf
has a leading task axis. Estimators only call:

- ``init_step_state(theta, outer_state, key, theta_is_vector, task_ids,
  num_steps_override)``: fresh states for the tasks ``task_ids`` (global indices; every
  random draw of task ``i`` is keyed by ``fold_in(key, i)``, so a task's state does not
  depend on which device holds it); ``num_steps_override`` is the trajectory length the
  inner optimizer's ``init`` is told;
- ``unroll(theta, state, key, num_steps, outer_state, theta_is_vector, task_ids, data)``:
  run ``num_steps`` inner steps with ``lax.scan``, returning the new state and per-step
  outputs with shape ``[num_steps, tasks]``; ``data`` is ``None`` (batches drawn on device)
  or host-fed batches, leaves ``[num_steps, tasks, ...]``;
- ``unroll_step(theta, state, key, data=, outer_state=, theta_is_vector=, task_ids=)``: one
  inner step (``unroll`` runs it with ``fold_in(key, t)`` on step ``t``); estimators that
  chunk an unroll (remat) or change theta between steps (noise-reuse ES) call it directly.

``theta_is_vector`` means theta has a leading task axis (one perturbed theta per task, as
ES-style estimators need).
"""

from __future__ import annotations

from typing import Any, Optional

import jax


class VectorizedTruncatedStep:

  num_tasks: int

  def outer_init(self, key: jax.Array) -> Any:
    raise NotImplementedError

  def task_name(self) -> str:
    return "unnamed_task"  # the reference's default

  def cfg_name(self) -> str:
    return "unnamed_cfg"

  def init_step_state(self, theta, outer_state, key, theta_is_vector: bool = False,
                      task_ids: Optional[jax.Array] = None, num_steps_override=None):
    raise NotImplementedError

  def unroll(self, theta, state, key, num_steps: int, outer_state,
             theta_is_vector: bool = False, task_ids: Optional[jax.Array] = None,
             data=None):
    raise NotImplementedError

  def unroll_step(self, theta, state, key, data=None, outer_state=None,
                  theta_is_vector: bool = False, task_ids: Optional[jax.Array] = None):
    raise NotImplementedError
