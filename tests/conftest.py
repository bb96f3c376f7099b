"""Test set-up: eight virtual CPU devices, set before jax is imported anywhere."""

import os

# Must happen before the first `import jax`: the CPU backend reads the flag once.
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (after the flag on purpose)
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def devices():
  devs = jax.devices()
  assert len(devs) >= 8, "tests expect 8 virtual CPU devices (see tests/conftest.py)"
  return devs
