"""The reference library's host-driven meta-training API.

``GradientLearner`` holds theta's outer-optimizer state; ``gradient_worker_compute`` runs
each estimator once (one call each, a host loop) and averages their gradients and losses
on the host as numpy; the learner averages the workers' ``AggregatedGradient``s and applies
one jitted ``theta_opt.update``. ``HostSingleMachineGradientLearner`` chains the two, as
the reference's ``SingleMachineGradientLearner`` does.

Estimators may be written to the package's fused contract (``init_local`` /
``estimate_local``) or to the reference's alone (``init_worker_state(worker_weights,
key)`` and ``compute_gradient_estimate(worker_weights, key, state, with_summary)``
returning ``(GradientEstimatorOut, metrics)``): this module only calls the latter.
``outer_trainers.gradient_learner.SingleMachineGradientLearner`` uses the fused step when
every estimator has the fused contract, and falls back to this host path (with a one-time
warning) when one does not.

Estimator ``i`` of a worker call gets the key ``fold_in(key, i)`` (the fused step's
schedule, so both paths agree; the reference splits the key instead).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Mapping, Optional, Sequence, Union

import flax
import jax
import jax.numpy as jnp
import numpy as np

from spmd_lopt import summary, tree_utils
from spmd_lopt.compat import state_files
from spmd_lopt.outer_trainers import estimator_base
from spmd_lopt.outer_trainers.estimator_base import OuterState, WorkerWeights

MetaParams = Any


@flax.struct.dataclass
class GradientLearnerState:
  theta_opt_state: Any


@flax.struct.dataclass
class AggregatedGradient:
  """A worker's contribution: theta-shaped ``theta_grads`` (numpy), the theta model
  state, and the mean meta-loss of its estimators."""
  theta_grads: MetaParams
  theta_model_state: Any
  mean_loss: Any


@flax.struct.dataclass
class WorkerComputeOut:
  to_put: AggregatedGradient
  unroll_states: Sequence[Any]
  metrics: Mapping[str, Any]
  event_info: Sequence[Any]


@flax.struct.dataclass
class ParameterCheckpoint:
  """The reference's theta file (``checkpoints.save_state(path, ParameterCheckpoint(...))``):
  theta, a generation id (population-based training) and the outer step."""
  params: MetaParams
  gen_id: str
  step: int


@flax.struct.dataclass
class OptCheckpoint:
  """The reference's outer-training checkpoint: the learner state and run counters."""
  gradient_learner_state: GradientLearnerState
  elapsed_time: Union[float, jax.Array]
  total_inner_steps: int


# --- estimators written to the reference's interface only --------------------------------

def has_fused_contract(estimator) -> bool:
  """Whether ``estimator`` implements the package's sharded ``init_local`` /
  ``estimate_local`` (then it can run inside the fused meta step)."""
  base = estimator_base.GradientEstimator
  cls = type(estimator)
  return (isinstance(estimator, base) and cls.estimate_local is not base.estimate_local
          and cls.init_local is not base.init_local)


_WARNED: set = set()


def warn_host_fallback(estimators) -> None:
  """One warning per estimator class that forces the host path."""
  for est in estimators:
    cls = type(est)
    if has_fused_contract(est) or cls in _WARNED:
      continue
    _WARNED.add(cls)
    warnings.warn(
        f"{cls.__name__} implements only the reference's init_worker_state/"
        "compute_gradient_estimate, not init_local/estimate_local: "
        "SingleMachineGradientLearner runs it outside the fused step (one host call per "
        "estimator, numpy averaging), which is slower and single-device.",
        RuntimeWarning, stacklevel=3)


def estimator_name(estimator) -> str:
  """Metric prefix of an estimator: its ``task_name()``, else its task family's name,
  else its class name."""
  try:
    return str(estimator.task_name())
  except (AttributeError, NotImplementedError, TypeError):
    pass
  family = getattr(estimator, "task_family", None)
  name = getattr(family, "name", None)
  return str(name) if name else type(estimator).__name__


