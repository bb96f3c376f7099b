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


def test_mean_and_sum_packed_is_pmean_and_psum_bit_for_bit(devices):
  """Float means and int32 sums in one float32 operand: the same bits as ``lax.pmean`` and
  ``lax.psum``, for counts near the int32 range, negative ones and a wrapping sum."""
  mesh = sharding.make_mesh(num_devices=4)
  k = jax.random.split(jax.random.key(1), 2)
  means = {"w": jax.random.normal(k[0], (4, 3, 5)), "s": jax.random.normal(k[1], (4,))}
  sums = jnp.array([[0, 1, 2047, 2048], [2**31 - 1, 5, -1, 123456789],
                    [7, 2**30, -2**31, 4194303], [2**31 - 1, 0, 3, 1]], jnp.int32)

  def body(m, c):
    m, c = jax.tree.map(lambda x: x[0], (m, c))
    packed = sharding.mean_and_sum_packed(m, c, "tasks")
    return packed, (jax.tree.map(lambda x: jax.lax.pmean(x, "tasks"), m),
                    jax.lax.psum(c, "tasks"))

  placed = jax.device_put((means, sums), sharding.task_sharded(mesh, "tasks"))
  fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("tasks"), out_specs=P()))
  (pm, pc), (rm, rc) = fn(*placed)
  for name in means:
    np.testing.assert_array_equal(np.asarray(pm[name]), np.asarray(rm[name]))
  assert pc.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(pc), np.asarray(rc))
  np.testing.assert_array_equal(  # the host's int64 sum, wrapped to int32
      np.asarray(pc), np.sum(np.asarray(sums, np.int64), 0).astype(np.int32))
  packed_only = jax.jit(jax.shard_map(
      lambda m, c: sharding.mean_and_sum_packed(*jax.tree.map(lambda x: x[0], (m, c)),
                                                "tasks"),
      mesh=mesh, in_specs=P("tasks"), out_specs=P()))
  assert _all_reduce_operands(packed_only.lower(*placed).compile().as_text()) == [1]


def test_learner_step_all_reduces_one_operand(devices):
  """Two estimators, each with a 4-leaf meta-gradient (LearnableAdam), a loss and 2
  counts, on a 2-device mesh, with metrics (as ``launch`` runs it): reduced leaf by leaf,
  that is 10 or more operands; per dtype, two independent all-reduces, which XLA CPU may
  run at once on its two intra-op threads and deadlock (``mean_and_sum_packed``)."""
  lrn = helpers.learner(2, lambda lopt: [helpers.pes_estimator(lopt, num_tasks=2, dim=4,
                                                               trunc_length=2)
                                         for _ in range(2)],
                        lopt=lopt_base.LearnableAdam())
  key = jax.random.key(0)
  state = lrn.init(key)
  for with_metrics in (False, True):
    hlo = lrn.lower_update(state, key, with_metrics=with_metrics).compile().as_text()
    assert _all_reduce_operands(hlo) == [1], (with_metrics, _all_reduce_operands(hlo))
