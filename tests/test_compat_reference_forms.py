"""The reference's older estimator constructors and its host-iterator data model.

- ``TruncatedPES / TruncatedGrad / FullES(task_family, learned_opt, ...)`` (the form the
  reference's own unit tests use) build the same estimator as today's
  ``truncated_step=...`` form: same gradient for the same key.
- A task family whose ``datasets`` are host iterators runs in the fused learner with
  ``update(..., datas=...)`` fed from ``get_batch``, and gives the meta-gradient that
  on-device sampling gives when it draws the same batches.
"""

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

from spmd_lopt.learned_optimizers import base as lopt_base
from spmd_lopt.optimizers import base as opt_base
from spmd_lopt.outer_trainers import full_es
from spmd_lopt.outer_trainers import gradient_learner
from spmd_lopt.outer_trainers import lopt_truncated_step
from spmd_lopt.outer_trainers import truncated_grad
from spmd_lopt.outer_trainers import truncated_pes
from spmd_lopt.outer_trainers import truncation_schedule
from spmd_lopt.tasks import base as tasks_base
from spmd_lopt.tasks import datasets_base
from spmd_lopt.tasks import quadratics

DIM, TASKS, STEPS = 4, 4, 5


def _estimate(est, key):
  theta = est.truncated_step.outer_init(jax.random.key(1))
  ww = gradient_learner.WorkerWeights(theta, None, gradient_learner.OuterState(1))
  state = est.init_worker_state(ww, key=jax.random.key(2))
  out, _ = est.compute_gradient_estimate(ww, key, state, with_summary=False)
  return out


def _close_trees(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-7)


def _forms(which):
  """(reference positional form, today's form) of one estimator on the same tasks."""
  fam = quadratics.FixedDimQuadraticFamily(DIM)
  lopt = lopt_base.LearnableSGD()
  sched = truncation_schedule.ConstantTruncationSchedule(20)
  step = lopt_truncated_step.VectorizedLOptTruncatedStep(fam, lopt, sched, TASKS)
  if which == "pes":
    return (truncated_pes.TruncatedPES(fam, lopt, sched, num_tasks=TASKS,
                                       trunc_length=STEPS, steps_per_jit=STEPS),
            truncated_pes.TruncatedPES(truncated_step=step, trunc_length=STEPS))
  if which == "grad":
    return (truncated_grad.TruncatedGrad(fam, lopt, sched, num_tasks=TASKS, steps_per_jit=3,
                                         unroll_length=STEPS),
            truncated_grad.TruncatedGrad(step, unroll_length=STEPS))
  never = lopt_truncated_step.VectorizedLOptTruncatedStep(
      fam, lopt, truncation_schedule.NeverEndingTruncationSchedule(), TASKS)
  return (full_es.FullES(fam, lopt, num_tasks=TASKS, unroll_length=STEPS, steps_per_jit=5,
                         loss_type="min"),
          full_es.FullES(never, truncation_schedule.ConstantTruncationSchedule(STEPS),
                         loss_type="min"))


@pytest.mark.parametrize("which", ["pes", "grad",
                                   pytest.param("full_es", marks=pytest.mark.slow)])
def test_reference_positional_form_matches_truncated_step_form(which):
  old, new = _forms(which)
  key = jax.random.key(3)
  a, b = _estimate(old, key), _estimate(new, key)
  assert float(jnp.abs(jax.flatten_util.ravel_pytree(a.grad)[0]).sum()) > 0
  _close_trees(a.grad, b.grad)
  np.testing.assert_allclose(a.mean_loss, b.mean_loss, rtol=1e-5)


def test_reference_form_arguments():
  fam = quadratics.FixedDimQuadraticFamilyData(DIM)
  lopt = lopt_base.LearnableSGD()
  sched = truncation_schedule.ConstantTruncationSchedule(10)
  pes = truncated_pes.TruncatedPES(fam, lopt, sched, TASKS, 5, 3, train_and_meta=True)
  assert pes.truncated_step.meta_loss_split == "outer_valid"
  assert pes.trunc_length == 5
  assert pes.truncated_step.random_initial_iteration_offset == 3
  es = full_es.FullES(fam, lopt, TASKS, unroll_length=7, meta_loss_with_aux_key="acc")
  assert es.max_length == 7 and es.truncated_step.meta_loss_with_aux_key == "acc"
  with pytest.raises(TypeError):
    truncated_pes.TruncatedPES(fam, lopt, sched, num_tasks=TASKS, not_an_argument=1)
  with pytest.raises(ValueError, match="train_and_meta"):
    truncated_grad.TruncatedGrad(fam, lopt, sched, num_tasks=TASKS, train_and_meta=True,
                                 meta_loss_split="inner_valid")
  with pytest.raises(ValueError, match="loss_type"):
    truncated_grad.TruncatedGrad(fam, lopt, sched, num_tasks=TASKS, loss_type="min")


def test_task_defining_only_loss_and_aux():
  """A reference-style task that defines only ``loss_and_aux``; its aux value is the
  meta-loss with ``meta_loss_with_aux_key``."""

  class _Task(tasks_base.Task):
    def init(self, key):
      return jax.random.normal(key, (DIM,))

    def loss_and_aux(self, params, key, data):
      return jnp.sum(params ** 2), {"half": jnp.asarray(0.5)}

  task = _Task()
  p = jnp.arange(DIM, dtype=jnp.float32)
  assert float(task.loss(p, None, None)) == float(jnp.sum(p ** 2))
  fam = tasks_base.single_task_to_family(task)
  es = full_es.FullES(fam, lopt_base.LearnableSGD(), num_tasks=2, unroll_length=3,
                      meta_loss_with_aux_key="half")
  np.testing.assert_allclose(_estimate(es, jax.random.key(0)).mean_loss, 0.5)