def _nonfinite_count(grad, loss) -> int:
  count = int(not np.isfinite(np.asarray(loss, np.float64)).all())
  for g in jax.tree.leaves(grad):
    count += int(np.sum(~np.isfinite(np.asarray(g))))
  return count


def _to_numpy(tree):
  return jax.tree.map(np.asarray, tree)


# --- the worker -------------------------------------------------------------------------

def gradient_worker_compute(worker_weights: WorkerWeights,
                            gradient_estimators: Sequence[Any],
                            unroll_states: Sequence[Any], key, with_metrics: bool = False,
                            clip_nan_loss_to_value: float = 20.0, extra_metrics: bool = True,
                            device=None) -> WorkerComputeOut:
  """Run every estimator once and average: ``theta_grads = mean_i grad_i`` and
  ``mean_loss = mean_i loss_i`` over the ``E`` estimators, on the host (numpy).

  Non-finite gradient entries become 0 and a non-finite loss becomes
  ``clip_nan_loss_to_value``. With ``with_metrics``, each estimator's metrics
  (``"agg||name"``) are also recorded as ``"agg||<task>/name"``, plus
  ``mean||<task>/{mean_loss, grad_norm, grad_mean_abs, nonfinite}``, and the lists are
  merged by ``summary.aggregate_metric_list``.
  """
  if device is not None:
    worker_weights = jax.device_put(worker_weights, device)
  if len(unroll_states) != len(gradient_estimators):
    raise ValueError(f"{len(gradient_estimators)} estimators but {len(unroll_states)} "
                     "unroll states.")
  if not gradient_estimators:
    raise ValueError("gradient_worker_compute needs at least one gradient estimator.")
  grads_sum, losses, new_states, metrics_list = None, [], [], []
  for i, (est, state) in enumerate(zip(gradient_estimators, unroll_states)):
    out, est_metrics = est.compute_gradient_estimate(
        worker_weights, jax.random.fold_in(key, i), state, with_summary=with_metrics)
    est_metrics = dict(est_metrics or {})
    raw_grad = _to_numpy(out.grad)
    if "nonfinite" in est_metrics:
      nonfinite = int(est_metrics.pop("nonfinite"))
    else:
      nonfinite = _nonfinite_count(raw_grad, out.mean_loss)
    grad = jax.tree.map(lambda g: np.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0),
                        raw_grad)
    grads_sum = grad if grads_sum is None else jax.tree.map(np.add, grads_sum, grad)
    loss = float(np.asarray(out.mean_loss))
    losses.append(loss if np.isfinite(loss) else clip_nan_loss_to_value)
    new_states.append(out.unroll_state)
    if with_metrics:
      name = estimator_name(est)
      metrics = {}
      for k, v in est_metrics.items():
        agg, _, short = k.partition("||") if "||" in k else ("mean", "", k)
        metrics[f"{agg}||{short}"] = v
        metrics[f"{agg}||{name}/{short}"] = v
      metrics[f"mean||{name}/mean_loss"] = losses[-1]
      metrics[f"mean||{name}/nonfinite"] = nonfinite
      if extra_metrics:
        metrics[f"mean||{name}/grad_norm"] = float(tree_utils.tree_norm(grad))
        metrics[f"mean||{name}/grad_mean_abs"] = float(tree_utils.tree_mean_abs(grad))
      metrics_list.append(metrics)
  n = len(gradient_estimators)
  theta_grads = jax.tree.map(lambda g: g / n, grads_sum)
  to_put = AggregatedGradient(theta_grads=theta_grads,
                              theta_model_state=worker_weights.theta_model_state,
                              mean_loss=float(np.mean(losses)))
  metrics = summary.aggregate_metric_list(metrics_list) if with_metrics else {}
  return WorkerComputeOut(to_put=to_put, unroll_states=new_states, metrics=metrics,
                          event_info=[])


