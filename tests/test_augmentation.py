"""Reparameterisation augmentation: same function, scaled gradients, scales keyed by the
global task index (so 1 and 8 devices draw the same ones)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spmd_lopt.tasks import augmentation, datasets_base, quadratics, task_augmentation
from spmd_lopt.tasks import base as base_lib
from spmd_lopt.tasks import test_utils
from spmd_lopt.tasks.fixed import image_mlp

from helpers import learner, pes_estimator


@pytest.fixture(scope="module")
def mlp_family():
  from spmd_lopt.tasks import base
  return base.single_task_to_family(image_mlp.ImageMLP_Digits8_Relu32(batch_size=16))


@pytest.mark.parametrize("level", augmentation.LEVELS)
def test_augmented_loss_at_theta_over_s_equals_base_loss(mlp_family, level):
  fam = augmentation.ReparamWeightsFamily(mlp_family, level, (1e-3, 1e3))
  tp = fam.sample(jax.random.key(3))
  aug, plain = fam.task_fn(tp), mlp_family.task_fn(tp.base)
  key = jax.random.key(5)
  theta = plain.init(key)
  scales = tp.scales
  if level == "global":
    phi = jax.tree.map(lambda p: p / scales, theta)
  else:
    phi = jax.tree.map(lambda p, s: p / s, theta, scales)
  batch = plain.sample_batch(key)
  np.testing.assert_allclose(aug.loss(phi, key, batch), plain.loss(theta, key, batch),
                             rtol=1e-5)
  # init is the base init divided by s
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), aug.init(key), phi)
  # gradients scale by s: grad_phi L(s phi) = s * grad L(theta)
  g_aug = jax.grad(aug.loss)(phi, key, batch)
  g = jax.grad(plain.loss)(theta, key, batch)
  want = (jax.tree.map(lambda x: x * scales, g) if level == "global"
          else jax.tree.map(lambda x, s: x * s, g, scales))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-7),
               g_aug, want)
  assert aug.normalizer(jnp.float32(100.0)) == plain.normalizer(jnp.float32(100.0))


def test_scales_are_log_uniform_in_range_and_differ_per_task():
  fam = augmentation.ReparamWeightsFamily(quadratics.FixedDimQuadraticFamily(4), "global",
                                          (1e-2, 1e2))
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(jnp.arange(2000))
  s = np.asarray(jax.vmap(fam.sample)(keys).scales)
  assert s.shape == (2000,) and np.all((s >= 1e-2) & (s <= 1e2))
  assert len(np.unique(s)) > 1990  # float32 draws may rarely collide
  logs = np.log10(s)  # uniform on [-2, 2]: mean 0, var 16/12
  assert abs(logs.mean()) < 0.1 and abs(logs.var() - 16 / 12) < 0.15


def test_tensor_level_draws_one_scale_per_leaf(mlp_family):
  fam = augmentation.ReparamWeightsFamily(mlp_family, "tensor")
  scales = jax.tree.leaves(fam.sample(jax.random.key(1)).scales)
  assert len(scales) == 4 and all(s.shape == () for s in scales)
  assert len({float(s) for s in scales}) == 4


def test_bad_arguments_are_one_line_errors():
  fam = quadratics.FixedDimQuadraticFamily(3)
  with pytest.raises(ValueError, match="level"):
    augmentation.ReparamWeightsFamily(fam, "layer")
  with pytest.raises(ValueError, match="param_scale_range"):
    augmentation.ReparamWeightsFamily(fam, "global", (0.0, 1.0))
  with pytest.raises(ValueError, match="param_scale_range"):
    augmentation.ReparamWeightsFamily(fam, "global", "big")


def test_reference_module_name_reexports():
  assert task_augmentation.ReparamWeightsFamily is augmentation.ReparamWeightsFamily


def test_same_global_task_draws_same_scale_on_1_and_8_devices(devices):
  fam = augmentation.ReparamWeightsFamily(quadratics.FixedDimQuadraticFamily(4), "tensor")
  scales = {}
  for n in (1, 8):
    lrn = learner(n, lambda lopt: [pes_estimator(lopt, num_tasks=16, dim=4, family=fam)])
    state = lrn.init(jax.random.key(0))
    scales[n] = np.asarray(state.gradient_estimator_states[0].pos_state.task_param.scales)
  assert scales[1].shape == (16,)
  assert len(np.unique(scales[1])) == 16  # every task its own scale
  np.testing.assert_array_equal(scales[1], scales[8])


class _TwoVectorTask(base_lib.Task):
  """Reference-style task: assigns host ``datasets`` in ``__init__``; params two ones(2)."""

  def __init__(self):
    self.datasets = datasets_base.Datasets(*(iter(lambda: np.ones(8, np.int32), None)
                                             for _ in range(4)),
                                           abstract_batch=jax.ShapeDtypeStruct((8,), jnp.int32))

  def init(self, key):
    return (jnp.ones(2), jnp.ones(2))

  def loss(self, params, key, data):
    return jnp.sum(params[0] + params[1])


class _TwoVectorFamily(base_lib.TaskFamily):

  def __init__(self):
    self.datasets = _TwoVectorTask().datasets

  def sample(self, key):
    return {"cfg": 123}

  def task_fn(self, cfg):
    return _TwoVectorTask()


@pytest.mark.parametrize("scale,first,second", [
    (2.0, [0.5, 0.5], [0.5, 0.5]),
    ((2.0, 0.5), [0.5, 0.5], [2.0, 2.0]),
    ((jnp.asarray([2.0, 0.5]), 0.5), [0.5, 2.0], [2.0, 2.0])])
def test_reparam_weights_task_with_scalar_tuple_and_array_scales(scale, first, second):
  task = augmentation.ReparamWeights(_TwoVectorTask(), scale)
  key = jax.random.PRNGKey(0)  # the reference's raw keys work too
  w = task.init(key)
  np.testing.assert_allclose(w[0], first)
  np.testing.assert_allclose(w[1], second)
  np.testing.assert_allclose(task.loss(w, key, None), 4.0)  # same function value
  assert task.datasets.abstract_batch.shape == (8,)
  test_utils.smoketest_task(task)


def test_family_levels_share_or_split_scales_as_the_reference():
  fam = _TwoVectorFamily()
  g = augmentation.ReparamWeightsFamily(fam, "global", (1.0, 100.0))
  p0 = g.sample_task(jax.random.PRNGKey(0)).init(jax.random.PRNGKey(0))
  p1 = g.sample_task(jax.random.PRNGKey(1)).init(jax.random.PRNGKey(0))
  assert float(p0[0][0]) == float(p0[0][1]) == float(p0[1][0])
  assert float(np.sum((p0[0] - p1[0]) ** 2)) > 1e-3
  t = augmentation.ReparamWeightsFamily(fam, "tensor", (1e-3, 10.0))
  p = t.sample_task(jax.random.PRNGKey(0)).init(jax.random.PRNGKey(0))
  assert float(p[0][0]) == float(p[0][1]) and float(p[1][0]) == float(p[1][1])
  assert (float(p[0][0]) - float(p[1][0])) ** 2 > 1e-3
  e = augmentation.ReparamWeightsFamily(fam, "parameter", (1e-3, 10.0))
  task = e.sample_task(jax.random.PRNGKey(0))
  p = task.init(jax.random.PRNGKey(0))
  assert (float(p[0][0]) - float(p[0][1])) ** 2 > 1e-3
  # the scales belong to the sampled task, not to the init key
  assert float(task.init(jax.random.PRNGKey(1))[0][0]) == float(p[0][0])
  test_utils.smoketest_task_family(e)
