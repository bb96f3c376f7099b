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
replicated key, shared by all tasks as in the reference) and is told to the inner
optimizer's ``init`` as ``num_steps``. Inside one jitted program the scan length must be
static, so the scan always has ``truncation_schedule.max_length`` steps, in chunks of
``chunk_length``; chunks past the drawn length are skipped with ``lax.cond`` and the tail
of the last active chunk step by step (outputs masked). So every drawn length runs
exactly, a variable schedule compiles once and pays only for the drawn length (memory for
the per-step outputs is ``max_length x tasks`` scalars). The alternative, recompiling per
drawn length, would break the one-program-per-meta-step design.

The truncated step must use ``NeverEndingTruncationSchedule`` (as in the reference): this
estimator decides when a trajectory ends; a reset inside the unroll would silently mix two
tasks into one "whole" trajectory.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from spmd_lopt import inner_step
from spmd_lopt.outer_trainers import common
from spmd_lopt.outer_trainers import estimator_base
from spmd_lopt.outer_trainers import reference_forms
from spmd_lopt.outer_trainers import lopt_truncated_step
from spmd_lopt.outer_trainers import truncation_schedule as truncation_schedule_lib

LOSS_TYPES = ("avg", "min", "last", "last_recompute")


def reduce_unroll_loss(loss: jax.Array, mask: jax.Array, num_active, loss_type: str):
  """Per-task meta-loss of a whole unroll: ``[T, n] -> [n]`` (see module docstring)."""
  if loss_type == "avg":
    return common.masked_mean_over_steps(loss, mask)
  if loss_type == "min":
    return jnp.min(jnp.where(mask, loss, jnp.inf), axis=0)
  if loss_type == "last":
    return jax.lax.dynamic_index_in_dim(loss, num_active - 1, axis=0, keepdims=False)
  raise ValueError(f"no per-step reduction for loss_type {loss_type!r}")


def _reference_form(task_family, learned_opt, num_tasks, unroll_length: int = 20,
                    std: float = 0.01, steps_per_jit: Optional[int] = 10,
                    train_and_meta: bool = False, loss_type: str = "avg",
                    recompute_samples: int = 50, recompute_split: str = "train",
                    clip_loss_diff: Optional[float] = None,
                    stack_antithetic_samples: bool = False,
                    meta_loss_with_aux_key: Optional[str] = None,
                    meta_loss_split: Optional[str] = None,
                    sign_delta_loss_scalar: Optional[float] = None) -> dict:
  """The reference's older ``FullES(task_family, learned_opt, num_tasks,
  unroll_length=20, ...)`` as keyword arguments of today's constructor: a never-ending
  truncated step and a constant ``unroll_length`` schedule."""
  split = reference_forms.reference_meta_loss_split("FullES", train_and_meta,
                                                   meta_loss_split)
  step = lopt_truncated_step.VectorizedLOptTruncatedStep(
      task_family, learned_opt, truncation_schedule_lib.NeverEndingTruncationSchedule(),
      num_tasks, meta_loss_split=split, meta_loss_with_aux_key=meta_loss_with_aux_key)
  return dict(truncated_step=step,
              truncation_schedule=truncation_schedule_lib.ConstantTruncationSchedule(
                  unroll_length),
              std=std, steps_per_jit=steps_per_jit, loss_type=loss_type,
              recompute_samples=recompute_samples, recompute_split=recompute_split,
              clip_loss_diff=clip_loss_diff, stack_antithetic_samples=stack_antithetic_samples,
              sign_delta_loss_scalar=sign_delta_loss_scalar)


