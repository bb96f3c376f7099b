"""The vectorized truncated step for learned optimizers: ``num_tasks`` inner problems, each
trained by ``learned_opt.opt_fn(theta)``, held as one batched pytree.

Per task the state is a ``TruncatedUnrollState``: the inner optimizer state (which holds the
inner params), the inner step count, the truncation state (its length), the task params
and ``is_done``. One inner step of one task is::

    if is_done:                 # the trajectory ended on the previous step
      state = fresh trajectory  # new task params, params, optimizer state; loss masked
    else:
      l, g = value_and_grad(task.loss)(params, batch)
      opt_state = opt.update(opt_state, g, loss=l)
    is_done = inner_step >= length

and outputs ``TruncatedUnrollOut`` with the (normalised) meta-loss, ``mask = not reset``
and ``is_reset`` (this step was a reset). Estimators use ``is_reset`` to tell which losses
belong to the trajectory that was running when the unroll started and which to the one
started inside it.

Randomness: the per-step key is ``fold_in(key, step)`` and task ``i`` uses
``fold_in(step_key, i)`` with ``i`` its *global* index, so a task behaves the same
whichever device holds it. Resets are computed only when some local task is done (a
scalar ``lax.cond``), which keeps the common step cheap.

``random_initial_iteration_offset = N`` starts each task's ``inner_step`` at a random
integer in ``[0, N)`` (params and optimizer iteration stay fresh) so the tasks reach their
first reset at different outer steps, as the reference does.
"""

from __future__ import annotations

from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp

from spmd_lopt.learned_optimizers import base as lopt_base
from spmd_lopt.outer_trainers import common
from spmd_lopt.outer_trainers import truncated_step
from spmd_lopt.outer_trainers import truncation_schedule
from spmd_lopt.tasks import base as tasks_base


@flax.struct.dataclass
class TruncatedUnrollState:
  inner_opt_state: Any
  inner_step: jax.Array
  truncation_state: truncation_schedule.TruncationState
  task_param: Any
  is_done: jax.Array


@flax.struct.dataclass
class TruncatedUnrollOut:
  """Per-step outputs; under ``unroll`` every leaf is ``[num_steps, tasks]``."""
  loss: jax.Array
  is_done: jax.Array
  is_reset: jax.Array
  task_param: Any
  iteration: jax.Array
  mask: jax.Array


