"""Learners: apply averaged meta-gradients to theta with an outer optimizer.

``SpmdGradientLearner`` is the fused design. One ``jax.jit``-compiled program per call:

1. inside one ``jax.shard_map`` over the mesh axis ``axis_name``, every device runs every
   estimator on its slice of that estimator's tasks (global indices, see
   ``spmd_lopt.sharding``);
2. per estimator, the meta-gradient and meta-loss are averaged over devices with
   ``lax.pmean`` (non-finite per-task values were already replaced, and counted);
3. ``grad = mean over estimators``, ``loss = mean over estimators`` (the reference's
   aggregation), then the replicated outer-optimizer update ``theta_opt.update``.

The old state is donated. Metrics come back as one pytree of device scalars; nothing is
copied to the host inside the step.

``SingleMachineGradientLearner`` is the same learner on a one-device mesh, with the
reference's signature. ``GradientLearner`` + ``gradient_worker_compute`` keep the
reference's host-driven API (per-estimator jitted calls, numpy aggregation on the host),
for users who drive workers by hand and as the benchmark's baseline.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from spmd_lopt import sharding
from spmd_lopt.learned_optimizers import base as lopt_base
from spmd_lopt.optimizers import base as opt_base
from spmd_lopt.outer_trainers import estimator_base
# Re-exported so reference scripts find them where they used to be.
from spmd_lopt.outer_trainers.estimator_base import (  # noqa: F401
    GradientEstimator, GradientEstimatorOut, OuterState, UnrollInfo, WorkerWeights)

MetaParams = Any


@flax.struct.dataclass
class GradientLearnerState:
  theta_opt_state: Any


@flax.struct.dataclass
class SingleMachineState:
  """The learner's whole state: replicated ``gradient_learner_state`` and one task-sharded
  state per estimator (``gradient_estimator_states``, a tuple)."""
  gradient_learner_state: GradientLearnerState
  gradient_estimator_states: tuple


SpmdLearnerState = SingleMachineState


@flax.struct.dataclass
class AggregatedGradient:
  theta_grads: MetaParams
  theta_model_state: Any
  mean_loss: Any


@flax.struct.dataclass
class WorkerComputeOut:
  to_put: AggregatedGradient
  unroll_states: Sequence[Any]
  metrics: Mapping[str, Any]
  event_info: Sequence[Any]


def _metric_names(estimators) -> list[str]:
  """One unique metric prefix per estimator: its task name, suffixed on collisions."""
  names, seen = [], {}
  for est in estimators:
    base = est.task_name()
    seen[base] = seen.get(base, 0) + 1
    names.append(base if seen[base] == 1 else f"{base}_{seen[base] - 1}")
  return names


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
    num_steps: total outer steps, passed to ``theta_opt.init`` (for schedules).
  """

  def __init__(self, meta_init: lopt_base.LearnedOptimizer,
               gradient_estimators: Sequence[estimator_base.GradientEstimator],
               theta_opt: opt_base.Optimizer, mesh: Optional[jax.sharding.Mesh] = None,
               axis_name: str = sharding.DEFAULT_AXIS, num_steps: Optional[int] = None):
    if not gradient_estimators:
      raise ValueError("SpmdGradientLearner needs at least one gradient estimator.")
    self.meta_init = meta_init
    self.gradient_estimators = tuple(gradient_estimators)
    self.theta_opt = theta_opt
    self.axis_name = axis_name
    self.mesh = mesh if mesh is not None else sharding.make_mesh(axis_name)
    self.num_steps = num_steps
    self._num_local = tuple(
        sharding.check_divisible(est.num_tasks, self.mesh, axis_name,
                                 f"estimator {i} ({est.task_name()})")
        for i, est in enumerate(self.gradient_estimators))
    self.metric_names = _metric_names(self.gradient_estimators)
    self._jit_init = None
    self._jit_update = {}
    self._jit_update_many = {}

  # --- state layout -----------------------------------------------------------------

  def _init_fn(self, key):
    k_theta, k_est = jax.random.split(key)
    theta = self.meta_init.init(k_theta)
    opt_state = self.theta_opt.init(theta, num_steps=self.num_steps)
    ax = self.axis_name

    def body(theta, key, outer_iteration):
      outer_state = OuterState(outer_iteration=outer_iteration)
      return tuple(
          est.init_local(theta, outer_state, jax.random.fold_in(key, i),
                         sharding.local_task_ids(n, ax))
          for i, (est, n) in enumerate(zip(self.gradient_estimators, self._num_local)))

    est_states = jax.shard_map(body, mesh=self.mesh, in_specs=(P(), P(), P()),
                               out_specs=P(ax))(theta, k_est, opt_state.iteration)
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
    return jax.eval_shape(self._init_fn, jax.random.key(0))

  # --- the reference API ------------------------------------------------------------

  def init(self, key) -> SingleMachineState:
    if self._jit_init is None:
      self._jit_init = jax.jit(self._init_fn, out_shardings=self.state_shardings())
    return self._jit_init(sharding.replicate(key, self.mesh))

  def get_meta_params(self, state: SingleMachineState) -> MetaParams:
    return self.theta_opt.get_params(state.gradient_learner_state.theta_opt_state)

  def get_state_for_worker(self, state: SingleMachineState) -> WorkerWeights:
    opt_state = state.gradient_learner_state.theta_opt_state
    return WorkerWeights(theta=self.theta_opt.get_params(opt_state), theta_model_state=None,
                         outer_state=OuterState(outer_iteration=opt_state.iteration))

  def _estimate(self, state: SingleMachineState, key, datas=None):
    """The sharded half of a meta step: every estimator on every device, reduced.

    Returns ``(new_estimator_states, grads per estimator, losses[E], nonfinite[E, 2])``
    (non-finite tasks and entries).
    """
    datas = self._check_datas(datas)
    opt_state = state.gradient_learner_state.theta_opt_state
    theta = self.theta_opt.get_params(opt_state)
    ax = self.axis_name

    def body(theta, est_states, key, outer_iteration, datas):
      outer_state = OuterState(outer_iteration=outer_iteration)
      new_states, grads, losses, nonfinite = [], [], [], []
      for i, (est, n) in enumerate(zip(self.gradient_estimators, self._num_local)):
        res = est.estimate_local(theta, est_states[i], jax.random.fold_in(key, i),
                                 sharding.local_task_ids(n, ax), outer_state, data=datas[i])
        new_states.append(res.state)
        grads.append(jax.lax.pmean(res.grad, ax))
        losses.append(jax.lax.pmean(res.loss, ax))
        # [tasks, entries] with non-finite values, summed over the mesh.
        nonfinite.append(jax.lax.psum(jnp.stack([res.nonfinite, res.nonfinite_entries]), ax))
      return tuple(new_states), tuple(grads), jnp.stack(losses), jnp.stack(nonfinite)

    return jax.shard_map(
        body, mesh=self.mesh, in_specs=(P(), P(ax), P(), P(), P(None, ax)),
        out_specs=(P(ax), P(), P(), P()))(theta, state.gradient_estimator_states, key,
                                          opt_state.iteration, datas)

  def _check_datas(self, datas):
    """Host-fed batches: ``None`` or one entry per estimator (``None`` = draw on device),
    leaves ``[unroll_length, num_tasks, ...]``, sharded over tasks by ``shard_datas``."""
    if datas is None:
      return (None,) * len(self.gradient_estimators)
    if len(datas) != len(self.gradient_estimators):
      raise ValueError(f"datas has {len(datas)} entries for "
                       f"{len(self.gradient_estimators)} estimators.")
    for est, d in zip(self.gradient_estimators, datas):
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
      def fn(state, key):
        _, grads, losses, _ = self._estimate(state, key)
        return jax.tree.map(lambda *g: sum(g) / len(g), *grads), jnp.mean(losses)
      self._jit_meta_gradient = jax.jit(fn)
    return self._jit_meta_gradient(state, sharding.replicate(key, self.mesh))

  def _step(self, state: SingleMachineState, key, with_metrics: bool, datas=None):
    opt_state = state.gradient_learner_state.theta_opt_state
    theta = self.theta_opt.get_params(opt_state)
    new_states, grads, losses, nonfinite = self._estimate(state, key, datas)
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

    ``datas`` (optional): host-fed batches, one entry per estimator (see ``shard_datas``);
    by default every task draws its batches on device.
    """
    return self._update_fn(with_metrics)(state, sharding.replicate(key, self.mesh), datas)

  def _update_fn(self, with_metrics: bool):
    if with_metrics not in self._jit_update:
      self._jit_update[with_metrics] = jax.jit(
          lambda s, k, d: self._step(s, k, with_metrics, d), donate_argnums=(0,))
    return self._jit_update[with_metrics]

  def lower_update(self, state: SingleMachineState, key, steps_per_call: int = 1,
                   with_metrics: bool = False):
    """The ``jax.stages.Lowered`` meta step that ``update`` (or ``update_many`` with
    ``steps_per_call`` steps) runs, for ``.compile().cost_analysis()`` /
    ``memory_analysis()`` / ``as_text()``. Uses the same jitted function, so after a first
    ``update`` the compile is a cache hit. Does not consume ``state``."""
    key = sharding.replicate(key, self.mesh)
    if steps_per_call == 1:
      return self._update_fn(with_metrics).lower(state, key, None)
    return self._update_many_fn(steps_per_call, with_metrics).lower(state, key)

  def update_many(self, state: SingleMachineState, key, num_steps: int,
                  with_metrics: bool = False):
    """``num_steps`` meta steps in one dispatch (a ``lax.scan`` over ``update``).

    Equivalent to calling ``update`` with the keys ``jax.random.split(key, num_steps)`` in
    turn; returns ``(state, losses[num_steps], metrics with a leading [num_steps] axis)``.
    """
    return self._update_many_fn(num_steps, with_metrics)(
        state, sharding.replicate(key, self.mesh))

  def _update_many_fn(self, num_steps: int, with_metrics: bool):
    cache_key = (num_steps, with_metrics)
    if cache_key not in self._jit_update_many:
      def many(state, key):
        def body(s, k):
          s, loss, m = self._step(s, k, with_metrics)
          return s, (loss, m)
        state, (losses, metrics) = jax.lax.scan(body, state, jax.random.split(key, num_steps))
        return state, losses, metrics
      self._jit_update_many[cache_key] = jax.jit(many, donate_argnums=(0,))
    return self._jit_update_many[cache_key]


class SingleMachineGradientLearner(SpmdGradientLearner):
  """The reference's single-machine learner: the fused step on a one-device mesh."""

  def __init__(self, meta_init, gradient_estimators, theta_opt, num_steps=None):
    super().__init__(meta_init, gradient_estimators, theta_opt,
                     mesh=sharding.make_mesh(num_devices=1), num_steps=num_steps)


