"""``SampleFixedTasksFamily``: each sample is one of several fixed tasks, chosen at random.

The task parameter is the index ``i: i32[]``, so it stacks and vmaps. The chosen task's
``init``, ``loss``, ``sample_batch`` and ``normalizer`` are selected with
``lax.switch(i, ...)``; every branch must return the same pytree, so:

- params: if every task's ``init`` gives the same tree/shapes/dtypes ("shared" layout) the
  switch returns it directly; otherwise ("union" layout) params are the tuple
  ``(params_0, ..., params_{n-1})`` where only slot ``i`` is initialised (others zero)
  and only slot ``i`` enters the loss, so the others get zero gradient.
- batches: likewise shared if every task's batch has one shape, else a tuple with slot
  ``i`` filled and zeros elsewhere.

Under ``vmap`` with a batched index, ``lax.switch`` evaluates every branch and selects, so
a mixed batch of tasks costs the sum of the tasks' costs; the union layout also carries
every task's parameters. Stateless tasks only (``init_with_state`` state is dropped).
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from spmd_lopt.tasks import base


def _same_structure(trees) -> bool:
  first = trees[0]
  s0 = jax.tree.structure(first)
  for t in trees[1:]:
    if jax.tree.structure(t) != s0:
      return False
    for x, y in zip(jax.tree.leaves(first), jax.tree.leaves(t)):
      if x.shape != y.shape or x.dtype != y.dtype:
        return False
  return True


def _zeros(abstract):
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract)


class _SwitchTask(base.Task):

  def __init__(self, family: "SampleFixedTasksFamily", index: jax.Array):
    self.family = family
    self.index = index
    self.name = family.name

  @property
  def datasets(self):
    return self.family.datasets

  def _switch(self, branches, *args):
    return jax.lax.switch(self.index, branches, *args)

  def init(self, key):
    f = self.family
    if f.shared_params:
      return self._switch([t.init for t in f.tasks], key)

    def branch(i):
      def init_slot_i(k):
        return tuple(f.tasks[j].init(k) if j == i else _zeros(f.param_shapes[j])
                     for j in range(len(f.tasks)))
      return init_slot_i
    return self._switch([branch(i) for i in range(len(f.tasks))], key)

  def sample_batch(self, key, split="train"):
    f = self.family
    if f.shared_batch:
      return self._switch([lambda k, t=t: t.sample_batch(k, split) for t in f.tasks], key)

    def branch(i):
      def batch_slot_i(k):
        return tuple(f.tasks[j].sample_batch(k, split) if j == i
                     else _zeros(f.batch_shapes[j]) for j in range(len(f.tasks)))
      return batch_slot_i
    return self._switch([branch(i) for i in range(len(f.tasks))], key)

  def loss(self, params, key, data):
    f = self.family

    def branch(i):
      def loss_i(p, k, d):
        p = p if f.shared_params else p[i]
        d = d if f.shared_batch else d[i]
        return f.tasks[i].loss(p, k, d)
      return loss_i
    return self._switch([branch(i) for i in range(len(f.tasks))], params, key, data)

  def normalizer(self, loss):
    return self._switch([t.normalizer for t in self.family.tasks], loss)


class SampleFixedTasksFamily(base.TaskFamily):
  """Uniform choice among ``tasks`` (stateless ``base.Task`` instances)."""

  def __init__(self, tasks: Sequence[base.Task], name: Optional[str] = None):
    if not tasks:
      raise ValueError("SampleFixedTasksFamily: needs at least one task.")
    self.tasks = tuple(tasks)
    self.name = name or "SampleFixedTasks_" + "+".join(
        t.name or type(t).__name__ for t in self.tasks)
    key = jax.random.key(0)
    self.param_shapes = [jax.eval_shape(t.init, key) for t in self.tasks]
    self.batch_shapes = [jax.eval_shape(t.sample_batch, key) for t in self.tasks]
    self.shared_params = _same_structure(self.param_shapes)
    self.shared_batch = _same_structure(self.batch_shapes)

  @property
  def datasets(self):
    return tuple(t.datasets for t in self.tasks)

  def with_datasets(self, datasets):
    """The family over ``t.with_datasets(d)`` for each task (tasks without data keep
    theirs)."""
    tasks = [t.with_datasets(d) if hasattr(t, "with_datasets") else t
             for t, d in zip(self.tasks, datasets)]
    return SampleFixedTasksFamily(tasks, self.name)

  def sample(self, key):
    return jax.random.randint(key, (), 0, len(self.tasks), jnp.int32)

  def task_fn(self, task_param):
    return _SwitchTask(self, task_param)
