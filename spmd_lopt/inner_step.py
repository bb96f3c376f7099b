"""One step of inner training, and one loss evaluation, of one task.

Every place that trains a task with an optimizer (the truncated step that meta-training
unrolls, the whole-unroll estimators' loss recomputation, the evaluation curves) calls
these, so the inner problem is defined once::

    batch        = data if given, else task.sample_batch(k_data, "train")
    l, s', g     = loss_with_state(params, s, k_loss, batch) and its gradient in params
    opt_state'   = opt.update(opt_state, g, loss=l, model_state=s', key=k_update)

with ``(k_data, k_loss, k_update) = split(key, 3)``. All functions are pure and act on one
task; callers ``vmap`` them over tasks.

``host_batches`` is the host side of the reference's data model: tasks whose ``datasets``
are Python iterators get their batches drawn on the host, stacked ``[steps, tasks, ...]``
for the host-fed ``data`` path of the estimators.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from spmd_lopt import threefry


def train_step(task, opt, opt_state, key: jax.Array, batch: Any = None,
               aux_key: Optional[str] = None):
  """One inner step of ``task`` with ``opt``: ``-> (opt_state', loss, meta_loss)``.

  loss: the training loss before the update (float scalar). meta_loss: ``loss``, or the
  task's auxiliary value ``aux_key`` (``loss_with_state_and_aux``) when given.
  batch: a batch for this step, or ``None`` to draw one on device from the train split.
  """
  k_data, k_loss, k_update = jax.random.split(threefry.as_unrolled(key), 3)
  params, model_state = opt.get_params_state(opt_state)
  if batch is None:
    batch = task.sample_batch(k_data, "train")

  if aux_key is None:
    def loss_fn(p):
      loss, new_state = task.loss_with_state(p, model_state, k_loss, batch)
      return loss, (new_state, loss)
  else:
    def loss_fn(p):
      loss, new_state, aux = task.loss_with_state_and_aux(p, model_state, k_loss, batch)
      return loss, (new_state, aux_value(aux, aux_key))

  (loss, (new_state, meta_loss)), grad = jax.value_and_grad(loss_fn, has_aux=True)(params)
  opt_state = opt.update(opt_state, grad, loss=loss, model_state=new_state, key=k_update)
  return opt_state, loss, meta_loss


def eval_loss(task, opt, opt_state, key: jax.Array, batch: Any = None,
              split: str = "train", aux_key: Optional[str] = None) -> jax.Array:
  """The task's loss (or aux value ``aux_key``) at the params in ``opt_state`` on
  ``batch`` (``None``: one batch of ``split`` drawn on device with ``split(key)[0]``)."""
  k_data, k_loss = jax.random.split(threefry.as_unrolled(key))
  params, model_state = opt.get_params_state(opt_state)
  if batch is None:
    batch = task.sample_batch(k_data, split)
  if aux_key is None:
    return task.loss_with_state(params, model_state, k_loss, batch)[0]
  _, _, aux = task.loss_with_state_and_aux(params, model_state, k_loss, batch)
  return aux_value(aux, aux_key)


def aux_value(aux, aux_key: str) -> jax.Array:
  if aux_key not in aux:
    raise ValueError(f"meta_loss_with_aux_key {aux_key!r} is not among the task's aux "
                     f"values {sorted(aux)}.")
  return jnp.asarray(aux[aux_key], jnp.float32)


def host_batches(datasets, split: str, shape: Sequence[int]):
  """``prod(shape)`` batches drawn on the host from ``datasets``'s ``split`` iterator and
  stacked into numpy leaves ``[*shape, ...]``; ``()`` when ``datasets`` is ``None`` (a
  task without data, as in the reference)."""
  if datasets is None:
    return ()
  split_fn = getattr(datasets, "split", None)
  it = split_fn(split) if callable(split_fn) else getattr(datasets, split, None)
  if it is None:
    raise ValueError(f"the task's datasets have no split {split!r}.")
  count = int(np.prod(shape))
  batches = [next(it) for _ in range(count)]
  return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]).reshape(
      tuple(shape) + np.shape(xs[0])), *batches)