class GradientLearner:
  """The reference's host-side learner: holds theta's optimizer state; ``update`` averages
  worker gradients on the host (numpy) and applies one jitted ``theta_opt.update``."""

  def __init__(self, meta_init: lopt_base.LearnedOptimizer, theta_opt: opt_base.Optimizer,
               init_theta_from_path: Optional[str] = None,
               reset_outer_iteration: bool = False, num_steps: Optional[int] = None,
               init_seed: Optional[int] = None):
    self.meta_init = meta_init
    self.theta_opt = theta_opt
    self.init_theta_from_path = init_theta_from_path
    self.reset_outer_iteration = reset_outer_iteration
    self.num_steps = num_steps
    self.init_seed = init_seed
    self._jit_update = jax.jit(
        lambda s, g, l: self.theta_opt.update(s, g, loss=l))

  def init(self, key) -> GradientLearnerState:
    if self.init_seed is not None:
      key = jax.random.key(self.init_seed)
    theta = self.meta_init.init(key)
    if self.init_theta_from_path:
      from spmd_lopt.learned_optimizers import checkpoint as lopt_checkpoint
      theta = lopt_checkpoint.load_parameter_checkpoint(
          self.init_theta_from_path, expect=self.meta_init).theta
    return GradientLearnerState(self.theta_opt.init(theta, num_steps=self.num_steps))

  def get_meta_params(self, state: GradientLearnerState) -> MetaParams:
    return self.theta_opt.get_params(state.theta_opt_state)

  def get_state_for_worker(self, state: GradientLearnerState) -> WorkerWeights:
    return WorkerWeights(theta=self.get_meta_params(state), theta_model_state=None,
                         outer_state=OuterState(
                             outer_iteration=state.theta_opt_state.iteration))

  def update(self, state: GradientLearnerState, grads_list: Sequence[AggregatedGradient],
             with_metrics: bool = False, key=None):
    """Average ``grads_list`` on the host and step theta: ``-> (state, metrics)``."""
    del key
    if not grads_list:
      raise ValueError("GradientLearner.update needs at least one AggregatedGradient.")
    grads = jax.tree.map(lambda *g: np.mean(np.stack([np.asarray(x) for x in g]), axis=0),
                         *[g.theta_grads for g in grads_list])
    losses = np.asarray([float(g.mean_loss) for g in grads_list])
    mean_loss = np.float32(np.mean(losses))
    new_opt_state = self._jit_update(state.theta_opt_state, grads, mean_loss)
    metrics = {}
    if with_metrics:
      metrics = {"none||mean_loss": float(mean_loss),
                 "none||best_of_mean_loss": float(np.min(losses)),
                 "none||theta_grad_norm": float(optax.tree.norm(grads))}
    return GradientLearnerState(new_opt_state), metrics


