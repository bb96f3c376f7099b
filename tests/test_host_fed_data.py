"""Data in the fused step: the reference's host-fed path (``datas_list``: batches made on
the host, passed in sharded over tasks) and the task families' data sets, which reach
every compiled program as replicated arguments rather than embedded constants."""

import jax
import numpy as np
import pytest

from spmd_lopt import sharding
from spmd_lopt.bench import cost_model
from spmd_lopt.learned_optimizers import base as lopt_base
from spmd_lopt.learned_optimizers import mlp_lopt
from spmd_lopt.optimizers import base as opt_base
from spmd_lopt.outer_trainers import gradient_learner
from spmd_lopt.tasks import registry

from helpers import pes_estimator, global_rel_err

T, N = 3, 8


def _learner(num_devices, lopt=None, num_tasks=N, **kwargs):
  lopt = lopt or mlp_lopt.MLPLOpt(hidden_size=8, hidden_layers=1)
  family = registry.get_task_family("ImageMLP_Digits8_Relu32")
  est = pes_estimator(lopt, num_tasks=num_tasks, trunc_length=T, min_length=5,
                      max_length=10, offset=0, family=family)
  return gradient_learner.SpmdGradientLearner(
      lopt, [est], opt_base.Adam(1e-3), mesh=sharding.make_mesh(num_devices=num_devices),
      **kwargs)


def _host_batches(seed):
  rng = np.random.default_rng(seed)
  return ({"image": rng.uniform(size=(T, N, 128, 8, 8, 1)).astype(np.float32),
           "label": rng.integers(0, 10, size=(T, N, 128)).astype(np.int32)},)


@pytest.mark.slow  # kept out of the default run for time; `-m slow` runs it
def test_host_fed_batches_are_used_and_device_count_invariant(devices):
  losses, thetas = {}, {}
  for n in (1, 4):
    lrn = _learner(n)
    state = lrn.init(jax.random.key(0))
    datas = lrn.shard_datas(_host_batches(0))
    assert datas[0]["image"].sharding.spec == jax.P(None, "tasks")
    state, loss, _ = lrn.update(state, jax.random.key(1), datas=datas)
    losses[n], thetas[n] = float(loss), lrn.get_meta_params(state)
  assert abs(losses[4] - losses[1]) / losses[1] < 1e-5
  assert global_rel_err(thetas[4], thetas[1]) < 1e-5
  # Other batches give another meta-loss: the host data is what the tasks train on.
  lrn = _learner(1)
  state = lrn.init(jax.random.key(0))
  _, other, _ = lrn.update(state, jax.random.key(1), datas=lrn.shard_datas(_host_batches(1)))
  assert float(other) != losses[1]


def test_host_fed_batches_of_the_wrong_shape_are_a_clear_error():
  lrn = _learner(1)
  state = lrn.init(jax.random.key(0))
  bad = jax.tree.map(lambda x: x[:, :4], _host_batches(0))
  with pytest.raises(ValueError, match=r"num_tasks=8"):
    lrn.update(state, jax.random.key(1), datas=bad)


def test_datasets_are_step_arguments_not_constants(devices):
  """The digits reach the compiled meta step as a replicated argument: the lowered program
  holds no constant of the train split's size (it does when the learner closes over the
  data), and the meta step computes the same numbers either way."""
  train_bytes = registry.get_task_family("ImageMLP_Digits8_Relu32").datasets.images[
      "train"].nbytes
  out = {}
  for as_args in (True, False):
    # The cheapest learned optimizer to compile: the data path is under test, not it.
    lrn = _learner(2, lopt=lopt_base.LearnableSGD(), num_tasks=2,
                   datasets_as_arguments=as_args)
    state = lrn.init(jax.random.key(0))
    size = cost_model.program_size(lrn.lower_update(state, jax.random.key(1)))
    state, loss, _ = lrn.update(state, jax.random.key(1))
    out[as_args] = (size, float(loss), lrn.get_meta_params(state))
  assert out[True][0]["largest_constant_bytes"] < train_bytes // 10
  assert out[False][0]["largest_constant_bytes"] >= train_bytes
  assert out[True][0]["text_bytes"] < out[False][0]["text_bytes"] - train_bytes
  np.testing.assert_allclose(out[True][1], out[False][1], rtol=1e-6)
  assert global_rel_err(out[True][2], out[False][2]) < 1e-6
