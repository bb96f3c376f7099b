"""The vectorized truncated step for learned optimizers: ``num_tasks`` inner problems, each
trained by ``learned_opt.opt_fn(theta)``, held as one batched pytree.

Per task the state is a ``TruncatedUnrollState``: the inner optimizer state (which holds the
inner params), the inner step count, the truncation state (its length), the task params
and ``is_done``. One inner step of one task is::

    if is_done:                 # the trajectory ended on the previous step
      state = fresh trajectory  # new task params, params, optimizer state; loss masked
    else:
      opt_state, l = inner_step.train_step(task, opt, opt_state, k_train, batch)
      l = meta-loss (see meta_loss_split / meta_loss_with_aux_key)
    is_done = inner_step >= length

and outputs ``TruncatedUnrollOut`` with the (normalised) meta-loss, ``mask = not reset``
and ``is_reset`` (this step was a reset). Estimators use ``is_reset`` to tell which losses
belong to the trajectory that was running when the unroll started and which to the one
started inside it.

Randomness: the per-step key is ``fold_in(key, step)`` and task ``i`` uses
``fold_in(step_key, i)`` with ``i`` its *global* index, so a task behaves the same
whichever device holds it. The training batch, the meta-loss batch, the reset and the
truncation schedule each get their own stream of that key.

Resets (``reset_mode``): ``"cond"`` computes fresh trajectories only when some local task
is done (a scalar ``lax.cond`` around the re-initialisation; with small per-task states a
three-way ``lax.switch`` that, when at most ``n // FEW_RESETS_DIVISOR`` of the ``n`` local
tasks are done, initialises only those, gathered by a static-size ``nonzero`` and scattered
back); ``"select"`` computes them on every step and picks per task with ``where`` (no
conditional, more arithmetic). All give identical numbers (each task's fresh state comes
from its own key; tested); which is faster depends on the accelerator and on how often
some task resets (see the README's figures).

Lane groups (``lane_groups``): ``unroll`` may split the lanes it steps (a device's tasks,
both PES halves) into contiguous groups, each stepped by its own ops in the one scan body
and concatenated after it. The groups' op chains are independent, so XLA's CPU runtime can
overlap them on a device's threads; every task keeps its keys, so the numbers are the same
(``auto_lane_groups`` picks the count).

``random_initial_iteration_offset = N`` starts each task's ``inner_step`` at a random
integer in ``[0, N)`` (params and optimizer iteration stay fresh) so the tasks reach their
first reset at different outer steps, as the reference does.

Data: by default every task draws its batches on device (``task.sample_batch``). Tasks
whose ``datasets`` are host iterators (the reference's data model) use ``get_batch`` /
``get_outer_batch`` on the host and pass the result as ``data`` to ``unroll``.
"""

from __future__ import annotations

import math
import os
from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp

from spmd_lopt import inner_step
from spmd_lopt import threefry
from spmd_lopt.learned_optimizers import base as lopt_base
from spmd_lopt.outer_trainers import common
from spmd_lopt.outer_trainers import truncated_step
from spmd_lopt.outer_trainers import truncation_schedule
from spmd_lopt.tasks import base as tasks_base

RESET_MODES = ("cond", "select")
# "cond" with small per-task states: with lengths 100-300, n tasks see ~n/200 resets per
# step, so most steps with a reset have a few; a three-way switch (none / at most n // 8,
# gathered and initialised alone / more, all n) then beats initialising all n. XLA copies
# the state in the switch's pass-through branch on every step, so it pays only where the
# tasks are small and many (resets on most steps, each initialisation cheap):
# 10-d quadratics (~330 bytes each) 1.14-1.15x per meta step at 64 tasks (PES, 128 lanes),
# 1.12x on 2 devices, and unroll A/Bs 1.25x / 1.12x / 1.14x / 1.11x at 512 / 1,024 / 2,048 /
# 4,096 tasks (170 kB - 1.4 MB of state). Larger tasks gain nothing: 64-d quadratics
# (~2 kB each) 0.96x / 1.02x at 256 / 1,024 tasks, 256-d (~8 kB) 1.00x, 1,024-d (~33 kB)
# 1.00x, the 8x8 image MLP (~67 kB) 0.93-0.95x at 16 tasks and 0.97-0.98x at 32 and 64, so
# the plain cond there (docs/PERFORMANCE.md, rounds four and five).
FEW_RESETS_DIVISOR = 8
FEW_RESETS_MAX_TASK_STATE_BYTES = 1024


