"""spmd_lopt.summary writers and spmd_lopt.tree_utils helpers."""

import importlib.util
import json

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spmd_lopt import summary, tree_utils


# --- summary ----------------------------------------------------------------------------

def test_jsonl_writer_is_strict_json(tmp_path):
  path = tmp_path / "logs" / "m.jsonl"
  w = summary.JSONLWriter(str(path))
  w.scalar("loss", jnp.float32(0.5), 1)
  w.scalar("loss", float("nan"), 2)
  w.histogram("g", np.array([1.0, 3.0, np.inf]), 2)
  w.flush()
  w.close()
  lines = path.read_text().splitlines()
  records = [json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict {c}"))
             for line in lines]
  assert records[0] == {"step": 1, "name": "loss", "value": 0.5}
  assert records[1]["value"] is None
  assert records[2]["histogram"] == {"count": 2, "min": 1.0, "max": 3.0, "mean": 2.0,
                                     "std": 1.0}


def test_print_and_multi_writer(tmp_path, capsys):
  path = tmp_path / "m.jsonl"
  w = summary.MultiWriter(summary.PrintWriter(), summary.JSONLWriter(str(path)))
  w.write_scalars(3, {"a": 1.25, "b": 2})
  w.close()
  assert capsys.readouterr().out.splitlines() == ["3 a 1.25", "3 b 2.0"]
  assert [json.loads(x)["name"] for x in path.read_text().splitlines()] == ["a", "b"]


def test_tensorboard_writer_needs_tensorboardx(tmp_path):
  if importlib.util.find_spec("tensorboardX") is None:
    with pytest.raises(ImportError, match="tensorboardX.*not installed"):
      summary.TensorboardWriter(str(tmp_path))
  else:
    w = summary.TensorboardWriter(str(tmp_path))
    w.scalar("x", 1.0, 0)
    w.close()
    assert any(p.name.startswith("events.") for p in tmp_path.iterdir())
  assert summary.JaxboardWriter is summary.TensorboardWriter


def test_aggregate_metric_list():
  out = summary.aggregate_metric_list([
      {"mean||loss": 1.0, "sample||x": 5, "collect||c": np.array([1, 2])},
      {"mean||loss": 3.0, "sample||x": 6, "collect||c": np.array([3])}])
  assert out["mean||loss"] == 2.0 and out["sample||x"] == 5
  np.testing.assert_array_equal(out["collect||c"], [1, 2, 3])
  with pytest.raises(ValueError, match="aggregation prefix"):
    summary.aggregate_metric_list([{"loss": 1.0}])
  # The reference's in-graph summary call is accepted (and records nothing) under jit.
  assert float(jax.jit(lambda x: summary.summary("x", x * 2, aggregation="sample"))(1.0)) == 2
  with pytest.raises(ValueError, match="unknown aggregation"):
    summary.summary("x", 1.0, aggregation="max")


# --- tree_utils ---------------------------------------------------------------------------

_floats = st.floats(-1e3, 1e3, allow_nan=False, width=32)


@settings(max_examples=25, deadline=None)
@given(st.lists(_floats, min_size=1, max_size=6), st.lists(_floats, min_size=1, max_size=6),
       st.floats(0.5, 4.0, width=32))
def test_tree_arithmetic_properties(xs, ys, c):
  a = {"x": np.asarray(xs, np.float32), "y": (np.asarray(ys, np.float32),)}
  b = jax.tree.map(lambda v: v[::-1].copy(), a)
  back = tree_utils.tree_sub(tree_utils.tree_add(a, b), b)
  for u, v in zip(jax.tree.leaves(back), jax.tree.leaves(a)):
    np.testing.assert_allclose(u, v, atol=1e-3)
  np.testing.assert_allclose(tree_utils.tree_norm(a) ** 2, tree_utils.tree_dot(a, a),
                             rtol=1e-4, atol=1e-3)
  scaled = tree_utils.tree_div(tree_utils.tree_mul(a, c), c)
  for u, v in zip(jax.tree.leaves(scaled), jax.tree.leaves(a)):
    np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-4)
  everything = np.concatenate([np.ravel(v) for v in jax.tree.leaves(a)])
  np.testing.assert_allclose(tree_utils.tree_mean_abs(a), np.mean(np.abs(everything)),
                             rtol=1e-5, atol=1e-4)


def test_mean_zeros_ones_and_strip_weak_type():
  tree = {"a": jnp.arange(4.0), "b": (jnp.full((2, 2), 3, jnp.int32),)}
  np.testing.assert_allclose(tree_utils.tree_mean(tree), (0 + 1 + 2 + 3 + 4 * 3) / 8)
  for fn, value in ((tree_utils.tree_zeros_like, 0), (tree_utils.tree_ones_like, 1)):
    out = fn(tree)
    assert jax.tree.structure(out) == jax.tree.structure(tree)
    for o, t in zip(jax.tree.leaves(out), jax.tree.leaves(tree)):
      assert o.shape == t.shape and o.dtype == t.dtype and np.all(np.asarray(o) == value)
  weak = {"x": jnp.asarray(2.0), "y": jnp.float32(1.0) * 3}
  assert weak["x"].weak_type
  strong = tree_utils.strip_weak_type(weak)
  assert not any(leaf.weak_type for leaf in jax.tree.leaves(strong))
  np.testing.assert_array_equal(strong["x"], 2.0)


def test_zip_unzip_match_type_and_named_paths():
  trees = [{"a": jnp.full((2,), i, jnp.float32), "b": jnp.asarray(i)} for i in range(3)]
  stacked = tree_utils.tree_zip_onp(trees)
  assert isinstance(stacked["a"], np.ndarray) and stacked["a"].shape == (3, 2)
  assert tree_utils.first_dim(stacked) == 3
  assert int(tree_utils.tree_unzip(tree_utils.tree_zip_jnp(trees))[2]["b"]) == 2
  cast = tree_utils.match_type({"a": np.ones(2), "b": 1.0},
                               {"a": jnp.ones(2, jnp.float16), "b": jnp.int32(0)})
  assert cast["a"].dtype == jnp.float16 and cast["b"].dtype == jnp.int32
  with pytest.raises(ValueError, match="without a dtype"):
    tree_utils.match_type({"a": 1}, {"a": 1})

  @flax.struct.dataclass
  class S:
    w: jax.Array

  tree = {"net": [S(jnp.ones(2))], "lr": jnp.ones(())}
  paths = tree_utils.map_named(lambda k, v: k, tree)
  assert paths == {"net": [S("/net/0/S.w")], "lr": "/lr"}
  doubled = tree_utils.map_named(lambda k, v: v * 2 if k.endswith("S.w") else v, tree)
  np.testing.assert_array_equal(doubled["net"][0].w, [2.0, 2.0])

  groups, how = tree_utils.partition([lambda k, v: "net" in k], tree)
  assert len(groups[0]) == 1 and len(groups[1]) == 1
  rebuilt = tree_utils.partition_unflatten(how, groups)
  assert jax.tree.structure(rebuilt) == jax.tree.structure(tree)
