"""Fuzzed config surface: every key of the full config (for every learned optimizer and
every estimator) gets wrong types, out-of-range and extreme values. Each case must either
build a learner (abstractly: ``jax.eval_shape`` of its init, no meta step) or raise one
``ValueError`` line that names the key; any other exception fails the test.

The default run tries ``FUZZ_EXAMPLES`` cases; ``-m slow`` tries ``SLOW_EXAMPLES``. The
number of cases tried is printed (``-s``) and recorded in ``CASES``.
"""

import copy
import os

import jax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spmd_lopt import config as config_lib
from spmd_lopt import sharding
from spmd_lopt.config import builders, loading
from spmd_lopt.learned_optimizers import registry

FUZZ_EXAMPLES = int(os.environ.get("CONFIG_FUZZ_EXAMPLES", "100"))
SLOW_EXAMPLES = 3000
CASES = {"built": 0, "refused": 0}

BAD_VALUES = st.one_of(
    st.sampled_from([None, True, False, "", "abc", "1", [], [1], [1.0, "x"], {}, {"a": 1},
                     0, -1, 1, 2, 3, 7, 2**31, 2**63, -2**63, 10**30, 0.0, -0.0, 1e-320,
                     1e308, -1e308, float("nan"), float("inf"), float("-inf"), 0.5, -0.5,
                     "pes", "mlp_lopt", "quadratic", "(", "\u00e9\u6f22", "a\nb"]),
    st.integers(min_value=-2**40, max_value=2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
)


def _base(lopt_name: str, estimator: str):
  """A cheap full-form config with every key written out (``fill_defaults``)."""
  c = dict(name="fuzz", outer_steps=4, log_every=2, lopt=dict(name=lopt_name),
           outer_opt=dict(name="adam", schedule=dict(name="cosine")),
           estimators=[dict(name=estimator, task="quadratic", task_kwargs=dict(dim=2),
                            num_tasks=8, trunc_length=2, std=0.1,
                            truncation=dict(name="log_uniform", min_length=4, max_length=8),
                            random_initial_iteration_offset=4)])
  return builders.resolve(c, fill_defaults=True)


def _leaf_paths(tree, prefix=()):
  if isinstance(tree, dict):
    out = [prefix] if prefix else []
    for k, v in tree.items():
      out += _leaf_paths(v, prefix + (k,))
    return out
  if isinstance(tree, list):
    out = [prefix]
    for i, v in enumerate(tree):
      out += _leaf_paths(v, prefix + (i,))
    return out
  return [prefix]


def _set(cfg, path, value):
  node = cfg
  for p in path[:-1]:
    node = node[p]
  node[path[-1]] = value


_MESH = {}


def _check_case(cfg, path):
  """Build abstractly; a refusal must be one line naming the key (or its section)."""
  if "mesh" not in _MESH:
    _MESH["mesh"] = sharding.make_mesh(num_devices=8)
  try:
    learner, _ = config_lib.abstract_learner_state(cfg, mesh=_MESH["mesh"])
  except ValueError as e:
    msg = str(e)
    assert "\n" not in msg, (path, msg)
    names = [str(p) for p in path if not isinstance(p, int)]
    # the key itself, or (for a section replaced wholesale) the section it sits in
    assert any(n in msg for n in names[-2:]) or names[-1] in msg or (
        path[-1] in ("name",) and path[0] in msg), (path, msg)
    CASES["refused"] += 1
    return
  CASES["built"] += 1
  if cfg["lopt"]["name"] in ("learnable_adam", "learnable_sgd"):  # cheap to init for real
    theta = learner.meta_init.init(jax.random.key(0))
    assert all(bool(jax.numpy.all(jax.numpy.isfinite(t))) for t in jax.tree.leaves(theta)), (
        path, cfg["lopt"])


def _fuzz(data):
  lopt_name = data.draw(st.sampled_from(registry.names()), label="lopt")
  estimator = data.draw(st.sampled_from(builders.ESTIMATORS), label="estimator")
  cfg = _base(lopt_name, estimator)
  path = data.draw(st.sampled_from(_leaf_paths(cfg)), label="key")
  value = data.draw(BAD_VALUES, label="value")
  _set(cfg, path, copy.deepcopy(value))
  _check_case(cfg, path)


_SETTINGS = dict(deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.too_slow,
                                        HealthCheck.data_too_large])


@settings(max_examples=FUZZ_EXAMPLES, **_SETTINGS)
@given(st.data())
def test_fuzzed_config_values_build_or_fail_in_one_line(data):
  _fuzz(data)


@pytest.mark.slow
@settings(max_examples=SLOW_EXAMPLES, **dict(_SETTINGS, derandomize=False))
@given(st.data())
def test_fuzzed_config_values_many(data):
  _fuzz(data)


@settings(max_examples=200, **_SETTINGS)
@given(key=st.sampled_from(["estimators.0.num_tasks", "estimators.0.std", "outer_steps",
                            "lopt.initial_lr", "outer_opt.schedule.alpha", "frozen",
                            "estimators.0.options.stack_antithetic_samples",
                            "estimators.0.augmentation.param_scale_range", "seed"]),
       raw=st.one_of(st.text(max_size=12), st.sampled_from(
           ["1e400", "-1", "nan", "inf", "[1,2]", "{}", "None", "true", "0x10", "1_0"])))
def test_fuzzed_command_line_overrides_parse_or_fail_in_one_line(key, raw):
  plain = builders.resolve(dict(lopt=dict(name="learnable_adam"),
                                estimators=[dict(task="quadratic")]))
  try:
    loading.apply_override(plain, key, raw)
    builders.resolve(plain)
  except ValueError as e:
    assert "\n" not in str(e)
    assert key.split(".")[-1] in str(e) or key.split(".")[-2] in str(e), (key, raw, str(e))


def test_report_fuzz_counts():
  """Runs last in this file: the counts of the default fuzz run (printed with -s)."""
  total = CASES["built"] + CASES["refused"]
  print(f"\nconfig fuzz: {total} cases, {CASES['built']} built, {CASES['refused']} refused")
  # when the fuzz ran, it must have produced both outcomes (else the strategy is broken)
  assert total == 0 or (CASES["refused"] > 0 and CASES["built"] > 0)
