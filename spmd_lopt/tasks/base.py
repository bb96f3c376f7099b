"""Tasks and task families: the inner problems of meta-training.

A ``Task`` is one differentiable problem: ``init(key) -> params`` and
``loss(params, key, data) -> scalar``. A ``TaskFamily`` is a distribution over tasks:
``sample(key) -> task_param`` draws a (jittable, vmappable) pytree of task parameters and
``task_fn(task_param) -> Task`` builds the task they describe. Every function here is pure,
so the vectorized truncated step can ``vmap`` a family over thousands of tasks and shard
them over devices.

Data: tasks that need a batch draw it on device with ``sample_batch(key)``, keyed by the
caller (the truncated step keys it by global task index and step), so a meta step never
waits on a host feed. Tasks without data return ``None`` there. Tasks written against
the reference library instead expose ``datasets``, a ``datasets_base.Datasets`` of host
iterators (its ``abstract_batch`` gives the batch's shapes), and are fed through the
trainers' host-fed ``datas`` path; ``sample_batch`` returns ``None`` for them too.

``loss_with_state_and_aux`` (loss, new model state, aux dict) is the reference's most
general loss; the default builds it from ``loss_with_state``.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp

Params = Any
ModelState = Any
PRNGKey = jax.Array
TaskParam = Any


class Task:
  """One inner problem.

  Subclasses implement ``init`` and ``loss``. Tasks with model state (e.g. batch norm
  statistics) override ``init_with_state`` and ``loss_with_state`` instead.
  """

  name: Optional[str] = None

  def init(self, key: PRNGKey) -> Params:
    raise NotImplementedError

  def init_with_state(self, key: PRNGKey) -> tuple[Params, ModelState]:
    return self.init(key), None

  def loss(self, params: Params, key: PRNGKey, data: Any) -> jax.Array:
    # A reference-style task may define only ``loss_and_aux``.
    if self._overrides("loss_and_aux"):
      return self.loss_and_aux(params, key, data)[0]
    raise NotImplementedError

  def _overrides(self, name: str) -> bool:
    return getattr(type(self), name) is not getattr(Task, name)

  def loss_with_state(self, params: Params, state: ModelState, key: PRNGKey,
                      data: Any) -> tuple[jax.Array, ModelState]:
    return self.loss(params, key, data), state

  def loss_and_aux(self, params: Params, key: PRNGKey,
                   data: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
    return self.loss(params, key, data), {}

  def loss_with_state_and_aux(self, params: Params, state: ModelState, key: PRNGKey,
                              data: Any) -> tuple[jax.Array, ModelState, dict]:
    # A task defining only ``loss_and_aux`` (no ``loss``/``loss_with_state``): its aux.
    if self._overrides("loss_and_aux") and not (self._overrides("loss")
                                                or self._overrides("loss_with_state")):
      loss, aux = self.loss_and_aux(params, key, data)
      return loss, state, aux
    loss, state = self.loss_with_state(params, state, key, data)
    return loss, state, {}

  def sample_batch(self, key: PRNGKey, split: str = "train") -> Any:
    """Draw one batch on device for ``split``; ``None`` for tasks without data."""
    del key, split
    return None

  def normalizer(self, loss: jax.Array) -> jax.Array:
    """Map a raw loss to the meta-loss scale (identity by default)."""
    return loss

  # None, an on-device data set, or the reference's host ``datasets_base.Datasets``; a
  # plain attribute so reference-style tasks can assign it in ``__init__``.
  datasets: Any = None


class TaskFamily:
  """A distribution over tasks.

  ``sample(key)`` must return a pytree of arrays with the same structure, shapes and
  dtypes for every key (``vmap`` stacks them across tasks); ``task_fn`` must accept the
  traced result.
  """

  name: Optional[str] = None

  def sample(self, key: PRNGKey) -> TaskParam:
    raise NotImplementedError

  def task_fn(self, task_param: TaskParam) -> Task:
    raise NotImplementedError

  # None, an on-device data set, or the reference's host ``datasets_base.Datasets``; a
  # plain attribute so reference-style tasks can assign it in ``__init__``.
  datasets: Any = None

  def eval_task_fn(self, task_param: TaskParam) -> Task:
    return self.task_fn(task_param)

  def sample_task(self, key: PRNGKey) -> Task:
    """``task_fn(sample(key))``, as the reference."""
    return self.task_fn(self.sample(key))


class _SingleTaskFamily(TaskFamily):

  def __init__(self, task: Task, name: Optional[str], eval_task: Optional[Task]):
    self._task = task
    self._eval_task = eval_task or task
    self.name = name or task.name or type(task).__name__

  def sample(self, key: PRNGKey) -> TaskParam:
    del key
    return jnp.asarray(0, jnp.int32)

  def task_fn(self, task_param: TaskParam) -> Task:
    del task_param
    return self._task

  def eval_task_fn(self, task_param: TaskParam) -> Task:
    del task_param
    return self._eval_task

  @property
  def datasets(self):
    return self._task.datasets

  def with_datasets(self, datasets):
    """The family of ``task.with_datasets(datasets)`` (tasks with data only)."""
    bind = lambda t: t.with_datasets(datasets) if hasattr(t, "with_datasets") else t
    return _SingleTaskFamily(bind(self._task), self.name, bind(self._eval_task))


def single_task_to_family(task: Task, name: Optional[str] = None,
                          eval_task: Optional[Task] = None) -> TaskFamily:
  """Wrap one task as a family whose every sample is that task."""
  return _SingleTaskFamily(task, name, eval_task)


def check_task_family(family: TaskFamily, key: PRNGKey) -> None:
  """Fail early, on the host, if ``family`` cannot be vmapped over tasks.

  Samples twice with different keys and checks that the two samples agree in tree
  structure, shapes and dtypes, and that the task built from a sample initialises to
  floating-point parameters and gives a scalar loss. Runs abstractly (``eval_shape``), so
  it costs no compute.
  """
  name = getattr(family, "name", None) or type(family).__name__
  k1, k2 = jax.random.split(key)
  a = jax.eval_shape(family.sample, k1)
  b = jax.eval_shape(family.sample, k2)
  sa = jax.tree.structure(a)
  sb = jax.tree.structure(b)
  if sa != sb:
    raise ValueError(f"Task family {name!r}: sample(key) returns a different tree "
                     f"structure for different keys ({sa} vs {sb}); it must be fixed so "
                     "that tasks can be stacked and vmapped.")
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    if x.shape != y.shape or x.dtype != y.dtype:
      raise ValueError(f"Task family {name!r}: sample(key) returns leaves of different "
                       f"shape/dtype for different keys ({x} vs {y}).")

  def init_and_loss(task_param, key):
    task = family.task_fn(task_param)
    params, state = task.init_with_state(key)
    data = task.sample_batch(key)
    abstract = getattr(task.datasets, "abstract_batch", None)
    if data is None and abstract is not None:  # a host-fed task: a batch of its shape
      data = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract)
    loss, _ = task.loss_with_state(params, state, key, data)
    return params, loss

  try:
    params, loss = jax.eval_shape(init_and_loss, a, k1)
  except Exception as e:  # re-raised with the family named, the cause chained
    raise ValueError(f"Task family {name!r}: building a task from its own sample "
                     f"failed: {type(e).__name__}: {e}") from e
  if loss.shape != ():
    raise ValueError(f"Task family {name!r}: loss must be a scalar, got shape "
                     f"{loss.shape}. A sample of the wrong shape is the usual cause.")
  for leaf in jax.tree.leaves(params):
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
      raise ValueError(f"Task family {name!r}: parameters must be floating point, got "
                       f"{leaf.dtype}.")
