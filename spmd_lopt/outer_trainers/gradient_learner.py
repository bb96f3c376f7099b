"""Learners: apply averaged meta-gradients to theta with an outer optimizer.

``SpmdGradientLearner`` is the fused design. One ``jax.jit``-compiled program per call:

1. inside one ``jax.shard_map`` over the mesh axis ``axis_name``, every device runs every
   estimator on its slice of that estimator's tasks (global indices, see
   ``spmd_lopt.sharding``);
2. per estimator, the meta-gradient and meta-loss are averaged over devices with
   ``lax.pmean`` (non-finite per-task values were already replaced, and counted), all
   estimators' leaves and the non-finite counts packed into one all-reduce operand
   (``sharding.mean_and_sum_packed``);
3. ``grad = mean over estimators``, ``loss = mean over estimators`` (the reference's
   aggregation), then the replicated outer-optimizer update ``theta_opt.update``.

The old state is donated. Metrics come back as one pytree of device scalars; nothing is
copied to the host inside the step. Every task family's data sets (``family.datasets``, for
families with ``with_datasets``) are replicated over the mesh once and passed to each
compiled program as an argument, so no program embeds a data set as a constant.

``SingleMachineGradientLearner`` is the same learner on a one-device mesh, with the
reference's signature. The reference's host-driven API (``GradientLearner``,
``gradient_worker_compute``, ``AggregatedGradient``, ``ParameterCheckpoint``, ...) lives
in ``spmd_lopt.compat`` and is re-exported here, the reference's import path.
"""

from __future__ import annotations

import copy
from typing import Any, Optional, Sequence

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from spmd_lopt import sharding
from spmd_lopt import threefry
from spmd_lopt import xla_options
# The reference's host API lives in spmd_lopt.compat; re-exported here, its import path.
from spmd_lopt.compat import host_api as _host_api
from spmd_lopt.compat.host_api import (  # noqa: F401
    AggregatedGradient, GradientLearner, GradientLearnerState, OptCheckpoint,
    ParameterCheckpoint, WorkerComputeOut, gradient_worker_compute)
from spmd_lopt.learned_optimizers import base as lopt_base
from spmd_lopt.optimizers import base as opt_base
from spmd_lopt.outer_trainers import estimator_base
# Re-exported so reference scripts find them where they used to be.
from spmd_lopt.outer_trainers.estimator_base import (  # noqa: F401
    GradientEstimator, GradientEstimatorOut, OuterState, UnrollInfo, WorkerWeights)

MetaParams = Any


@flax.struct.dataclass
class SingleMachineState:
  """The learner's whole state: replicated ``gradient_learner_state`` and one task-sharded
  state per estimator (``gradient_estimator_states``, a tuple)."""
  gradient_learner_state: GradientLearnerState
  gradient_estimator_states: tuple


SpmdLearnerState = SingleMachineState


def _metric_names(estimators) -> list[str]:
  """One unique metric prefix per estimator: its task name, suffixed on collisions."""
  names, seen = [], {}
  for est in estimators:
    base = est.task_name()
    seen[base] = seen.get(base, 0) + 1
    names.append(base if seen[base] == 1 else f"{base}_{seen[base] - 1}")
  return names


def family_datasets(est) -> Any:
  """The data sets of ``est``'s task family if it can be rebound to others
  (``with_datasets``), else ``None``: a pytree of arrays, or ``None``."""
  family = getattr(getattr(est, "truncated_step", None), "task_family", None)
  if family is None or not hasattr(family, "with_datasets"):
    return None
  return family.datasets


def with_family_datasets(est, datasets):
  """A shallow copy of ``est`` whose truncated step's family reads ``datasets`` (e.g. the
  traced argument of a jitted step); ``est`` itself if ``datasets`` is ``None``."""
  if datasets is None:
    return est
  step = copy.copy(est.truncated_step)
  step.task_family = step.task_family.with_datasets(datasets)
  out = copy.copy(est)
  out.truncated_step = step
  return out


