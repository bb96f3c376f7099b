"""Training curves in one jit: shapes, eval schedule, learning, seeds, learned optimizers."""

import jax
import numpy as np
import pytest

from spmd_lopt import eval_training as E
from spmd_lopt.learned_optimizers.base import LearnableSGD
from spmd_lopt.optimizers.base import Adam
from spmd_lopt.tasks import quadratics
from spmd_lopt.tasks.fixed import image_mlp


@pytest.fixture(scope="module")
def task():
  return image_mlp.ImageMLP_Digits8_Relu32(batch_size=64)


def test_single_task_curves_shapes_schedule_and_learning(task):
  c = E.single_task_training_curves(task, Adam(1e-2), 65, jax.random.key(0), eval_every=20,
                                    eval_batches=3)
  assert set(c) == {"train/loss", "eval/step", "eval/train/loss", "eval/test/loss"}
  assert c["train/loss"].shape == (65,)
  np.testing.assert_array_equal(c["eval/step"], [0, 20, 40, 60, 65])
  assert c["eval/test/loss"].shape == (5,) and c["eval/train/loss"].shape == (5,)
  assert abs(c["eval/test/loss"][0] - np.log(10)) < 0.5  # untrained: near chance
  assert c["eval/test/loss"][-1] < 0.5 * c["eval/test/loss"][0]
  assert c["train/loss"][-10:].mean() < 0.5 * c["train/loss"][:5].mean()


def test_multi_seed_curves_and_learned_optimizer(task):
  lopt = LearnableSGD(initial_lr=0.5)
  opt = lopt.opt_fn(lopt.init(jax.random.key(0)))
  c = E.multi_seed_training_curves(task, opt, 40, jax.random.key(1), num_seeds=3,
                                   eval_every=20, eval_batches=2)
  assert c["train/loss"].shape == (3, 40) and c["eval/test/loss"].shape == (3, 3)
  np.testing.assert_array_equal(c["eval/step"], np.tile([0, 20, 40], (3, 1)))
  assert not np.allclose(c["train/loss"][0], c["train/loss"][1])  # seeds differ
  assert np.all(c["eval/test/loss"][:, -1] < c["eval/test/loss"][:, 0])


def test_curves_on_a_noisy_quadratic():
  fam = quadratics.RotatedNoisyQuadraticFamily(dim=4)
  t = fam.task_fn(fam.sample(jax.random.key(0)))
  a = E.single_task_training_curves(t, Adam(0.1), 30, jax.random.key(2), eval_every=10)
  assert a["train/loss"].shape == (30,) and np.all(np.isfinite(a["train/loss"]))
  assert a["eval/test/loss"][-1] < 0.5 * a["eval/test/loss"][0]
  with pytest.raises(ValueError, match="eval_every"):
    E.single_task_training_curves(t, Adam(0.1), 30, jax.random.key(2), eval_every=0)
