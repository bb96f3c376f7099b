"""Meta-training with a known answer: PES moves ``LearnableAdam``'s learning rate toward the
best fixed learning rate of a sweep on the same task family and horizon."""

import jax
import jax.numpy as jnp
import numpy as np

from spmd_lopt import evaluate, sharding
from spmd_lopt.learned_optimizers.base import LearnableAdam
from spmd_lopt.optimizers import base as opt_base
from spmd_lopt.outer_trainers import (gradient_learner, lopt_truncated_step, truncated_pes,
                                      truncation_schedule)
from spmd_lopt.tasks import quadratics

HORIZON = 50  # every inner trajectory: 50 Adam steps on a fresh 10-d quadratic bowl


def _mean_training_loss(family, make_opt, hparams, num_tasks=128):
  """f32[H]: the meta-objective, the training loss averaged over the HORIZON steps and
  over num_tasks sampled tasks (the same tasks and inits for every hparams[h])."""
  fn = jax.jit(evaluate.sweep_fn(family, make_opt, HORIZON, eval_every=HORIZON,
                                 eval_batches=1))
  curves = fn(hparams, jax.random.split(jax.random.key(123), num_tasks))
  return np.asarray(curves["train/loss"]).mean(axis=(1, 2))


def test_pes_moves_learnable_adam_lr_toward_the_best_fixed_lr():
  family = quadratics.FixedDimQuadraticFamily(10)
  lrs = np.exp(np.linspace(np.log(1e-3), np.log(1.0), 16)).astype(np.float32)
  sweep = _mean_training_loss(family, opt_base.Adam, jnp.asarray(lrs))
  i_best = int(np.argmin(sweep))
  assert 0 < i_best < len(lrs) - 1, sweep  # the grid brackets the optimum
  best_lr = float(lrs[i_best])  # ~0.63 here: Adam moves ~lr per coordinate per step

  lopt = LearnableAdam(initial_lr=best_lr / 10)  # start 10x too small
  step = lopt_truncated_step.VectorizedLOptTruncatedStep(
      family, lopt, truncation_schedule.ConstantTruncationSchedule(HORIZON), num_tasks=16,
      random_initial_iteration_offset=HORIZON)
  # PES over truncations of 10 steps: unbiased for the whole 50-step trajectory's loss.
  pes = truncated_pes.TruncatedPES(truncated_step=step, trunc_length=10, std=0.05)
  # A 4-parameter theta tolerates a large outer lr; log_lr must travel log(10) = 2.3.
  learner = gradient_learner.SpmdGradientLearner(lopt, [pes], opt_base.Adam(3e-2),
                                                 mesh=sharding.make_mesh(num_devices=1))
  state = learner.init(jax.random.key(0))
  state, losses, _ = learner.update_many(state, jax.random.key(1), 300)
  theta = jax.device_get(learner.get_meta_params(state))

  d0 = abs(np.log(best_lr / 10) - np.log(best_lr))
  d1 = abs(float(theta["log_lr"]) - np.log(best_lr))
  assert np.all(np.isfinite(np.asarray(losses)))
  assert d1 < 0.5 * d0, (best_lr, float(np.exp(theta["log_lr"])), d1 / d0)  # ~0.15 here
  # The other hyper-parameters (the betas) were meta-trained too, so the learned Adam
  # must be at least as good as the best fixed lr with default betas, on the same tasks.
  learned = _mean_training_loss(family, lopt.opt_fn,
                                jax.tree.map(lambda x: jnp.asarray(x)[None], theta))[0]
  assert learned <= 1.05 * sweep[i_best], (learned, sweep[i_best])