def largest_task_tensor(est) -> Optional[int]:
  """Entries of the largest parameter tensor of one of ``est``'s inner tasks, found
  abstractly (``eval_shape`` of the family's ``sample`` and the task's
  ``init_with_state``); ``None`` for an estimator without a truncated step's task family.
  The step's compiler options depend on it (``xla_options.step_options``)."""
  family = getattr(getattr(est, "truncated_step", None), "task_family", None)
  if family is None:
    return None

  def params(key):
    k_sample, k_init = jax.random.split(key)
    return family.task_fn(family.sample(k_sample)).init_with_state(k_init)[0]

  shapes = jax.eval_shape(params, jax.random.key(0))
  return max((int(x.size) for x in jax.tree.leaves(shapes)), default=0)


def library_graphs_pay(learned_opts) -> bool:
  """Whether XLA's CPU library graphs speed up a step training with all of
  ``learned_opts`` (``None`` entries skipped): every one's ``cpu_library_graphs``,
  ``True`` when a rule does not say."""
  return all(getattr(lo, "cpu_library_graphs", True) for lo in learned_opts
             if lo is not None)


class SpmdGradientLearner:
  """Meta-train ``meta_init`` with ``gradient_estimators``, tasks sharded over a mesh.

  Args:
    meta_init: the learned optimizer (anything with ``init(key) -> theta``).
    gradient_estimators: estimators, each with its own task family and ``num_tasks``;
      every estimator's tasks are spread over the whole mesh axis.
    theta_opt: outer optimizer (an ``Optimizer``, e.g. ``optimizers.base.Adam(1e-3)``).
    mesh: a ``jax.sharding.Mesh`` with an axis called ``axis_name``; ``None`` means all
      global devices on that one axis.
    axis_name: the mesh axis tasks are sharded over.
    datasets_as_arguments: pass the task families' data sets to the compiled programs
      as replicated arguments (default) instead of closing over them, which embeds them
      as constants in every program (slower compiles, programs the data set's size).
  """

  def __init__(self, meta_init: lopt_base.LearnedOptimizer,
               gradient_estimators: Sequence[estimator_base.GradientEstimator],
               theta_opt: opt_base.Optimizer, mesh: Optional[jax.sharding.Mesh] = None,
               axis_name: str = sharding.DEFAULT_AXIS, datasets_as_arguments: bool = True):
    if not gradient_estimators:
      raise ValueError("SpmdGradientLearner needs at least one gradient estimator.")
    self.meta_init = meta_init
    self.gradient_estimators = tuple(gradient_estimators)
    self.theta_opt = theta_opt
    self.axis_name = axis_name
    self.mesh = mesh if mesh is not None else sharding.make_mesh(axis_name)
    datasets = tuple(family_datasets(e) if datasets_as_arguments else None
                     for e in self.gradient_estimators)
    # Placed once; every call passes the same replicated arrays (no per-call transfer).
    self._datasets = sharding.replicate(datasets, self.mesh)
    self._num_local = tuple(
        sharding.check_divisible(est.num_tasks, self.mesh, axis_name,
                                 f"estimator {i} ({est.task_name()})")
        for i, est in enumerate(self.gradient_estimators))
    self.metric_names = _metric_names(self.gradient_estimators)
    # Estimators whose tasks read host iterators: ``update`` draws their batches.
    self._host_fed = tuple(estimator_base.has_host_datasets(getattr(e, "truncated_step",
                                                                    None))
                           for e in self.gradient_estimators)
    sizes = [largest_task_tensor(e) for e in self.gradient_estimators]
    # The largest products of the step decide whether XLA's CPU library graphs pay
    # (xla_options.step_options); unknown for any estimator -> keep the default (None).
    max_entries = None if None in sizes else max(sizes)
    self.compiler_options = xla_options.step_options(
        self.mesh, max_entries, library_graphs=library_graphs_pay(
            [meta_init] + [getattr(getattr(e, "truncated_step", None), "learned_opt", None)
                           for e in self.gradient_estimators]))
    self._jit_init = None
    self._jit_update = {}
    self._jit_update_many = {}

  # --- state layout -----------------------------------------------------------------

  def _bound_estimators(self, datasets):
    """The estimators reading ``datasets`` (one entry per estimator, ``None`` = its own)."""
    return tuple(with_family_datasets(e, d) for e, d in zip(self.gradient_estimators,
                                                            datasets))

  def _init_fn(self, key, datasets):
    k_theta, k_est = jax.random.split(key)
    theta = self.meta_init.init(k_theta)
    opt_state = self.theta_opt.init(theta)
    ax = self.axis_name

    def body(theta, key, outer_iteration, datasets):
      outer_state = OuterState(outer_iteration=outer_iteration)
      ests = self._bound_estimators(datasets)
      return tuple(
          est.init_local(theta, outer_state, jax.random.fold_in(key, i),
                         sharding.local_task_ids(n, ax))
          for i, (est, n) in enumerate(zip(ests, self._num_local)))

    est_states = jax.shard_map(body, mesh=self.mesh, in_specs=(P(), P(), P(), P()),
                               out_specs=P(ax))(theta, k_est, opt_state.iteration,
                                                datasets)
    return SingleMachineState(GradientLearnerState(opt_state), est_states)

  def state_shardings(self, abstract_state=None):
    """NamedShardings of the state: replicated learner state, task-sharded estimators."""
    if abstract_state is None:
      abstract_state = self.abstract_state()
    rep = sharding.replicated(self.mesh)
    tasks = sharding.task_sharded(self.mesh, self.axis_name)
    return SingleMachineState(
        gradient_learner_state=jax.tree.map(lambda _: rep,
                                            abstract_state.gradient_learner_state),
        gradient_estimator_states=jax.tree.map(lambda _: tasks,
                                               abstract_state.gradient_estimator_states))

  def abstract_state(self):
    """Shapes and dtypes of the state, without computing it."""
    return jax.eval_shape(self._init_fn, jax.random.key(0), self._datasets)

  # --- the reference API ------------------------------------------------------------

  def init(self, key) -> SingleMachineState:
    if self._jit_init is None:
      self._jit_init = jax.jit(self._init_fn, out_shardings=self.state_shardings())
    return self._jit_init(sharding.replicate(key, self.mesh), self._datasets)

  def get_meta_params(self, state: SingleMachineState) -> MetaParams:
    return self.theta_opt.get_params(state.gradient_learner_state.theta_opt_state)

  def get_state_for_worker(self, state: SingleMachineState) -> WorkerWeights:
    opt_state = state.gradient_learner_state.theta_opt_state
    return WorkerWeights(theta=self.theta_opt.get_params(opt_state), theta_model_state=None,
                         outer_state=OuterState(outer_iteration=opt_state.iteration))

  def _estimate(self, state: SingleMachineState, key, datas, datasets):
    """The sharded half of a meta step: every estimator on every device, reduced.
    ``datasets``: the task families' data sets (replicated), see ``__init__``.

    Returns ``(new_estimator_states, grads per estimator, losses[E], nonfinite[E, 2])``
    (non-finite tasks and entries).
    """
    datas = self._check_datas(datas)
    opt_state = state.gradient_learner_state.theta_opt_state
    theta = self.theta_opt.get_params(opt_state)
    ax = self.axis_name

    def body(theta, est_states, key, outer_iteration, datas, datasets):
      outer_state = OuterState(outer_iteration=outer_iteration)
      # Every key an estimator derives comes from here: same bits as jax's threefry,
      # without its rolled CPU hash loops (spmd_lopt.threefry).
      key = threefry.as_unrolled(key)
      new_states, grads, losses, nonfinite = [], [], [], []
      ests = self._bound_estimators(datasets)
      for i, (est, n) in enumerate(zip(ests, self._num_local)):
        res = est.estimate_local(theta, est_states[i], jax.random.fold_in(key, i),
                                 sharding.local_task_ids(n, ax), outer_state, data=datas[i])
        new_states.append(res.state)
        grads.append(res.grad)
        losses.append(res.loss)
        nonfinite.append(jnp.stack([res.nonfinite, res.nonfinite_entries]))
      # Averaged (grads, losses) and [tasks, entries] with non-finite values, summed over
      # the mesh: one all-reduce for all estimators together (sharding.mean_and_sum_packed).
      (grads, losses), nonfinite = sharding.mean_and_sum_packed(
          (tuple(grads), jnp.stack(losses)), jnp.stack(nonfinite), ax)
      return tuple(new_states), grads, losses, nonfinite

    return jax.shard_map(
        body, mesh=self.mesh, in_specs=(P(), P(ax), P(), P(), P(None, ax), P()),
        out_specs=(P(ax), P(), P(), P()))(theta, state.gradient_estimator_states, key,
                                          opt_state.iteration, datas, datasets)

  def _check_datas(self, datas):
    """Host-fed batches: ``None`` or one entry per estimator (``None`` = draw on device),
    leaves ``[unroll_length, num_tasks, ...]``, sharded over tasks by ``shard_datas``."""
    if datas is None:
      datas = (None,) * len(self.gradient_estimators)
    if len(datas) != len(self.gradient_estimators):
      raise ValueError(f"datas has {len(datas)} entries for "
                       f"{len(self.gradient_estimators)} estimators.")
    for est, d in zip(self.gradient_estimators, datas):
      if d is None and estimator_base.has_host_datasets(getattr(est, "truncated_step", None)):
        raise ValueError(f"the tasks of {est.task_name()} read host iterators "
                         "(datasets_base.Datasets): use update(), which draws their batches, "
                         "or pass datas=..., one entry per estimator "
                         "(estimator.get_host_data()).")
      for leaf in jax.tree.leaves(d):
        if leaf.ndim < 2 or leaf.shape[1] != est.num_tasks:
          raise ValueError(f"host-fed data for {est.task_name()} must have leaves "
                           f"[unroll_length, num_tasks={est.num_tasks}, ...], got "
                           f"{leaf.shape}.")
    return tuple(datas)

  def shard_datas(self, datas):
    """Place host batches (numpy, leaves ``[T, num_tasks, ...]``) sharded over tasks.

    In a multi-process run each process passes the full arrays and keeps its shard."""
    spec = jax.sharding.NamedSharding(self.mesh, P(None, self.axis_name))
    return jax.tree.map(
        lambda x: jax.make_array_from_callback(x.shape, spec, lambda idx: x[idx]), datas)

  def meta_gradient(self, state: SingleMachineState, key):
    """The averaged meta-gradient and meta-loss of one step, without applying it (and
    without donating ``state``): ``-> (grad, loss)``."""
    if not hasattr(self, "_jit_meta_gradient"):
      def fn(state, key, datasets):
        _, grads, losses, _ = self._estimate(state, key, None, datasets)
        return jax.tree.map(lambda *g: sum(g) / len(g), *grads), jnp.mean(losses)
      self._jit_meta_gradient = jax.jit(
          fn, compiler_options=self.compiler_options)
    return self._jit_meta_gradient(state, sharding.replicate(key, self.mesh),
                                   self._datasets)

  def _step(self, state: SingleMachineState, key, with_metrics: bool, datas, datasets):
    opt_state = state.gradient_learner_state.theta_opt_state
    theta = self.theta_opt.get_params(opt_state)
    new_states, grads, losses, nonfinite = self._estimate(state, key, datas, datasets)
    num = len(grads)
    grad = jax.tree.map(lambda *g: sum(g) / num, *grads)
    loss = jnp.mean(losses)
    new_opt_state = self.theta_opt.update(opt_state, grad, loss=loss)
    new_state = SingleMachineState(GradientLearnerState(new_opt_state), new_states)

    metrics = {}
    if with_metrics:
      for name, g, l, nf in zip(self.metric_names, grads, losses, nonfinite):
        metrics[f"mean||{name}/mean_loss"] = l
        metrics[f"mean||{name}/grad_norm"] = optax.tree.norm(g)
        metrics[f"mean||{name}/nonfinite"] = nf[0]
        metrics[f"mean||{name}/nonfinite_entries"] = nf[1]
      metrics["none||mean_loss"] = loss
      metrics["none||best_of_mean_loss"] = jnp.min(losses)
      metrics["none||theta_grad_norm"] = optax.tree.norm(grad)
      metrics["none||nonfinite"] = jnp.sum(nonfinite[:, 0])
      metrics["none||nonfinite_entries"] = jnp.sum(nonfinite[:, 1])
      metrics["none||theta_norm"] = optax.tree.norm(theta)
    return new_state, loss, metrics

  def update(self, state: SingleMachineState, key, with_metrics: bool = False,
             datas=None):
    """One meta step: ``(state, key) -> (state, loss, metrics)``. Donates ``state``.

    ``datas`` (optional): host-fed batches, one entry per estimator (see ``shard_datas``;
    host arrays, e.g. from ``get_batch``, are placed here); by default every task draws
    its batches on device, except tasks whose family has host iterators (the reference's
    data model): theirs are drawn here, on the host, with ``get_host_data``.
    """
    if datas is None and any(self._host_fed):
      datas = tuple(e.get_host_data() if fed else None
                    for e, fed in zip(self.gradient_estimators, self._host_fed))
    if datas is not None:
      datas = tuple(self._place_host_leaves(d) for d in datas)
    return self._update_fn(with_metrics)(state, sharding.replicate(key, self.mesh), datas,
                                         self._datasets)

  def _place_host_leaves(self, data):
    """Shard the host (numpy) leaves of one estimator's batches over tasks; arrays already
    on device are left as they are."""
    if data is None or all(isinstance(x, jax.Array) for x in jax.tree.leaves(data)):
      return data
    return jax.tree.map(lambda x: x if isinstance(x, jax.Array) else self.shard_datas(x),
                        data)

  def _update_fn(self, with_metrics: bool):
    if with_metrics not in self._jit_update:
      self._jit_update[with_metrics] = jax.jit(
          lambda s, k, d, ds: self._step(s, k, with_metrics, d, ds), donate_argnums=(0,),
          compiler_options=self.compiler_options)
    return self._jit_update[with_metrics]

  def lower_update(self, state: SingleMachineState, key, steps_per_call: int = 1,
                   with_metrics: bool = False):
    """The ``jax.stages.Lowered`` meta step that ``update`` (or ``update_many`` with
    ``steps_per_call`` steps) runs, for ``.compile().cost_analysis()`` /
    ``memory_analysis()`` / ``as_text()``. Uses the same jitted function, so after a first
    ``update`` the compile is a cache hit. Does not consume ``state``."""
    key = sharding.replicate(key, self.mesh)
    if steps_per_call == 1:
      return self._update_fn(with_metrics).lower(state, key, None, self._datasets)
    return self._update_many_fn(steps_per_call, with_metrics).lower(state, key,
                                                                     self._datasets)

  def update_many(self, state: SingleMachineState, key, num_steps: int,
                  with_metrics: bool = False):
    """``num_steps`` meta steps in one dispatch (a ``lax.scan`` over ``update``).

    Equivalent to calling ``update`` with the keys ``jax.random.split(key, num_steps)`` in
    turn; returns ``(state, losses[num_steps], metrics with a leading [num_steps] axis)``.
    """
    return self._update_many_fn(num_steps, with_metrics)(
        state, sharding.replicate(key, self.mesh), self._datasets)

  def _update_many_fn(self, num_steps: int, with_metrics: bool):
    cache_key = (num_steps, with_metrics)
    if cache_key not in self._jit_update_many:
      def many(state, key, datasets):
        def body(s, k):
          s, loss, m = self._step(s, k, with_metrics, None, datasets)
          return s, (loss, m)
        state, (losses, metrics) = jax.lax.scan(body, state, jax.random.split(key, num_steps))
        return state, losses, metrics
      self._jit_update_many[cache_key] = jax.jit(
          many, donate_argnums=(0,), compiler_options=self.compiler_options)
    return self._jit_update_many[cache_key]


