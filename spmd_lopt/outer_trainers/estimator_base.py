"""Data types shared by gradient estimators and learners, and the ``GradientEstimator``
interface.

An estimator holds a slice of the task population and, per call, returns an estimate of
``d meta_loss / d theta`` averaged over its tasks. It is written once, for a *local* slice
of tasks given by their global indices, and runs in two settings:

- sharded: inside the learner's ``shard_map`` each device calls ``estimate_local`` on its
  slice; the learner averages the results over devices with ``pmean``;
- host API (the reference's ``compute_gradient_estimate``): ``estimate_local`` on all
  tasks at once, under ``jit``.

Because every random draw of task ``i`` is keyed by ``fold_in(key, i)``, both settings,
and any device count, give the same numbers up to float summation order.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import flax
import jax
import jax.numpy as jnp

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
  slice of the per-task meta-losses (scalar). nonfinite: number of non-finite entries
  (loss or gradient) replaced in the slice. state: the slice's next state.
  unroll_info: per-step outputs ``[steps, n]``, for the host API and debugging.
  """
  grad: MetaParams
  loss: jax.Array
  nonfinite: jax.Array
  state: Any
  unroll_info: Any


def sanitize_per_task(grads: MetaParams, losses: jax.Array, clip_nan_loss_to_value: float):
  """Replace non-finite per-task values so one diverged task cannot poison theta.

  grads: leaves ``[n, ...]``; losses: ``[n]``. Non-finite gradient entries become 0, a
  non-finite loss becomes ``clip_nan_loss_to_value``. Returns the cleaned values and the
  count of replaced entries (int32 scalar).
  """
  count = jnp.sum(~jnp.isfinite(losses)).astype(jnp.int32)
  for g in jax.tree.leaves(grads):
    count = count + jnp.sum(~jnp.isfinite(g)).astype(jnp.int32)
  grads = jax.tree.map(lambda g: jnp.where(jnp.isfinite(g), g, 0.0), grads)
  losses = jnp.where(jnp.isfinite(losses), losses, clip_nan_loss_to_value)
  return grads, losses, count


class GradientEstimator:
  """Base class. Subclasses implement ``init_local`` and ``estimate_local``."""

  truncated_step: Any
  clip_nan_loss_to_value: float = 20.0

  @property
  def num_tasks(self) -> int:
    return self.truncated_step.num_tasks

  def task_name(self) -> str:
    return self.truncated_step.task_name()

  def cfg_name(self) -> str:
    return type(self).__name__

  # --- the sharded core -------------------------------------------------------------

  def init_local(self, theta, outer_state: OuterState, key, task_ids) -> Any:
    raise NotImplementedError

  def estimate_local(self, theta, state, key, task_ids, outer_state: OuterState,
                     data=None) -> LocalEstimate:
    """``data``: ``None`` (tasks draw batches on device) or host-fed batches for the slice,
    leaves ``[unroll_length, len(task_ids), ...]``. Estimators that do not take host-fed
    data may omit the argument."""
    raise NotImplementedError

  # --- the reference's host API -----------------------------------------------------

  def init_worker_state(self, worker_weights: WorkerWeights, key):
    """Fresh state for all ``num_tasks`` tasks (unsharded)."""
    if not hasattr(self, "_jit_init"):
      self._jit_init = jax.jit(
          lambda th, os, k: self.init_local(th, os, k, jnp.arange(self.num_tasks)))
    return self._jit_init(worker_weights.theta, worker_weights.outer_state, key)

  def compute_gradient_estimate(self, worker_weights: WorkerWeights, key, state,
                                with_summary: bool = False, datas_list=None
                                ) -> tuple[GradientEstimatorOut, Mapping[str, jax.Array]]:
    """One estimate over all tasks: ``(GradientEstimatorOut, metrics)``.

    ``datas_list``: optional host-fed batches, leaves ``[unroll_length, num_tasks, ...]``.
    """
    del with_summary  # summaries come back as metrics
    if not hasattr(self, "_jit_estimate"):
      def estimate(th, s, k, os, data):
        kwargs = {} if data is None else {"data": data}
        return self.estimate_local(th, s, k, jnp.arange(self.num_tasks), os, **kwargs)
      self._jit_estimate = jax.jit(estimate)
    est = self._jit_estimate(worker_weights.theta, state, key, worker_weights.outer_state,
                             datas_list)
    out = GradientEstimatorOut(mean_loss=est.loss, grad=est.grad, unroll_state=est.state,
                               unroll_info=est.unroll_info)
    return out, {"nonfinite": est.nonfinite}