# --- the learner ------------------------------------------------------------------------

def _stack_mean(trees):
  return jax.tree.map(lambda *xs: np.mean(np.stack([np.asarray(x) for x in xs]), axis=0),
                      *trees)


@dataclasses.dataclass(eq=False)
class GradientLearner:
  """Holds theta's outer-optimizer state; ``update`` averages workers' gradients.

  Args:
    meta_init: the learned optimizer (``init(key) -> theta``).
    theta_opt: the outer optimizer.
    init_theta_from_path: start theta from a file instead of ``meta_init.init``: the
      reference's ``ParameterCheckpoint`` or bare-theta ``save_state`` files, or this
      package's ``learned_optimizers.checkpoint`` files (told apart by their content).
    init_outer_state_from_path: start the whole outer-optimizer state (theta, moments,
      iteration) from a reference ``OptCheckpoint`` file.
    reset_outer_iteration: with ``init_outer_state_from_path``, set the restored outer
      iteration back to 0 (theta and moments kept).
    num_steps: total outer steps, passed to ``theta_opt.init`` (for schedules).
    init_seed: if given, ``init`` ignores its key and uses ``jax.random.key(init_seed)``.
  """

  # The reference's constructor arguments, in its order (a dataclass: stored as given).
  meta_init: Any
  theta_opt: Any
  init_theta_from_path: Optional[str] = None
  init_outer_state_from_path: Optional[str] = None
  reset_outer_iteration: bool = False
  num_steps: Optional[int] = None
  init_seed: Optional[int] = None

  def __post_init__(self):
    self._jit_update = jax.jit(
        lambda s, g, l, ms: self.theta_opt.update(s, g, loss=l, model_state=ms))

  @property
  def learned_optimizer(self):
    return self.meta_init

  def _load_theta(self, theta_template):
    from spmd_lopt.learned_optimizers import checkpoint as lopt_checkpoint
    raw = state_files.load_state_dict(self.init_theta_from_path)
    if isinstance(raw, dict) and raw.get("magic") == lopt_checkpoint.MAGIC:
      return lopt_checkpoint.load_parameter_checkpoint(
          self.init_theta_from_path, expect=self.meta_init).theta
    if isinstance(raw, dict) and set(raw) == {"params", "gen_id", "step"}:
      template = ParameterCheckpoint(params=theta_template, gen_id="", step=0)
      return state_files.load_state(self.init_theta_from_path, template).params
    return state_files.load_state(self.init_theta_from_path, theta_template)

  def init(self, key) -> GradientLearnerState:
    if self.init_seed is not None:
      key = jax.random.key(self.init_seed)
    theta = self.meta_init.init(key)
    if self.init_theta_from_path:
      theta = jax.tree.map(jnp.asarray, self._load_theta(theta))
    opt_state = self.theta_opt.init(theta, None, num_steps=self.num_steps)
    if self.init_outer_state_from_path:
      template = OptCheckpoint(gradient_learner_state=GradientLearnerState(opt_state),
                               elapsed_time=0.0, total_inner_steps=0)
      restored = state_files.load_state(self.init_outer_state_from_path, template)
      opt_state = jax.tree.map(jnp.asarray,
                               restored.gradient_learner_state.theta_opt_state)
      if self.reset_outer_iteration:
        if not hasattr(opt_state, "iteration"):
          raise ValueError("reset_outer_iteration: the outer optimizer's state has no "
                           "'iteration' field.")
        opt_state = opt_state.replace(iteration=jnp.zeros_like(opt_state.iteration))
    return GradientLearnerState(opt_state)

  def get_lopt_params(self, state: GradientLearnerState) -> MetaParams:
    return self.theta_opt.get_params(state.theta_opt_state)

  get_meta_params = get_lopt_params

  def get_lopt_model_state(self, state: GradientLearnerState):
    return self.theta_opt.get_state(state.theta_opt_state)

  def get_state_for_worker(self, state: GradientLearnerState) -> WorkerWeights:
    return WorkerWeights(theta=self.get_lopt_params(state),
                         theta_model_state=self.get_lopt_model_state(state),
                         outer_state=OuterState(
                             outer_iteration=state.theta_opt_state.iteration))

  def update(self, state: GradientLearnerState, grads_list: Sequence[AggregatedGradient],
             with_metrics: bool = False, key=None):
    """``grad = mean(theta_grads)``, ``loss = mean(mean_loss)`` over ``grads_list``, one
    ``theta_opt.update``: ``-> (state, metrics)``."""
    del key  # the outer optimizers here are deterministic
    if not grads_list:
      raise ValueError("GradientLearner.update needs at least one AggregatedGradient.")
    grads = _stack_mean([g.theta_grads for g in grads_list])
    model_states = [g.theta_model_state for g in grads_list]
    model_state = None if all(m is None for m in model_states) else _stack_mean(model_states)
    losses = np.asarray([float(np.asarray(g.mean_loss)) for g in grads_list], np.float32)
    mean_loss = np.float32(np.mean(losses))
    new_opt_state = self._jit_update(state.theta_opt_state, grads, mean_loss, model_state)
    metrics = {"none||mean_loss": float(mean_loss),
               "none||best_of_mean_loss": float(np.min(losses))}
    if with_metrics:
      metrics["none||theta_grad_norm"] = float(tree_utils.tree_norm(grads))
      metrics["none||theta_grad_abs_mean"] = float(tree_utils.tree_mean_abs(grads))
    return GradientLearnerState(new_opt_state), metrics


