"""The reference's host-fed data path (``datas_list``): batches made on the host and passed
into the fused step, sharded over tasks, instead of drawn on device."""

import jax
import numpy as np
import pytest

from spmd_lopt import sharding
from spmd_lopt.learned_optimizers import mlp_lopt
from spmd_lopt.optimizers import base as opt_base
from spmd_lopt.outer_trainers import gradient_learner
from spmd_lopt.tasks import registry

from helpers import pes_estimator, global_rel_err

T, N = 3, 8


def _learner(num_devices):
  lopt = mlp_lopt.MLPLOpt(hidden_size=8, hidden_layers=1)
  family = registry.get_task_family("ImageMLP_Digits8_Relu32")
  est = pes_estimator(lopt, num_tasks=N, trunc_length=T, min_length=5, max_length=10,
                      offset=0, family=family)
  return gradient_learner.SpmdGradientLearner(
      lopt, [est], opt_base.Adam(1e-3), mesh=sharding.make_mesh(num_devices=num_devices))


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