class VectorizedLOptTruncatedStep(truncated_step.VectorizedTruncatedStep):
  """``num_tasks`` tasks of ``task_family`` trained by ``learned_opt``.

  Args:
    task_family: the family tasks are sampled from (one sample per trajectory).
    learned_opt: the learned optimizer being meta-trained.
    trunc_sched: the truncation schedule (trajectory lengths).
    num_tasks: number of tasks across the whole mesh.
    random_initial_iteration_offset: stagger the first trajectories (see module doc).
    meta_loss_split: ``None`` (the meta-loss is the training loss before the update),
      ``"same_data"`` (the loss after the update on the same batch) or a data split name
      (the loss after the update on a fresh batch of that split).
    task_name: name used in metrics; defaults to the family's name.
  """

  def __init__(self, task_family: tasks_base.TaskFamily,
               learned_opt: lopt_base.LearnedOptimizer,
               trunc_sched: truncation_schedule.TruncationSchedule,
               num_tasks: int, random_initial_iteration_offset: int = 0,
               meta_loss_split: Optional[str] = None, task_name: Optional[str] = None):
    if int(num_tasks) != num_tasks or num_tasks <= 0:
      raise ValueError(f"num_tasks must be a positive integer, got {num_tasks!r}.")
    if int(random_initial_iteration_offset) < 0:
      raise ValueError("random_initial_iteration_offset must be >= 0, got "
                       f"{random_initial_iteration_offset!r}.")
    # Abstract (no-compute) check that the family can be vmapped, so a bad family fails
    # here with its name rather than deep inside the fused step's tracing.
    tasks_base.check_task_family(task_family, jax.random.key(0))
    self.task_family = task_family
    self.learned_opt = learned_opt
    self.trunc_sched = trunc_sched
    self.num_tasks = int(num_tasks)
    self.random_initial_iteration_offset = int(random_initial_iteration_offset)
    self.meta_loss_split = meta_loss_split
    self._task_name = task_name

  def outer_init(self, key):
    return self.learned_opt.init(key)

  def task_name(self) -> str:
    return (self._task_name or getattr(self.task_family, "name", None)
            or type(self.task_family).__name__)

  # --- one task ---------------------------------------------------------------------

  def _init_one(self, theta, key, outer_state, with_offset: bool):
    k_param, k_init, k_trunc, k_opt, k_offset = jax.random.split(key, 5)
    task_param = self.task_family.sample(k_param)
    task = self.task_family.task_fn(task_param)
    params, model_state = task.init_with_state(k_init)
    trunc_state = self.trunc_sched.init(k_trunc, outer_state)
    opt = self.learned_opt.opt_fn(theta, is_training=True)
    opt_state = opt.init(params, model_state, num_steps=trunc_state.length, key=k_opt)
    if with_offset and self.random_initial_iteration_offset > 0:
      inner_step = jax.random.randint(k_offset, (), 0, self.random_initial_iteration_offset,
                                      dtype=jnp.int32)
    else:
      inner_step = jnp.asarray(0, jnp.int32)
    return TruncatedUnrollState(inner_opt_state=opt_state, inner_step=inner_step,
                                truncation_state=trunc_state, task_param=task_param,
                                is_done=jnp.asarray(False))

  def _train_one(self, theta, state: TruncatedUnrollState, key, batch=None):
    k_data, k_loss, k_opt, k_meta = jax.random.split(key, 4)
    task = self.task_family.task_fn(state.task_param)
    opt = self.learned_opt.opt_fn(theta, is_training=True)
    params, model_state = opt.get_params_state(state.inner_opt_state)
    if batch is None:
      batch = task.sample_batch(k_data, "train")

    def loss_fn(p):
      return task.loss_with_state(p, model_state, k_loss, batch)

    (loss, new_model_state), grad = jax.value_and_grad(loss_fn, has_aux=True)(params)
    opt_state = opt.update(state.inner_opt_state, grad, loss=loss,
                           model_state=new_model_state, key=k_opt)
    if self.meta_loss_split is None:
      meta_loss = loss
    else:
      new_params, new_state = opt.get_params_state(opt_state)
      meta_batch = (batch if self.meta_loss_split == "same_data"
                    else task.sample_batch(k_data, self.meta_loss_split))
      meta_loss, _ = task.loss_with_state(new_params, new_state, k_meta, meta_batch)
    state = state.replace(inner_opt_state=opt_state, inner_step=state.inner_step + 1)
    return state, task.normalizer(meta_loss)

  # --- many tasks -------------------------------------------------------------------

  def _task_ids(self, task_ids):
    return jnp.arange(self.num_tasks) if task_ids is None else task_ids

  def init_step_state(self, theta, outer_state, key, theta_is_vector: bool = False,
                      task_ids: Optional[jax.Array] = None) -> TruncatedUnrollState:
    """Fresh (staggered) states for ``task_ids``; every leaf is ``[len(task_ids), ...]``."""
    task_ids = self._task_ids(task_ids)
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(task_ids)
    init = lambda th, k: self._init_one(th, k, outer_state, with_offset=True)
    return jax.vmap(init, in_axes=(0 if theta_is_vector else None, 0))(theta, keys)

  def unroll_step(self, theta, state: TruncatedUnrollState, key, data=None,
                  outer_state=None, theta_is_vector: bool = False,
                  task_ids: Optional[jax.Array] = None):
    """One inner step of every task. Returns ``(state, TruncatedUnrollOut[tasks])``.

    ``data``: ``None`` (each task draws its batch on device) or a host-fed batch per task,
    leaves ``[tasks, ...]``.
    """
    task_ids = self._task_ids(task_ids)
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(task_ids)
    th_axis = 0 if theta_is_vector else None
    k_step = jax.vmap(lambda k: jax.random.fold_in(k, 0))(keys)
    k_reset = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
    k_sched = jax.vmap(lambda k: jax.random.fold_in(k, 2))(keys)

    trained, loss = jax.vmap(self._train_one, in_axes=(th_axis, 0, 0, 0))(
        theta, state, k_step, data)
    reset = state.is_done

    def with_resets():
      init = lambda th, k: self._init_one(th, k, outer_state, with_offset=False)
      fresh = jax.vmap(init, in_axes=(th_axis, 0))(theta, k_reset)
      return common.select_per_task(reset, fresh, trained)

    # Skip the (costly) re-initialisation on the many steps where no local task resets.
    next_state = jax.lax.cond(jnp.any(reset), with_resets, lambda: trained)
    next_trunc, is_done = jax.vmap(
        lambda s, n, k: self.trunc_sched.next_state(s, n, k, outer_state))(
            next_state.truncation_state, next_state.inner_step, k_sched)
    next_state = next_state.replace(truncation_state=next_trunc, is_done=is_done)
    loss = jnp.where(reset, jnp.zeros_like(loss), loss)
    out = TruncatedUnrollOut(loss=loss, is_done=is_done, is_reset=reset,
                             task_param=next_state.task_param,
                             iteration=next_state.inner_step, mask=jnp.logical_not(reset))
    return next_state, out

  def unroll(self, theta, state, key, num_steps: int, outer_state,
             theta_is_vector: bool = False, task_ids: Optional[jax.Array] = None,
             data=None):
    """``num_steps`` inner steps in one ``lax.scan``; outputs are ``[num_steps, tasks]``.

    ``data``: ``None`` (batches drawn on device) or host-fed batches with leaves
    ``[num_steps, tasks, ...]`` (the reference's ``datas_list`` path).
    """
    task_ids = self._task_ids(task_ids)

    def body(state, xs):
      step, batch = xs
      return self.unroll_step(theta, state, jax.random.fold_in(key, step), data=batch,
                              outer_state=outer_state, theta_is_vector=theta_is_vector,
                              task_ids=task_ids)

    return jax.lax.scan(body, state, (jnp.arange(num_steps), data))