def gathered_resets_pay(state_bytes: int, num_tasks: int) -> bool:
  """Whether ``reset_mode="cond"`` uses the gathered three-way switch for ``num_tasks``
  local tasks holding ``state_bytes`` of state in all: at least one task per gathered
  slot (``num_tasks // FEW_RESETS_DIVISOR > 0``) and at most
  ``FEW_RESETS_MAX_TASK_STATE_BYTES`` per task."""
  return (num_tasks // FEW_RESETS_DIVISOR > 0
          and state_bytes <= FEW_RESETS_MAX_TASK_STATE_BYTES * num_tasks)


LANE_GROUP_MIN_BYTES = 1 << 19


def auto_lane_groups(num_lanes: int, state_bytes: int) -> int:
  """The lane groups ``unroll`` uses by default for ``num_lanes`` lanes whose unroll state
  holds ``state_bytes``: on CPU, as many as the CPU cores each local device has (the
  process's cores over its devices), fewer if they would not divide the lanes or would
  leave a group under ``LANE_GROUP_MIN_BYTES`` of state; 1 on other backends (a GPU or
  TPU runs one op at a time: groups would only split its ops). Measured on this 2-core
  machine with one device: 16 image-MLP tasks (32 lanes, 2.2 MB) 1.10x with 2 groups;
  quadratics (128 lanes, 43 KB) 0.89x and the Celo2 recipe's unrolls (8 lanes, 0.4 MB)
  0.93x, which the size floor keeps at one group (docs/PERFORMANCE.md, "Round ten")."""
  if jax.default_backend() != "cpu":
    return 1
  cores = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
           else os.cpu_count() or 1)
  groups = cores // max(jax.local_device_count(), 1)
  while groups > 1 and (num_lanes % groups or
                        state_bytes < LANE_GROUP_MIN_BYTES * groups):
    groups -= 1
  return max(groups, 1)


