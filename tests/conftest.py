"""Test set-up: eight virtual CPU devices, set before jax is imported anywhere."""

import atexit
import os
import shutil
import tempfile

# Must happen before the first `import jax`: the CPU backend reads the flag once.
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# A persistent compilation cache for this session only, in the environment so that the
# pytest-xdist workers and the CLI tests' child processes share it: many tests build the
# same learner program (and a resumed CLI run the program its first launch compiled), and
# XLA's compile is most of their time. Each test still traces and lowers its own program;
# only an identical HLO module is reused. Multi-process tests take it out of their
# children's environment (tests/test_multihost.py). A cache the caller set is left alone.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache_dir = tempfile.mkdtemp(prefix="spmd_lopt_test_xla_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")
  atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)

import jax  # noqa: E402  (after the flag on purpose)
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def devices():
  devs = jax.devices()
  assert len(devs) >= 8, "tests expect 8 virtual CPU devices (see tests/conftest.py)"
  return devs
