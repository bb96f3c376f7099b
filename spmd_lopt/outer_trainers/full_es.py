"""Full-length antithetic Evolution Strategies (the reference's ``FullES``).

Every call starts each task ``i`` from a fresh inner problem (new task, new params) and
unrolls it *whole*, twice: with ``theta + eps_i`` and ``theta - eps_i``, ``eps_i ~ N(0,
std^2 I)``, both from the same initial state and the same per-step keys. With ``L+_i,
L-_i`` the meta-losses of the two unrolls (``loss_type``)::

    g_i  = (L+_i - L-_i) / (2 std^2) * eps_i
    grad = mean_i g_i                      (unbiased for grad of E[L] under smoothing)

loss_type:
  "avg"   mean of the per-step meta-losses over the unroll;
  "min"   their minimum;
  "last"  the meta-loss of the last step;
  "last_recompute"  the loss of the final inner params averaged over ``recompute_samples``
          fresh batches of ``recompute_split`` (then ``task.normalizer``); needs a
          ``VectorizedLOptTruncatedStep`` (it reads the task family and optimizer).

Options on the loss difference ``D_i = L+_i - L-_i``: ``clip_loss_diff = c`` clips it to
``[-c, c]``; ``sign_delta_loss_scalar = c`` replaces it with ``c * sign(D_i)``.

Unroll length. It comes from ``truncation_schedule`` (one length per call, drawn from the
replicated key, shared by all tasks as in the reference). Inside one jitted program the
scan length must be static, so the scan always has ``truncation_schedule.max_length``
steps, in chunks of ``steps_per_jit``; the sampled length is rounded up to whole chunks and
chunks past it are skipped with ``lax.cond`` (outputs masked). So a Constant schedule runs
exactly its length, a variable one compiles once and pays only for the sampled length
(memory for the per-step outputs is ``max_length x tasks`` scalars). The alternative,
recompiling per sampled length, would break the one-program-per-meta-step design.

The truncated step must use ``NeverEndingTruncationSchedule`` (as in the reference): this
estimator decides when a trajectory ends; a reset inside the unroll would silently mix two
tasks into one "whole" trajectory.
"""

from __future__ import annotations

from typing import Optional

import flax
import jax
import jax.numpy as jnp

from spmd_lopt.outer_trainers import common
from spmd_lopt.outer_trainers import estimator_base
from spmd_lopt.outer_trainers import truncated_step as truncated_step_lib

LOSS_TYPES = ("avg", "min", "last", "last_recompute")


@flax.struct.dataclass
class FullUnrollWorkerState:
  """Whole-unroll estimators keep nothing between calls (each starts fresh tasks)."""


def reduce_unroll_loss(loss: jax.Array, mask: jax.Array, num_active, loss_type: str):
  """Per-task meta-loss of a whole unroll: ``[T, n] -> [n]`` (see module docstring)."""
  if loss_type == "avg":
    return common.masked_mean_over_steps(loss, mask)
  if loss_type == "min":
    return jnp.min(jnp.where(mask, loss, jnp.inf), axis=0)
  if loss_type == "last":
    return jax.lax.dynamic_index_in_dim(loss, num_active - 1, axis=0, keepdims=False)
  raise ValueError(f"no per-step reduction for loss_type {loss_type!r}")