def _nbytes(tree) -> int:
  """Bytes of a pytree of (traced) arrays, from their static shapes (a PRNG key counts
  its key data)."""
  def one(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    return math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
  return sum(one(x) for x in jax.tree.leaves(tree) if hasattr(x, "shape"))


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


def _has_leaves(tree) -> bool:
  return tree is not None and bool(jax.tree.leaves(tree))


class VectorizedLOptTruncatedStep(truncated_step.VectorizedTruncatedStep):
  """``num_tasks`` tasks of ``task_family`` trained by ``learned_opt``.

  Args:
    task_family: the family tasks are sampled from (one sample per trajectory).
    learned_opt: the learned optimizer being meta-trained.
    trunc_sched: the truncation schedule (trajectory lengths).
    num_tasks: number of tasks across the whole mesh.
    meta_loss_split: ``None`` (the meta-loss is the training loss before the update),
      ``"same_data"`` (the loss after the update on the same batch) or a data split name
      (the loss after the update on a batch of that split, drawn with its own key).
    random_initial_iteration_offset: stagger the first trajectories (see module doc).
    outer_data_split: the split ``get_outer_batch`` draws from.
    meta_loss_with_aux_key: use this value of the task's ``loss_with_state_and_aux`` aux
      dict as the meta-loss instead of the loss (not normalised, as in the reference).
    task_name: name used in metrics; defaults to the family's name.
    reset_mode: ``"cond"`` or ``"select"`` (module docstring).
    lane_groups: ``unroll`` steps its lanes as this many independent groups (module
      docstring); ``None``: ``auto_lane_groups``.
  """

  def __init__(self, task_family: tasks_base.TaskFamily,
               learned_opt: lopt_base.LearnedOptimizer,
               trunc_sched: truncation_schedule.TruncationSchedule,
               num_tasks: int, meta_loss_split: Optional[str] = None,
               random_initial_iteration_offset: int = 0, outer_data_split: str = "train",
               meta_loss_with_aux_key: Optional[str] = None,
               task_name: Optional[str] = None, reset_mode: str = "cond",
               lane_groups: Optional[int] = None):
    if isinstance(meta_loss_split, int) and not isinstance(meta_loss_split, bool):
      # The reference's positional order is (..., num_tasks, meta_loss_split,
      # random_initial_iteration_offset); an int here is an offset passed positionally.
      raise ValueError("VectorizedLOptTruncatedStep: meta_loss_split must be None, "
                       f"'same_data' or a split name, got {meta_loss_split!r} (pass "
                       "random_initial_iteration_offset by keyword).")
    if int(num_tasks) != num_tasks or num_tasks <= 0:
      raise ValueError(f"num_tasks must be a positive integer, got {num_tasks!r}.")
    if int(random_initial_iteration_offset) < 0:
      raise ValueError("random_initial_iteration_offset must be >= 0, got "
                       f"{random_initial_iteration_offset!r}.")
    if reset_mode not in RESET_MODES:
      raise ValueError(f"reset_mode must be one of {RESET_MODES}, got {reset_mode!r}.")
    if lane_groups is not None and (int(lane_groups) != lane_groups or lane_groups < 1):
      raise ValueError(f"lane_groups must be None (auto) or a positive integer, got "
                       f"{lane_groups!r}.")
    # Abstract (no-compute) check that the family can be vmapped, so a bad family fails
    # here with its name rather than deep inside the fused step's tracing.
    tasks_base.check_task_family(task_family, jax.random.key(0))
    self.task_family = task_family
    self.learned_opt = learned_opt
    self.trunc_sched = trunc_sched
    self.num_tasks = int(num_tasks)
    self.random_initial_iteration_offset = int(random_initial_iteration_offset)
    self.meta_loss_split = meta_loss_split
    self.outer_data_split = outer_data_split
    self.meta_loss_with_aux_key = meta_loss_with_aux_key
    self.reset_mode = reset_mode
    self.lane_groups = None if lane_groups is None else int(lane_groups)
    self._task_name = task_name

  def outer_init(self, key):
    return self.learned_opt.init(key)

  def task_name(self) -> str:
    return (self._task_name or getattr(self.task_family, "name", None)
            or type(self.task_family).__name__)

  def cfg_name(self) -> str:
    return getattr(self.learned_opt, "name", None) or type(self.learned_opt).__name__

  @property
  def _separate_meta_batch(self) -> bool:
    return self.meta_loss_split not in (None, "same_data")

  # --- one task ---------------------------------------------------------------------

  def _init_one(self, theta, key, outer_state, with_offset: bool, num_steps=None):
    k_param, k_init, k_trunc, k_opt, k_offset = jax.random.split(key, 5)
    task_param = self.task_family.sample(k_param)
    task = self.task_family.task_fn(task_param)
    params, model_state = task.init_with_state(k_init)
    trunc_state = self.trunc_sched.init(k_trunc, outer_state)
    opt = self.learned_opt.opt_fn(theta, is_training=True)
    if num_steps is None:
      num_steps = trunc_state.length
    opt_state = opt.init(params, model_state, num_steps=num_steps, key=k_opt)
    if with_offset and self.random_initial_iteration_offset > 0:
      inner_step_ = jax.random.randint(k_offset, (), 0,
                                       self.random_initial_iteration_offset,
                                       dtype=jnp.int32)
    else:
      inner_step_ = jnp.asarray(0, jnp.int32)
    return TruncatedUnrollState(inner_opt_state=opt_state, inner_step=inner_step_,
                                truncation_state=trunc_state, task_param=task_param,
                                is_done=jnp.asarray(False))

  def _train_one(self, theta, state: TruncatedUnrollState, key, data=None):
    # Separate streams: the meta-loss batch of a split must not repeat the training draw.
    k_data, k_train, k_meta = jax.random.split(key, 3)
    task = self.task_family.task_fn(state.task_param)
    opt = self.learned_opt.opt_fn(theta, is_training=True)
    train_batch, meta_batch = data, None
    if data is not None and self._separate_meta_batch:
      train_batch, meta_batch = data
    if train_batch is None:
      train_batch = task.sample_batch(k_data, "train")
    aux_key = self.meta_loss_with_aux_key
    opt_state, _, meta_loss = inner_step.train_step(task, opt, state.inner_opt_state,
                                                    k_train, train_batch, aux_key)
    if self.meta_loss_split == "same_data":
      meta_loss = inner_step.eval_loss(task, opt, opt_state, k_meta, train_batch,
                                       aux_key=aux_key)
    elif self._separate_meta_batch:
      meta_loss = inner_step.eval_loss(task, opt, opt_state, k_meta, meta_batch,
                                       split=self.meta_loss_split, aux_key=aux_key)
    state = state.replace(inner_opt_state=opt_state, inner_step=state.inner_step + 1)
    if aux_key is None:
      meta_loss = task.normalizer(meta_loss)
    return state, meta_loss

  # --- many tasks -------------------------------------------------------------------

  def _task_ids(self, task_ids):
    return jnp.arange(self.num_tasks) if task_ids is None else task_ids

  def init_step_state(self, theta, outer_state, key, theta_is_vector: bool = False,
                      task_ids: Optional[jax.Array] = None,
                      num_steps_override=None) -> TruncatedUnrollState:
    """Fresh (staggered) states for ``task_ids``; every leaf is ``[len(task_ids), ...]``.

    num_steps_override: the trajectory length the inner optimizer's ``init`` is told
    (``num_steps``) instead of the truncation state's length; whole-unroll estimators
    pass the length they draw (an int or a traced int32 scalar).
    """
    task_ids = self._task_ids(task_ids)
    key = threefry.as_unrolled(key)  # same bits, no rolled hash loops on CPU
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(task_ids)
    init = lambda th, k: self._init_one(th, k, outer_state, with_offset=True,
                                        num_steps=num_steps_override)
    return jax.vmap(init, in_axes=(0 if theta_is_vector else None, 0))(theta, keys)

  def unroll_step(self, theta, state: TruncatedUnrollState, key, data=None,
                  outer_state=None, theta_is_vector: bool = False,
                  task_ids: Optional[jax.Array] = None):
    """One inner step of every task. Returns ``(state, TruncatedUnrollOut[tasks])``.

    ``data``: ``None`` (each task draws its batches on device) or a host-fed batch per
    task, leaves ``[tasks, ...]``; with a ``meta_loss_split`` naming a split it is the
    pair ``(train_batch, meta_batch)``, as ``get_batch`` returns it.
    """
    task_ids = self._task_ids(task_ids)
    key = threefry.as_unrolled(key)  # same bits, no rolled hash loops on CPU
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(task_ids)
    th_axis = 0 if theta_is_vector else None
    k_step = jax.vmap(lambda k: jax.random.fold_in(k, 0))(keys)
    k_reset = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
    k_sched = jax.vmap(lambda k: jax.random.fold_in(k, 2))(keys)
    data = data if _has_leaves(data) else None

    trained, loss = jax.vmap(self._train_one, in_axes=(th_axis, 0, 0, 0))(
        theta, state, k_step, data)
    reset = state.is_done

    init = lambda th, k: self._init_one(th, k, outer_state, with_offset=False)

    def with_resets():
      fresh = jax.vmap(init, in_axes=(th_axis, 0))(theta, k_reset)
      return common.select_per_task(reset, fresh, trained)

    n = reset.shape[0]
    few = n // FEW_RESETS_DIVISOR

    def with_few_resets():
      # The first `few` resetting tasks' indices, padded with n (dropped by the scatter):
      # only those are re-initialised, each from its own key as in with_resets.
      idx = jnp.nonzero(reset, size=few, fill_value=n)[0]
      at = jnp.minimum(idx, n - 1)
      th = jax.tree.map(lambda x: x[at], theta) if theta_is_vector else theta
      fresh = jax.vmap(init, in_axes=(th_axis, 0))(th, k_reset[at])
      return jax.tree.map(lambda t, f: t.at[idx].set(f, mode="drop"), trained, fresh)

    if self.reset_mode == "cond" and gathered_resets_pay(_nbytes(trained), n):
      count = jnp.sum(reset.astype(jnp.int32))
      branch = jnp.where(count == 0, 0, jnp.where(count <= few, 1, 2))
      next_state = jax.lax.switch(branch, [lambda: trained, with_few_resets, with_resets])
    elif self.reset_mode == "cond":
      next_state = jax.lax.cond(jnp.any(reset), with_resets, lambda: trained)
    else:
      next_state = with_resets()
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
    ``[num_steps, tasks, ...]`` (the reference's ``datas_list`` path, see ``get_batch``).
    """
    task_ids = self._task_ids(task_ids)
    key = threefry.as_unrolled(key)  # same bits, no rolled hash loops on CPU
    data = data if _has_leaves(data) else None
    # theta is fixed over the unroll: what the optimizer derives from it alone (MLPLOpt:
    # its first kernel's two row blocks) is computed once here rather than in every step.
    prepare = getattr(self.learned_opt, "prepare_theta", None)
    if prepare is not None:
      theta = jax.vmap(prepare)(theta) if theta_is_vector else prepare(theta)

    # The lanes as `groups` contiguous groups, each stepped by its own ops in the scan
    # body: independent chains, which XLA's CPU runtime partly overlaps on a device's
    # threads (its XLA ops; the kernel calls ran one after the other, each on both
    # threads). Every task keeps its own keys (global ids): the numbers of one group.
    groups = self._lane_groups(task_ids.shape[0], state)
    size = task_ids.shape[0] // groups

    def split(tree, axis=0):
      if groups == 1:
        return (tree,)
      return tuple(jax.tree.map(
          lambda x, g=g: jax.lax.slice_in_dim(x, g * size, (g + 1) * size, axis=axis), tree)
                   for g in range(groups))

    def join(trees, axis):
      if groups == 1:
        return trees[0]
      return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis), *trees)

    thetas = split(theta) if theta_is_vector else (theta,) * groups
    ids = split(task_ids)
    datas = (None,) * groups if data is None else split(data, axis=1)

    def body(states, xs):
      step, batches = xs
      step_key = jax.random.fold_in(key, step)
      res = [self.unroll_step(thetas[g], states[g], step_key, data=batches[g],
                              outer_state=outer_state, theta_is_vector=theta_is_vector,
                              task_ids=ids[g]) for g in range(groups)]
      return tuple(r[0] for r in res), tuple(r[1] for r in res)

    states, outs = jax.lax.scan(body, split(state), (jnp.arange(num_steps), datas))
    return join(states, 0), join(outs, 1)

  def _lane_groups(self, num_lanes: int, state) -> int:
    """How many independent groups ``unroll`` splits its ``num_lanes`` lanes into:
    ``lane_groups`` if set (it must divide them), else ``auto_lane_groups``."""
    if self.lane_groups is None:
      return auto_lane_groups(num_lanes, _nbytes(state))
    if num_lanes % self.lane_groups:
      raise ValueError(f"lane_groups={self.lane_groups} does not divide the {num_lanes} "
                       "lanes (tasks, or both PES halves of them) each device unrolls.")
    return self.lane_groups

  # --- the reference's host data model ----------------------------------------------

  def _shape(self, steps):
    return (self.num_tasks,) if steps is None else (int(steps), self.num_tasks)

  def get_batch(self, steps: Optional[int] = None):
    """Training data for ``unroll``'s ``data`` drawn on the host from the family's
    ``datasets`` iterators: leaves ``[steps, num_tasks, ...]`` (``[num_tasks, ...]``
    without ``steps``), paired with a batch of ``meta_loss_split`` when that names a
    split. ``()`` for a family without datasets (batches then come from the device)."""
    datasets = self.task_family.datasets
    train = inner_step.host_batches(datasets, "train", self._shape(steps))
    if not self._separate_meta_batch or datasets is None:
      return train
    return train, inner_step.host_batches(datasets, self.meta_loss_split,
                                          self._shape(steps))

  def get_outer_batch(self, steps: Optional[int] = None):
    """Batches of ``outer_data_split`` for ``meta_loss_batch``, shaped as ``get_batch``."""
    return inner_step.host_batches(self.task_family.datasets, self.outer_data_split,
                                   self._shape(steps))

  def meta_loss_batch(self, theta, unroll_state: TruncatedUnrollState, key, data,
                      outer_state=None, theta_is_vector: bool = False,
                      task_ids: Optional[jax.Array] = None) -> jax.Array:
    """Meta-loss ``[tasks]`` of each task's current params on ``data`` (one batch per
    task, leaves ``[tasks, ...]``, or ``None``/``()`` to draw ``outer_data_split`` on
    device): normalised loss, or the aux value ``meta_loss_with_aux_key``."""
    del outer_state
    task_ids = self._task_ids(task_ids)
    key = threefry.as_unrolled(key)  # same bits, no rolled hash loops on CPU
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(task_ids)
    data = data if _has_leaves(data) else None
    aux_key = self.meta_loss_with_aux_key

    def one(th, st, k, batch):
      task = self.task_family.task_fn(st.task_param)
      opt = self.learned_opt.opt_fn(th, is_training=True)
      loss = inner_step.eval_loss(task, opt, st.inner_opt_state, k, batch,
                                  split=self.outer_data_split, aux_key=aux_key)
      return loss if aux_key is not None else task.normalizer(loss)

    return jax.vmap(one, in_axes=(0 if theta_is_vector else None, 0, 0, 0))(
        theta, unroll_state, keys, data)


class SimpleVecLOptTruncatedStep(VectorizedLOptTruncatedStep):
  """The reference's simplified step: ``num_tasks`` copies of one ``task`` (fresh params
  per trajectory), each trajectory ``unroll_length`` inner steps."""

  def __init__(self, task: tasks_base.Task, lopt: lopt_base.LearnedOptimizer,
               num_tasks: int, unroll_length: int = 5, **kwargs):
    super().__init__(tasks_base.single_task_to_family(task), lopt,
                     truncation_schedule.ConstantTruncationSchedule(unroll_length),
                     num_tasks, **kwargs)
    self.task = task
    self.unroll_length = int(unroll_length)
