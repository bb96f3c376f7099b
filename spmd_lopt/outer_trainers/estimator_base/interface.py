"""The estimator interface: the data types estimators and learners exchange, and
``GradientEstimator`` (the sharded ``init_local`` / ``estimate_local`` core and the
reference's host API on top of it).

An estimator holds a slice of the task population and, per call, returns an estimate of
``d meta_loss / d theta`` averaged over its tasks. It is written once, for a *local* slice
of tasks given by their global indices, and runs in two settings:

- sharded: inside the learner's ``shard_map`` each device calls ``estimate_local`` on its
  slice; the learner averages the results over devices with ``pmean``;
- host API (the reference's ``compute_gradient_estimate``): ``estimate_local`` on all
  tasks at once, under ``jit``.

Because every random draw of task ``i`` is keyed by ``fold_in(key, i)``, both settings,
and any device count, give the same numbers up to float summation order.

One interface for every estimator::

    init_local(theta, outer_state, key, task_ids) -> state
    estimate_local(theta, state, key, task_ids, outer_state, data=None) -> LocalEstimate

``data`` is ``None`` (tasks draw their batches on device) or host-fed batches for the
slice, leaves ``[unroll_length, len(task_ids), ...]`` (what ``get_host_data`` draws from
a family whose ``datasets`` are the reference's host iterators).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import flax
import jax
import jax.numpy as jnp

from spmd_lopt.tasks import datasets_base

MetaParams = Any


@flax.struct.dataclass
class OuterState:
  """What the inner loop may know of the outer loop: the outer iteration (int32)."""
  outer_iteration: jax.Array


@flax.struct.dataclass
class WorkerWeights:
  theta: MetaParams
  theta_model_state: Any
  outer_state: OuterState


@flax.struct.dataclass
class UnrollInfo:
  loss: jax.Array
  iteration: jax.Array
  task_param: Any
  is_done: jax.Array


@flax.struct.dataclass
class GradientEstimatorOut:
  mean_loss: jax.Array
  grad: MetaParams
  unroll_state: Any
  unroll_info: Optional[UnrollInfo]


@flax.struct.dataclass
class LocalEstimate:
  """One estimator's result on a slice of ``n`` tasks.

  grad: mean over the slice of the per-task estimates (theta-shaped). loss: mean over the
  slice of the per-task meta-losses (scalar). nonfinite: number of *tasks* whose loss or
  gradient had a non-finite value (int32). nonfinite_entries: number of non-finite
  entries replaced (loss plus gradient entries; one diverged task can give thousands).
  state: the slice's next state. unroll_info: per-step outputs ``[steps, n]``, for the
  host API and debugging.
  """
  grad: MetaParams
  loss: jax.Array
  nonfinite: jax.Array
  state: Any
  unroll_info: Any
  nonfinite_entries: jax.Array = 0


def has_host_datasets(truncated_step) -> bool:
  """Whether the step's tasks read the reference's host iterators (``datasets`` is a
  ``datasets_base.Datasets``): their batches must be drawn on the host (``get_batch``)."""
  family = getattr(truncated_step, "task_family", None)
  return isinstance(getattr(family, "datasets", None), datasets_base.Datasets)


class GradientEstimator:
  """Base class. Subclasses implement ``init_local`` and ``estimate_local``."""

  truncated_step: Any
  clip_nan_loss_to_value: float = 20.0

  @property
  def num_tasks(self) -> int:
    return self.truncated_step.num_tasks

  def task_name(self) -> str:
    step = getattr(self, "truncated_step", None)
    return step.task_name() if step is not None else "unnamed_task"

  def cfg_name(self) -> str:
    step = getattr(self, "truncated_step", None)
    return step.cfg_name() if step is not None else "unnamed_cfg"

  # --- the sharded core -------------------------------------------------------------

  def init_local(self, theta, outer_state: OuterState, key, task_ids) -> Any:
    raise NotImplementedError

  def estimate_local(self, theta, state, key, task_ids, outer_state: OuterState,
                     data=None) -> LocalEstimate:
    """``data``: ``None`` (tasks draw batches on device) or host-fed batches for the slice,
    leaves ``[unroll_length, len(task_ids), ...]`` (see ``get_host_data``)."""
    raise NotImplementedError

  # --- the reference's host API -----------------------------------------------------

  def init_worker_state(self, worker_weights: WorkerWeights, key):
    """Fresh state for all ``num_tasks`` tasks (unsharded)."""
    if not hasattr(self, "_jit_init"):
      self._jit_init = jax.jit(
          lambda th, os, k: self.init_local(th, os, k, jnp.arange(self.num_tasks)))
    return self._jit_init(worker_weights.theta, worker_weights.outer_state, key)

  def host_data_steps(self) -> int:
    """Inner steps per call, hence batches per task of host-fed data."""
    raise NotImplementedError

  def get_host_data(self):
    """One call's host-fed batches for a task family with host iterators (the reference's
    data model), drawn on the host: ``truncated_step.get_batch(host_data_steps())``."""
    return self.truncated_step.get_batch(self.host_data_steps())

  def compute_gradient_estimate(self, worker_weights: WorkerWeights, key, state,
                                with_summary: bool = False, datas_list=None
                                ) -> tuple[GradientEstimatorOut, Mapping[str, jax.Array]]:
    """One estimate over all tasks: ``(GradientEstimatorOut, metrics)``.

    ``datas_list``: optional host-fed batches, leaves ``[unroll_length, num_tasks, ...]``.
    Without it, tasks whose family has host iterators get theirs from ``get_host_data``
    (as the reference draws them inside this call); other tasks sample on device.
    """
    del with_summary  # summaries come back as metrics
    if datas_list is None and has_host_datasets(getattr(self, "truncated_step", None)):
      datas_list = self.get_host_data()
    if not hasattr(self, "_jit_estimate"):
      def estimate(th, s, k, os, data):
        return self.estimate_local(th, s, k, jnp.arange(self.num_tasks), os, data=data)
      self._jit_estimate = jax.jit(estimate)
    est = self._jit_estimate(worker_weights.theta, state, key, worker_weights.outer_state,
                             datas_list)
    out = GradientEstimatorOut(mean_loss=est.loss, grad=est.grad, unroll_state=est.state,
                               unroll_info=est.unroll_info)
    return out, {"nonfinite": est.nonfinite, "nonfinite_entries": est.nonfinite_entries}
