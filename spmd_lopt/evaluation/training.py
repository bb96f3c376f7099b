"""Train one task with any ``Optimizer`` and record loss curves, in one jitted program.

``single_task_training_curves(task, opt, num_steps, key)`` runs, inside a single ``jit``,
``num_steps`` inner steps ``g_t = grad L(p_t; key_t, batch_t)``, ``s_{t+1} =
opt.update(s_t, g_t, loss=L_t, key=key_t)`` as a ``lax.scan``, and every ``eval_every``
steps (and at steps 0 and ``num_steps``) the mean loss over ``eval_batches`` fresh batches
of each split in ``eval_splits``. The optimizer can be hand-designed or
``lopt.opt_fn(theta)``. ``multi_seed_training_curves`` vmaps the same program over keys;
``training_curves_fn`` is the pure program itself, for callers that vmap it over more
(optimizer hyper-parameters, sampled tasks: see ``spmd_lopt.evaluate``).

Returned dict (numpy):
  ``train/loss``: f32[num_steps], the batch loss at each step, before its update;
  ``eval/step``: i32[E], the step of each evaluation (0, eval_every, ..., num_steps);
  ``eval/<split>/loss``: f32[E], mean loss over ``eval_batches`` batches of ``split``;
  with a leading ``[num_seeds]`` axis from the multi-seed variant.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from spmd_lopt.optimizers.base import Optimizer
from spmd_lopt.tasks.base import Task


def _eval_steps(num_steps: int, eval_every: int) -> np.ndarray:
  steps = list(range(0, num_steps + 1, eval_every))
  if steps[-1] != num_steps:
    steps.append(num_steps)
  return np.asarray(steps, np.int32)


def _curves_fn(task: Task, opt: Optimizer, num_steps: int, eval_every: int,
               eval_batches: int, eval_splits: Sequence[str]):
  """A pure ``key -> curves`` function (jnp arrays), for jit and vmap."""
  if num_steps < 1 or eval_every < 1 or eval_batches < 1:
    raise ValueError("num_steps, eval_every and eval_batches must be >= 1; got "
                     f"{num_steps}, {eval_every}, {eval_batches}.")
  n_blocks, tail = divmod(num_steps, eval_every)

  def evaluate(opt_state, key):
    params, state = opt.get_params_state(opt_state)
    out = {}
    for split, k in zip(eval_splits, jax.random.split(key, len(eval_splits))):
      def one(kb, split=split):
        kd, kl = jax.random.split(kb)
        loss, _ = task.loss_with_state(params, state, kl, task.sample_batch(kd, split))
        return loss
      out[split] = jnp.mean(jax.vmap(one)(jax.random.split(k, eval_batches)))
    return out

  def train_step(opt_state, key):
    kd, kl, ku = jax.random.split(key, 3)
    params, state = opt.get_params_state(opt_state)
    batch = task.sample_batch(kd, "train")

    def f(p):
      return task.loss_with_state(params=p, state=state, key=kl, data=batch)

    (loss, new_state), grad = jax.value_and_grad(f, has_aux=True)(params)
    opt_state = opt.update(opt_state, grad, loss=loss, model_state=new_state, key=ku)
    return opt_state, loss

  def block(opt_state, key, length):
    k_train, k_eval = jax.random.split(key)
    opt_state, losses = jax.lax.scan(train_step, opt_state,
                                     jax.random.split(k_train, length))
    return opt_state, (losses, evaluate(opt_state, k_eval))

  def run(key):
    k_init, k_opt, k_eval0, k_blocks, k_tail = jax.random.split(key, 5)
    params, state = task.init_with_state(k_init)
    opt_state = opt.init(params, model_state=state, num_steps=num_steps, key=k_opt)
    evals = [jax.tree.map(lambda x: x[None], evaluate(opt_state, k_eval0))]
    losses = []
    if n_blocks:
      opt_state, (l, e) = jax.lax.scan(functools.partial(block, length=eval_every),
                                       opt_state, jax.random.split(k_blocks, n_blocks))
      losses.append(l.reshape(-1))
      evals.append(e)
    if tail:
      opt_state, (l, e) = block(opt_state, k_tail, tail)
      losses.append(l)
      evals.append(jax.tree.map(lambda x: x[None], e))
    out = {"train/loss": jnp.concatenate(losses)}
    for split in eval_splits:
      out[f"eval/{split}/loss"] = jnp.concatenate([e[split] for e in evals])
    return out

  return run


def single_task_training_curves(task: Task, opt: Optimizer, num_steps: int,
                                key: jax.Array, eval_every: int = 10,
                                eval_batches: int = 5,
                                eval_splits: Sequence[str] = ("train", "test")
                                ) -> dict[str, np.ndarray]:
  """Train ``task`` with ``opt`` for ``num_steps`` from ``key``; see the module doc."""
  run = _curves_fn(task, opt, num_steps, eval_every, eval_batches, tuple(eval_splits))
  out = jax.device_get(jax.jit(run)(key))
  out = {k: np.asarray(v) for k, v in out.items()}
  out["eval/step"] = _eval_steps(num_steps, eval_every)
  return out


def multi_seed_training_curves(task: Task, opt: Optimizer, num_steps: int,
                               key: jax.Array, num_seeds: int = 4, eval_every: int = 10,
                               eval_batches: int = 5,
                               eval_splits: Sequence[str] = ("train", "test")
                               ) -> dict[str, np.ndarray]:
  """``single_task_training_curves`` for ``num_seeds`` keys split from ``key``, vmapped
  in one program; every curve gets a leading ``[num_seeds]`` axis (``eval/step`` too)."""
  run = _curves_fn(task, opt, num_steps, eval_every, eval_batches, tuple(eval_splits))
  keys = jax.random.split(key, num_seeds)
  out = jax.device_get(jax.jit(jax.vmap(run))(keys))
  out = {k: np.asarray(v) for k, v in out.items()}
  out["eval/step"] = np.tile(_eval_steps(num_steps, eval_every), (num_seeds, 1))
  return out


def eval_step_schedule(num_steps: int, eval_every: int) -> np.ndarray:
  """i32[E]: the steps at which the curves evaluate (0, eval_every, ..., num_steps)."""
  return _eval_steps(num_steps, eval_every)


def training_curves_fn(task: Task, opt: Optimizer, num_steps: int, eval_every: int = 10,
                       eval_batches: int = 5,
                       eval_splits: Sequence[str] = ("train", "test")):
  """The pure ``key -> curves`` function (jnp arrays, no ``eval/step`` entry) behind the
  two functions above, for callers that ``jit``/``vmap`` it themselves. ``task`` and
  ``opt`` may be built from traced values (a sampled task param, a traced theta or
  learning rate), so one program can cover a sweep."""
  return _curves_fn(task, opt, num_steps, eval_every, eval_batches, tuple(eval_splits))
