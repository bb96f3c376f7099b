"""Every registered learned optimizer inside the fused, sharded meta step.

The unit tests of each optimizer run it outside ``shard_map``; here each one trains
quadratics on a 2-device mesh with trajectories short enough that tasks reset inside the
unroll, which exercises the reset branch (``lax.cond``) on the optimizer's own state pytree
(Celo2's factored moments of a vector are empty arrays: they once lost their varying mesh
axes there).
"""

import jax
import numpy as np
import pytest

from spmd_lopt.learned_optimizers import registry

import helpers


@pytest.mark.parametrize("name", [
    "celo2",
    pytest.param("celo2_base", marks=pytest.mark.slow),
    pytest.param("adafac_mlp_lopt", marks=pytest.mark.slow),
    "learnable_sgdm"])
def test_update_with_resets_inside_shard_map(name):
  lopt = registry.get(name)()
  est = lambda lo: [helpers.pes_estimator(lo, num_tasks=4, dim=4, trunc_length=4,
                                          min_length=3, max_length=5, offset=5)]
  learner = helpers.learner(2, est, lopt=lopt)
  state = learner.init(jax.random.key(0))
  theta0 = jax.device_get(learner.get_meta_params(state))  # the state is donated
  for i in range(2):
    state, loss, _ = learner.update(state, jax.random.key(i + 1))
    assert np.isfinite(float(loss))
  moved = jax.tree.leaves(jax.tree.map(
      lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
      learner.get_meta_params(state), theta0))
  assert max(moved) > 0