def gradient_worker_compute(worker_weights: WorkerWeights,
                            gradient_estimators: Sequence[estimator_base.GradientEstimator],
                            unroll_states: Sequence[Any], key, with_metrics: bool = False,
                            clip_nan_loss_to_value: float = 20.0, extra_metrics: bool = True,
                            device=None) -> WorkerComputeOut:
  """The reference's worker: run each estimator (one jitted call each, a host loop),
  average their gradients and losses on the host as numpy.

  Estimator ``i`` gets ``fold_in(key, i)``, as in the fused step, so both paths give the
  same numbers.
  """
  del extra_metrics, device
  if len(unroll_states) != len(gradient_estimators):
    raise ValueError(f"{len(gradient_estimators)} estimators but {len(unroll_states)} "
                     "unroll states.")
  grads_sum, losses, new_states, metrics = None, [], [], {}
  for i, (est, state) in enumerate(zip(gradient_estimators, unroll_states)):
    out, est_metrics = est.compute_gradient_estimate(
        worker_weights, jax.random.fold_in(key, i), state, with_summary=with_metrics)
    grad = jax.tree.map(lambda g: np.nan_to_num(np.asarray(g), nan=0.0, posinf=0.0,
                                                neginf=0.0), out.grad)
    grads_sum = grad if grads_sum is None else jax.tree.map(np.add, grads_sum, grad)
    loss = float(out.mean_loss)
    losses.append(clip_nan_loss_to_value if not np.isfinite(loss) else loss)
    new_states.append(out.unroll_state)
    if with_metrics:
      metrics[f"mean||{est.task_name()}/mean_loss"] = losses[-1]
      metrics[f"mean||{est.task_name()}/nonfinite"] = int(est_metrics["nonfinite"])
  theta_grads = jax.tree.map(lambda g: g / len(gradient_estimators), grads_sum)
  mean_loss = float(np.mean(losses))
  to_put = AggregatedGradient(theta_grads=theta_grads, theta_model_state=None,
                              mean_loss=mean_loss)
  return WorkerComputeOut(to_put=to_put, unroll_states=new_states, metrics=metrics,
                          event_info=[])