class SingleMachineGradientLearner(SpmdGradientLearner):
  """The reference's single-machine learner: the fused step on a one-device mesh.

  If an estimator implements only the reference's host interface
  (``init_worker_state`` / ``compute_gradient_estimate``, no ``estimate_local``), the
  constructor returns a ``compat.HostSingleMachineGradientLearner`` instead (same
  ``init`` / ``update`` / ``get_lopt_params``), after a one-time warning.
  """

  def __new__(cls, meta_init, gradient_estimators, theta_opt, num_steps=None):
    if all(_host_api.has_fused_contract(e) for e in gradient_estimators):
      return super().__new__(cls)
    _host_api.warn_host_fallback(gradient_estimators)
    return _host_api.HostSingleMachineGradientLearner(meta_init, gradient_estimators,
                                                      theta_opt, num_steps=num_steps)

  def __init__(self, meta_init, gradient_estimators, theta_opt, num_steps=None):
    del num_steps  # the reference's argument; no outer optimizer here has a schedule
    super().__init__(meta_init, gradient_estimators, theta_opt,
                     mesh=sharding.make_mesh(num_devices=1))

  def get_lopt_params(self, state: SingleMachineState) -> MetaParams:
    """The reference's name for ``get_meta_params``."""
    return self.get_meta_params(state)