class HostSingleMachineGradientLearner:
  """``GradientLearner`` + ``gradient_worker_compute`` on one machine, as the reference's
  ``SingleMachineGradientLearner``: ``update(state, key) -> (state, loss, metrics)``.

  ``init`` splits its key in two (theta; estimators), and estimator ``i`` starts from
  ``split(key_estimators, E)[i]``, as the reference does.
  """

  def __init__(self, meta_init, gradient_estimators, theta_opt,
               num_steps: Optional[int] = None):
    if not gradient_estimators:
      raise ValueError("SingleMachineGradientLearner needs at least one gradient estimator.")
    self.gradient_learner = GradientLearner(meta_init, theta_opt, num_steps=num_steps)
    self.gradient_estimators = tuple(gradient_estimators)
    self.theta_opt = theta_opt

  def init(self, key):
    from spmd_lopt.outer_trainers.gradient_learner import SingleMachineState
    k_theta, k_est = jax.random.split(key)
    gl_state = self.gradient_learner.init(k_theta)
    ww = self.gradient_learner.get_state_for_worker(gl_state)
    keys = jax.random.split(k_est, len(self.gradient_estimators))
    states = tuple(est.init_worker_state(ww, keys[i])
                   for i, est in enumerate(self.gradient_estimators))
    return SingleMachineState(gl_state, states)

  def update(self, state, key, with_metrics: bool = False):
    from spmd_lopt.outer_trainers.gradient_learner import SingleMachineState
    ww = self.gradient_learner.get_state_for_worker(state.gradient_learner_state)
    out = gradient_worker_compute(ww, self.gradient_estimators,
                                  state.gradient_estimator_states, key,
                                  with_metrics=with_metrics)
    gl_state, learner_metrics = self.gradient_learner.update(
        state.gradient_learner_state, [out.to_put], with_metrics=with_metrics, key=key)
    metrics = {**out.metrics, **learner_metrics} if with_metrics else learner_metrics
    return (SingleMachineState(gl_state, tuple(out.unroll_states)),
            jnp.asarray(out.to_put.mean_loss, jnp.float32), metrics)

  def get_lopt_params(self, state):
    return self.gradient_learner.get_lopt_params(state.gradient_learner_state)

  get_meta_params = get_lopt_params

  def get_state_for_worker(self, state):
    return self.gradient_learner.get_state_for_worker(state.gradient_learner_state)
