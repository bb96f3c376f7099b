"""Smoke checks for tasks and task families, under the reference library's names.

``smoketest_task(task)`` builds params, gets one batch (zeros shaped like
``datasets.abstract_batch`` when there is one and ``abstract_data``, else ``next`` of the
train iterator; ``()`` for a task without data), and runs the loss, its gradient, the
normalizer and ``loss_with_state_and_aux``. ``smoketest_task_family(family)`` does that
for two samples and checks that a family whose tasks have data exposes ``datasets``.
Scripts and tests written against ``learned_optimization.tasks.test_utils`` port by
changing the import.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from spmd_lopt.tasks import base


def _one_batch(task: base.Task, key, abstract_data: bool):
  datasets = task.datasets
  if not datasets:
    return ()
  abstract = getattr(datasets, "abstract_batch", None)
  if abstract_data and abstract is not None:
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract)
  if hasattr(datasets, "train"):
    return next(datasets.train)
  return task.sample_batch(key)  # an on-device data set


def smoketest_task(task: base.Task, abstract_data: bool = True) -> None:
  """Run every entry point of ``task`` once (raises on the first failure)."""
  key = jax.random.key(0)
  params, state = task.init_with_state(key)
  batch = _one_batch(task, key, abstract_data)
  task.loss_with_state(params, state, key, batch)
  jax.grad(task.loss_with_state, has_aux=True)(params, state, key, batch)
  task.normalizer(jnp.asarray(1.0))
  task.loss_with_state_and_aux(params, state, key, batch)


def smoketest_task_family(task_family: base.TaskFamily) -> None:
  """``smoketest_task`` on two sampled tasks; data-carrying tasks need family datasets."""
  key = jax.random.key(0)
  for k in jax.random.split(key, 2):
    task = task_family.task_fn(task_family.sample(k))
    smoketest_task(task)
  if task.datasets is not None and task_family.datasets is None:
    raise AssertionError(f"{task_family.name}: its tasks have datasets but the family's "
                         "datasets is None.")