class FullES(estimator_base.WholeUnrollEstimator):
  """Antithetic ES over whole unrolls (see module docstring for the math and options).

  Args:
    truncated_step: a ``VectorizedTruncatedStep`` built with
      ``NeverEndingTruncationSchedule``.
    truncation_schedule: gives the unroll length per call (finite ``max_length``).
    std: perturbation scale. chunk_length: steps per chunk of the scan (clamped to
      ``max_length``; need not divide it). stack_antithetic_samples: run ``+`` and ``-``
      as one batch of ``2n`` tasks (one scan) instead of two scans. steps_per_jit:
      accepted for reference compatibility, no effect (the unroll is one program).

  Also takes the reference's older form ``(task_family, learned_opt, num_tasks,
  unroll_length=20, std=0.01, steps_per_jit=10, train_and_meta=False, loss_type="avg",
  recompute_samples=50, recompute_split="train", clip_loss_diff=None,
  stack_antithetic_samples=False, meta_loss_with_aux_key=None)``.

  Host-fed data (tasks with host iterators): ``data`` leaves ``[max_length, n, ...]`` as
  ``truncated_step.get_batch(max_length)`` gives them; with ``loss_type="last_recompute"``
  the pair ``(unroll_batches, recompute_batches)``, the latter ``[recompute_samples, n,
  ...]`` of ``recompute_split`` (``get_host_data`` draws both).
  """

  @reference_forms.reference_form(_reference_form)
  def __init__(self, truncated_step, truncation_schedule, std: float = 0.01,
               steps_per_jit: Optional[int] = 10, loss_type: str = "avg",
               recompute_samples: int = 50, recompute_split: str = "train",
               clip_loss_diff: Optional[float] = None,
               stack_antithetic_samples: bool = True,
               sign_delta_loss_scalar: Optional[float] = None,
               clip_nan_loss_to_value: float = 20.0, chunk_length: int = 10):
    super().__init__(truncated_step, truncation_schedule, steps_per_jit, chunk_length,
                     clip_nan_loss_to_value)
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
    self.std = float(std)
    self.loss_type = loss_type
    self.recompute_samples = int(recompute_samples)
    self.recompute_split = recompute_split
    self.clip_loss_diff = clip_loss_diff
    self.stack_antithetic_samples = bool(stack_antithetic_samples)
    self.sign_delta_loss_scalar = sign_delta_loss_scalar

  def get_host_data(self):
    batches = self.truncated_step.get_batch(self.max_length)
    if self.loss_type != "last_recompute":
      return batches
    step = self.truncated_step
    return batches, inner_step.host_batches(step.task_family.datasets, self.recompute_split,
                                            (self.recompute_samples, step.num_tasks))

  # --- pieces, also used by tests for the exact meta-loss -----------------------------

  def unroll_fresh(self, theta_vec, key, task_ids, outer_state, length, data=None):
    """Fresh tasks (keyed by ``key``'s init half; the inner optimizer is told ``length``)
    unrolled ``length`` steps with the per-task thetas ``theta_vec`` ([n, ...]).
    Returns ``(final_state, TruncatedUnrollOut [max_length, n])``; the mask is 0 on the
    steps from ``length`` on. Tasks whose ids repeat get identical initial states
    (antithetic pairs). ``data``: ``None`` or host-fed batches ``[max_length, n, ...]``."""
    k_init, k_unroll = jax.random.split(key)
    step = self.truncated_step
    state = step.init_step_state(theta_vec, outer_state, k_init, theta_is_vector=True,
                                 task_ids=task_ids, num_steps_override=length)
    return common.unroll_in_chunks(step, theta_vec, state, k_unroll, self.max_length,
                                   outer_state, task_ids, theta_is_vector=True,
                                   steps_per_chunk=self.chunk_length, num_active=length,
                                   data=data)

  def per_task_loss(self, theta_vec, key, task_ids, outer_state, length, data=None):
    """Per-task meta-loss ``[n]`` of whole fresh unrolls under ``theta_vec``; ``data`` as
    ``estimate_local`` takes it."""
    k_unroll, k_recompute = jax.random.split(key)
    unroll_data, recompute_data = data, None
    if self.loss_type == "last_recompute" and data is not None:
      unroll_data, recompute_data = data
    state, out = self.unroll_fresh(theta_vec, k_unroll, task_ids, outer_state, length,
                                   unroll_data)
    if self.loss_type == "last_recompute":
      return self._recompute_loss(theta_vec, state, k_recompute, task_ids,
                                  recompute_data), out
    return reduce_unroll_loss(out.loss, out.mask, length, self.loss_type), out

  def _recompute_loss(self, theta_vec, state, key, task_ids, data=None):
    """Loss of each task's final params, averaged over ``recompute_samples`` batches
    (``lax.map`` over batches: memory of one batch), then normalised: ``[n]``. With the
    step's ``meta_loss_with_aux_key`` the aux value instead (not normalised). ``data``:
    ``None`` (drawn on device) or host batches ``[recompute_samples, n, ...]``."""
    step = self.truncated_step
    aux_key = getattr(step, "meta_loss_with_aux_key", None)

    def one(theta, st, k, batches):
      opt = step.learned_opt.opt_fn(theta, is_training=True)
      task = step.task_family.task_fn(st.task_param)
      losses = jax.lax.map(
          lambda kb: inner_step.eval_loss(task, opt, st.inner_opt_state, kb[0], kb[1],
                                          split=self.recompute_split, aux_key=aux_key),
          (jax.random.split(k, self.recompute_samples), batches))
      loss = jnp.mean(losses)
      return loss if aux_key is not None else task.normalizer(loss)

    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(task_ids)
    return jax.vmap(one, in_axes=(0, 0, 0, None if data is None else 1))(
        theta_vec, state, keys, data)

  # --- the estimator ---------------------------------------------------------------

  def estimate_local(self, theta, state, key, task_ids, outer_state, data=None):
    del state
    k_noise, k_len, k_run = jax.random.split(key, 3)
    length = self.sample_length(k_len, outer_state)
    eps = common.per_task_noise(k_noise, task_ids, theta, self.std)
    pos_theta = common.add_per_task(theta, eps, +1.0)
    neg_theta = common.add_per_task(theta, eps, -1.0)
    run = lambda th, ids, d: self.per_task_loss(th, k_run, ids, outer_state, length, d)
    if self.stack_antithetic_samples:
      # Same ids twice: both halves get the same fresh tasks and the same step keys.
      both_theta, both_ids, both_data = common.stack_antithetic(
          pos_theta, neg_theta, task_ids, data, data_axis=1)
      both, out = run(both_theta, both_ids, both_data)
      pos_loss, neg_loss = common.unstack_antithetic(both)
      p_out, _ = common.unstack_antithetic(out, axis=1)
    else:
      pos_loss, p_out = run(pos_theta, task_ids, data)
      neg_loss, _ = run(neg_theta, task_ids, data)

    delta = pos_loss - neg_loss
    if self.clip_loss_diff is not None:
      delta = jnp.clip(delta, -self.clip_loss_diff, self.clip_loss_diff)
    if self.sign_delta_loss_scalar is not None:
      delta = jnp.sign(delta) * self.sign_delta_loss_scalar
    grads = common.scale_per_task(delta / (2.0 * self.std ** 2), eps)
    return estimator_base.finish_estimate(grads, 0.5 * (pos_loss + neg_loss),
                                          self.clip_nan_loss_to_value,
                                          estimator_base.FullUnrollWorkerState(), p_out)