# --- host iterators in the fused learner ----------------------------------------------


class _DeviceTask(tasks_base.Task):
  """``|params - center - b|^2`` with a scalar batch ``b`` drawn on device."""

  def __init__(self, center):
    self.center = center

  def init(self, key):
    return jax.random.normal(key, (DIM,))

  def loss(self, params, key, data):
    return jnp.sum(jnp.square(params - self.center - data))

  def sample_batch(self, key, split="train"):
    return jax.random.normal(key, ())


class _ProbeTask(_DeviceTask):
  """Same sampling; the loss *is* the batch, so an unroll's losses reveal the batches the
  device drew."""

  def loss(self, params, key, data):
    return data + 0.0 * jnp.sum(params)


class _HostTask(_DeviceTask):
  """Same loss; batches come from the family's host iterators."""

  def __init__(self, center, datasets):
    super().__init__(center)
    self.datasets = datasets

  def sample_batch(self, key, split="train"):
    return None


class _DeviceFamily(tasks_base.TaskFamily):
  name = "shifted_quadratic"

  def sample(self, key):
    return jax.random.normal(key, (DIM,))

  def task_fn(self, task_param):
    return _DeviceTask(task_param)


class _ProbeFamily(_DeviceFamily):
  def task_fn(self, task_param):
    return _ProbeTask(task_param)


class _HostFamily(_DeviceFamily):
  """The reference's data model: ``datasets`` holds host iterators of scalar batches."""

  def __init__(self, batches):
    its = [iter(list(batches)) for _ in range(4)]
    self.datasets = datasets_base.Datasets(
        *its, abstract_batch=jax.ShapeDtypeStruct((), jnp.float32))

  def task_fn(self, task_param):
    return _HostTask(task_param, self.datasets)


def _pes(family):
  step = lopt_truncated_step.VectorizedLOptTruncatedStep(
      family, lopt_base.LearnableSGD(), truncation_schedule.ConstantTruncationSchedule(50),
      TASKS)
  return truncated_pes.TruncatedPES(truncated_step=step, trunc_length=STEPS, std=0.1)


def _learner(family):
  return gradient_learner.SingleMachineGradientLearner(
      lopt_base.LearnableSGD(), [_pes(family)], opt_base.SGD(learning_rate=1.0))


def _one_update(learner, datas=None):
  state = learner.init(jax.random.key(0))
  theta0 = learner.get_lopt_params(state)
  theta0 = jax.tree.map(np.asarray, theta0)  # the update donates state
  state, loss, _ = learner.update(state, jax.random.key(7), datas=datas)
  grad = jax.tree.map(lambda a, b: a - np.asarray(b), theta0, learner.get_lopt_params(state))
  return grad, float(loss)


@pytest.mark.slow  # ~10 s; keeps the default suite under 10 minutes
def test_host_iterator_family_in_fused_learner_matches_device_sampling():
  # The batches on-device sampling draws in this meta step: the learner gives estimator 0
  # the key fold_in(key, 0); the probe's per-step losses are its training batches.
  probe = _pes(_ProbeFamily())
  out = _estimate(probe, jax.random.fold_in(jax.random.key(7), 0))
  batches = np.asarray(out.unroll_info.loss)  # [STEPS, TASKS]
  assert batches.shape == (STEPS, TASKS) and np.std(batches) > 0.1

  device_grad, device_loss = _one_update(_learner(_DeviceFamily()))

  # A script written against the reference: the family yields those batches from host
  # iterators, step-major as get_batch stacks them, and the learner is fed get_batch.
  host_learner = _learner(_HostFamily(np.tile(batches.reshape(-1), 2)))
  est = host_learner.gradient_estimators[0]
  datas = est.truncated_step.get_batch(STEPS)
  np.testing.assert_array_equal(datas, batches)
  host_grad, host_loss = _one_update(host_learner, datas=(datas,))
  # As the reference's learner does, update() draws them itself when not given.
  drawn_grad, drawn_loss = _one_update(host_learner)
  _close_trees(drawn_grad, host_grad)
  assert drawn_loss == host_loss

  assert float(np.abs(device_grad["log_lr"])) > 0
  _close_trees(host_grad, device_grad)
  np.testing.assert_allclose(host_loss, device_loss, rtol=1e-5)

  # Other batches give another gradient: the host data is really used.
  other = np.ascontiguousarray(batches[::-1])
  other_grad, _ = _one_update(host_learner, datas=(other,))
  diff = jax.flatten_util.ravel_pytree(jax.tree.map(np.subtract, other_grad, device_grad))[0]
  assert float(jnp.abs(diff).max()) > 1e-6


def test_host_iterator_family_on_device_only_paths_is_a_clear_error():
  learner = _learner(_HostFamily(np.zeros(STEPS * TASKS, np.float32)))
  state = learner.init(jax.random.key(0))
  with pytest.raises(ValueError, match="host iterators"):
    learner.meta_gradient(state, jax.random.key(1))