class FullES(estimator_base.GradientEstimator):
  """Antithetic ES over whole unrolls (see module docstring for the math and options).

  Args:
    truncated_step: a ``VectorizedTruncatedStep`` built with
      ``NeverEndingTruncationSchedule``.
    truncation_schedule: gives the unroll length per call (finite ``max_length``).
    std: perturbation scale. steps_per_jit: chunk size of the scan (must divide
      ``truncation_schedule.max_length``). stack_antithetic_samples: run ``+`` and ``-``
      as one batch of ``2n`` tasks (one scan) instead of two scans.
  """

  def __init__(self, truncated_step, truncation_schedule, std: float = 0.01,
               steps_per_jit: Optional[int] = 10, loss_type: str = "avg",
               recompute_samples: int = 50, recompute_split: str = "train",
               clip_loss_diff: Optional[float] = None,
               stack_antithetic_samples: bool = True,
               sign_delta_loss_scalar: Optional[float] = None,
               clip_nan_loss_to_value: float = 20.0):
    if not isinstance(truncated_step, truncated_step_lib.VectorizedTruncatedStep):
      raise TypeError("FullES: truncated_step must be a VectorizedTruncatedStep, got "
                      f"{type(truncated_step).__name__}.")
    common.check_never_ending("FullES", truncated_step)
    if loss_type not in LOSS_TYPES:
      raise ValueError(f"FullES: loss_type must be one of {LOSS_TYPES}, got {loss_type!r}.")
    if not std > 0:
      raise ValueError(f"FullES: std must be positive, got {std!r}.")
    if loss_type == "last_recompute":
      if int(recompute_samples) != recompute_samples or recompute_samples <= 0:
        raise ValueError("FullES: recompute_samples must be a positive integer, got "
                         f"{recompute_samples!r}.")
      if not (hasattr(truncated_step, "task_family")
              and hasattr(truncated_step, "learned_opt")):
        raise ValueError("FullES(loss_type='last_recompute') needs a truncated step with "
                         "task_family and learned_opt (VectorizedLOptTruncatedStep).")
    self.truncated_step = truncated_step
    self.truncation_schedule = truncation_schedule
    self.max_length, self.steps_per_jit = common.whole_unroll_lengths(
        "FullES", truncation_schedule, steps_per_jit)
    self.std = float(std)
    self.loss_type = loss_type
    self.recompute_samples = int(recompute_samples)
    self.recompute_split = recompute_split
    self.clip_loss_diff = clip_loss_diff
    self.stack_antithetic_samples = bool(stack_antithetic_samples)
    self.sign_delta_loss_scalar = sign_delta_loss_scalar
    self.clip_nan_loss_to_value = float(clip_nan_loss_to_value)

  def init_local(self, theta, outer_state, key, task_ids):
    del theta, outer_state, key, task_ids
    return FullUnrollWorkerState()

  # --- pieces, also used by tests for the exact meta-loss -----------------------------

  def unroll_fresh(self, theta_vec, key, task_ids, outer_state, num_active):
    """Fresh tasks (keyed by ``key``'s init half) unrolled ``max_length`` steps with the
    per-task thetas ``theta_vec`` ([n, ...]); chunks from ``num_active`` on are skipped.
    Returns ``(final_state, TruncatedUnrollOut [max_length, n])``; the mask is 0 on skipped
    steps. Tasks whose ids repeat get identical initial states (antithetic pairs)."""
    k_init, k_unroll = jax.random.split(key)
    step = self.truncated_step
    state = step.init_step_state(theta_vec, outer_state, k_init, theta_is_vector=True,
                                 task_ids=task_ids)
    return common.unroll_in_chunks(step, theta_vec, state, k_unroll, self.max_length,
                                   outer_state, task_ids, theta_is_vector=True,
                                   steps_per_chunk=self.steps_per_jit,
                                   num_active=num_active)

  def per_task_loss(self, theta_vec, key, task_ids, outer_state, num_active):
    """Per-task meta-loss ``[n]`` of whole fresh unrolls under ``theta_vec``."""
    k_unroll, k_recompute = jax.random.split(key)
    state, out = self.unroll_fresh(theta_vec, k_unroll, task_ids, outer_state, num_active)
    if self.loss_type == "last_recompute":
      return self._recompute_loss(theta_vec, state, k_recompute, task_ids), out
    return reduce_unroll_loss(out.loss, out.mask, num_active, self.loss_type), out

  def _recompute_loss(self, theta_vec, state, key, task_ids):
    """Loss of each task's final params, averaged over ``recompute_samples`` batches
    (``lax.map`` over batches: memory of one batch), then normalised: ``[n]``."""
    step = self.truncated_step

    def one(theta, st, k):
      opt = step.learned_opt.opt_fn(theta, is_training=True)
      params, model_state = opt.get_params_state(st.inner_opt_state)
      task = step.task_family.task_fn(st.task_param)

      def sample(k_s):
        k_data, k_loss = jax.random.split(k_s)
        batch = task.sample_batch(k_data, self.recompute_split)
        return task.loss_with_state(params, model_state, k_loss, batch)[0]

      losses = jax.lax.map(sample, jax.random.split(k, self.recompute_samples))
      return task.normalizer(jnp.mean(losses))

    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(task_ids)
    return jax.vmap(one)(theta_vec, state, keys)

  def sample_num_active(self, key, outer_state):
    return common.sample_num_active(self.truncation_schedule, key, outer_state,
                                    self.steps_per_jit, self.max_length)

  # --- the estimator ---------------------------------------------------------------

  def estimate_local(self, theta, state, key, task_ids, outer_state):
    del state
    k_noise, k_len, k_run = jax.random.split(key, 3)
    num_active = self.sample_num_active(k_len, outer_state)
    eps = common.per_task_noise(k_noise, task_ids, theta, self.std)
    pos_theta = common.add_per_task(theta, eps, +1.0)
    neg_theta = common.add_per_task(theta, eps, -1.0)
    run = lambda th, ids: self.per_task_loss(th, k_run, ids, outer_state, num_active)
    n = task_ids.shape[0]
    if self.stack_antithetic_samples:
      # Same ids twice: both halves get the same fresh tasks and the same step keys.
      both, out = run(common.concat_tasks(pos_theta, neg_theta),
                      jnp.concatenate([task_ids, task_ids]))
      pos_loss, neg_loss = both[:n], both[n:]
      p_out = jax.tree.map(lambda x: x[:, :n], out)
    else:
      pos_loss, p_out = run(pos_theta, task_ids)
      neg_loss, _ = run(neg_theta, task_ids)

    delta = pos_loss - neg_loss
    if self.clip_loss_diff is not None:
      delta = jnp.clip(delta, -self.clip_loss_diff, self.clip_loss_diff)
    if self.sign_delta_loss_scalar is not None:
      delta = jnp.sign(delta) * self.sign_delta_loss_scalar
    grads = common.scale_per_task(delta / (2.0 * self.std ** 2), eps)
    grads, losses, nonfinite = estimator_base.sanitize_per_task(
        grads, 0.5 * (pos_loss + neg_loss), self.clip_nan_loss_to_value)
    info = estimator_base.UnrollInfo(loss=p_out.loss, iteration=p_out.iteration,
                                     task_param=p_out.task_param, is_done=p_out.is_done)
    return estimator_base.LocalEstimate(
        grad=jax.tree.map(lambda g: jnp.mean(g, axis=0), grads), loss=jnp.mean(losses),
        nonfinite=nonfinite, state=FullUnrollWorkerState(), unroll_info=info)
