"""Every held-out suite task: builds without files, has validation and test splits, and
trains (its test loss falls) under Adam in a few steps; the copy-task transformer is
causal and its data is what its docstring says."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spmd_lopt.evaluation import suite as S
from spmd_lopt.evaluation import training
from spmd_lopt.optimizers.base import Adam
from spmd_lopt.tasks.fixed import transformer_lm

# (steps, Adam lr): a few steps at a rate that moves each task quickly
FAST = {"NoisyQuadratic_10_cond1000": (20, 0.1), "TransformerLM_Copy8x8": (40, 1e-2),
        "Conv_Digits8_16x32": (30, 3e-2)}
# the costlier compiles run with the slow tests (ImageMLP_Digits8_Relu32 also trains under
# Adam in test_eval_training); the default run keeps the new digits task and the quadratic
SLOW = {"TransformerLM_Copy8x8", "Conv_Digits8_16x32", "ImageMLP_Digits8_Relu128x128",
        "ImageMLP_Digits8_Relu64x64x64", "LayerNormMLP_Digits8_64x64",
        "ImageMLP_Digits8_Relu32"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW
                                  else n for n in S.TASKS])
def test_suite_task_trains_under_adam(name):
  family = S.TASKS[name][0]()
  task = family.task_fn(family.sample(jax.random.key(0)))
  steps, lr = FAST.get(name, (20, 1e-2))
  c = training.single_task_training_curves(task, Adam(lr), steps, jax.random.key(1),
                                           eval_every=steps, eval_batches=2,
                                           eval_splits=(S.VALID_SPLIT, S.TEST_SPLIT))
  test, valid = c["eval/test/loss"], c[f"eval/{S.VALID_SPLIT}/loss"]
  assert np.all(np.isfinite(test)) and np.all(np.isfinite(valid))
  assert test[-1] < 0.9 * test[0] and valid[-1] < 0.9 * valid[0]


def test_suites_cover_the_brief():
  full = S.get_suite("full")
  assert {t.steps for t in full.tasks} == {S.MT_HORIZON, 5 * S.MT_HORIZON}
  assert {t.name for t in full.tasks} == set(S.TASKS) and full.seeds >= 5
  assert [b.name for b in full.baselines] == ["Adam", "AdamW", "SGDM"]
  assert all(len({p[0] for p in b.grid}) >= 7 for b in full.baselines)
  assert len({t.label for t in full.tasks}) == len(full.tasks)
  with pytest.raises(ValueError, match="unknown suite 'nope'; known: full, quick"):
    S.get_suite("nope")


@pytest.mark.slow  # ~10 s; the transformer task also trains in the slow suite tests
def test_copy_task_data_splits_and_causality():
  task = transformer_lm.CopyLMTask(num_symbols=5, length=4, batch_size=3, width=16)
  b = task.sample_batch(jax.random.key(0), "train")
  assert b.shape == (3, 9)
  np.testing.assert_array_equal(b[:, :4], b[:, 5:])
  assert np.all(b[:, 4] == 5) and np.all(b[:, :4] < 5)
  same_key = [task.sample_batch(jax.random.key(0), s) for s in ("valid", "test")]
  assert not np.array_equal(same_key[0], b) and not np.array_equal(same_key[1], b)
  params = task.init(jax.random.key(1))
  logits = task.module.apply({"params": params}, b[:, :-1])
  changed = b.at[:, 6].set((b[:, 6] + 1) % 5)
  logits2 = task.module.apply({"params": params}, changed[:, :-1])
  # position t only sees tokens <= t: the prefix up to 5 is unchanged
  np.testing.assert_allclose(logits[:, :6], logits2[:, :6], atol=1e-6)
  assert not np.allclose(logits[:, 6:], logits2[:, 6:])
  # untrained: the copied half is about chance, ln(V + 1) (random read-out adds ~0.5)
  assert abs(float(task.loss(params, None, b)) - np.log(6)) < 1.0
  with pytest.raises(ValueError, match="unknown split"):
    task.sample_batch(jax.random.key(0), "dev")


def test_quadratic_validation_and_test_are_noise_free():
  family = S.TASKS["NoisyQuadratic_10_cond1000"][0]()
  task = family.task_fn(family.sample(jax.random.key(0)))
  p = task.init(jax.random.key(1))
  losses = [task.loss(p, None, task.sample_batch(jax.random.key(i), "test"))
            for i in range(3)]
  assert len({float(l) for l in losses}) == 1 and float(losses[0]) > 0  # no noise
  noisy = [task.loss(p, None, task.sample_batch(jax.random.key(i), "train"))
           for i in range(3)]
  assert float(jnp.std(jnp.stack(noisy))) > 0
