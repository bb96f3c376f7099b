"""The learner reduces all estimators' meta-gradients with one all-reduce operand per dtype.

Why it matters: XLA's CPU runtime runs every operand of a tuple all-reduce as its own
cross-process (gloo) collective, each with a fixed latency of milliseconds, so the number
of operands, not of all-reduce ops, sets the multi-process step's collective cost
(``scripts/repro_two_process.py``).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from spmd_lopt import sharding
from spmd_lopt.learned_optimizers import base as lopt_base

import helpers


def _all_reduce_operands(hlo_text: str) -> list[int]:
  """Per all-reduce op of a compiled HLO module: how many arrays it reduces."""
  counts = []
  for line in hlo_text.splitlines():
    m = re.search(r"= (\(.*?\)|\S+) all-reduce(?:-start)?\(", line)
    if m:
      counts.append(m.group(1).count("[") if m.group(1).startswith("(") else 1)
  return counts


def test_pmean_packed_equals_per_leaf_reductions(devices):
  mesh = sharding.make_mesh(num_devices=4)
  k = jax.random.split(jax.random.key(0), 3)
  tree = {"w": jax.random.normal(k[0], (4, 3, 5)), "b": jax.random.normal(k[1], (4, 7)),
          "s": jax.random.normal(k[2], (4,)),
          "n": jnp.arange(8, dtype=jnp.int32).reshape(4, 2)}

  def body(t):
    t = jax.tree.map(lambda x: x[0], t)  # this device's block, leading axis dropped
    packed = sharding.pmean_packed({k: v for k, v in t.items() if k != "n"}, "tasks")
    packed["n"] = sharding.pmean_packed(t["n"], "tasks", jax.lax.psum)
    per_leaf = {k: jax.lax.pmean(v, "tasks") for k, v in t.items() if k != "n"}
    per_leaf["n"] = jax.lax.psum(t["n"], "tasks")
    return packed, per_leaf

  placed = jax.device_put(tree, sharding.task_sharded(mesh, "tasks"))
  packed, per_leaf = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("tasks"),
                                           out_specs=P()))(placed)
  for name in tree:
    assert packed[name].dtype == per_leaf[name].dtype, name
    np.testing.assert_array_equal(np.asarray(packed[name]), np.asarray(per_leaf[name]))
  # and the same as the mean the host computes
  np.testing.assert_allclose(np.asarray(packed["w"]), np.mean(np.asarray(tree["w"]), 0),
                             rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(packed["n"]), np.sum(np.asarray(tree["n"]), 0))


def test_learner_step_all_reduces_one_operand_per_dtype(devices):
  """Two estimators, each with a 4-leaf meta-gradient (LearnableAdam), a loss and 2
  counts, on a 2-device mesh: reduced leaf by leaf, that is 10 or more operands."""
  lrn = helpers.learner(2, lambda lopt: [helpers.pes_estimator(lopt, num_tasks=2, dim=4,
                                                               trunc_length=2)
                                         for _ in range(2)],
                        lopt=lopt_base.LearnableAdam())
  key = jax.random.key(0)
  state = lrn.init(key)
  hlo = lrn.lower_update(state, key).compile().as_text()
  operands = _all_reduce_operands(hlo)
  assert operands, "the 2-device step should all-reduce"
  assert sum(operands) <= 2, operands  # one f32 vector (grads, losses), one i32 (counts)
