"""Build a C++ XLA FFI kernel shipped as source, once per machine, and load it.

The library is compiled with ``$CXX`` (default ``c++``) against the FFI headers of the
installed jaxlib, ``-O3 -march=native``, into a cache directory
(``$SPMD_LOPT_KERNEL_CACHE``, default ``~/.cache/spmd_lopt/kernels``; a per-user folder
under the system's temporary directory when that one cannot be created) under a name that
hashes the source, the flags, the compiler, jaxlib's version and the CPU's model and
feature flags: a home directory shared by machines of different CPUs (a pod's hosts, a
cluster) never loads a library built for another instruction set. The compiler writes to
a temporary name that is renamed into place, so processes building at once (pytest
workers, a multi-host launch) each see either no library or a whole one.

No compiler, a failed build, or ``SPMD_LOPT_KERNELS=0`` in the environment: ``load``
returns None and says why once (``reason``); callers fall back to their JAX reference.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from typing import Optional

from absl import logging

ENV_DISABLE = "SPMD_LOPT_KERNELS"
ENV_CACHE = "SPMD_LOPT_KERNEL_CACHE"
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-std=c++17", "-shared", "-fPIC", "-w")

_lock = threading.Lock()
_loaded: dict[str, Optional[ctypes.CDLL]] = {}
_reasons: dict[str, str] = {}


def enabled() -> bool:
  """False when ``SPMD_LOPT_KERNELS`` is set to 0, false, no or off."""
  return os.environ.get(ENV_DISABLE, "1").strip().lower() not in ("0", "false", "no", "off")


def cache_dir() -> str:
  """The configured cache directory (it may not exist yet, or not be creatable)."""
  return os.environ.get(ENV_CACHE) or os.path.join(
      os.path.expanduser("~"), ".cache", "spmd_lopt", "kernels")


def _usable_cache_dir() -> str:
  """``cache_dir()`` if it exists or can be created and written, else a per-user folder
  under the temporary directory (a read-only home, a container without one)."""
  for d in (cache_dir(), os.path.join(tempfile.gettempdir(),
                                      f"spmd_lopt_kernels_{os.getuid()}")):
    try:
      os.makedirs(d, exist_ok=True)
    except OSError:
      continue
    if os.access(d, os.W_OK):
      return d
  raise OSError(f"no writable kernel cache: {cache_dir()} nor the temporary directory")


def _cpu_fingerprint() -> str:
  """The CPU model and feature flags (what ``-march=native`` compiles for)."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
      lines = [l for l in f if l.startswith(("model name", "flags", "Features", "CPU part"))]
    return "".join(sorted(set(lines)))
  except OSError:
    return platform.processor() + platform.machine()


def _compiler_id(cxx: str) -> str:
  try:
    out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60)
    return out.stdout.splitlines()[0] if out.stdout else ""
  except (OSError, subprocess.SubprocessError):
    return ""


def library_path(source: str, cxx: str, directory: Optional[str] = None) -> str:
  """Where the library of ``source`` built by ``cxx`` on this machine lives."""
  import jaxlib  # pylint: disable=import-outside-toplevel
  with open(source, "rb") as f:
    text = f.read()
  h = hashlib.sha256()
  for part in (text, " ".join(FLAGS).encode(), _compiler_id(cxx).encode(),
               jaxlib.__version__.encode(), _cpu_fingerprint().encode()):
    h.update(part)
    h.update(b"\0")
  name = os.path.splitext(os.path.basename(source))[0]
  return os.path.join(directory or cache_dir(), f"{name}-{h.hexdigest()[:16]}.so")


def _build(source: str, cxx: str, target: str) -> None:
  """Compile ``source`` to ``target`` (in an existing directory) via a temporary name."""
  import jax  # pylint: disable=import-outside-toplevel
  fd, tmp = tempfile.mkstemp(suffix=".so.tmp", dir=os.path.dirname(target))
  os.close(fd)
  try:
    cmd = [cxx, *FLAGS, "-I", jax.ffi.include_dir(), source, "-o", tmp]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
      raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
    os.replace(tmp, target)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def load(source: str) -> Optional[ctypes.CDLL]:
  """The compiled library of ``source`` (building it on first use), or None (see
  ``reason``). Thread-safe; builds at most once per process."""
  with _lock:
    if source in _loaded:
      return _loaded[source]
    lib, why = None, ""
    cxx = os.environ.get("CXX", "c++")
    if not enabled():
      why = f"{ENV_DISABLE}={os.environ.get(ENV_DISABLE)}"
    elif shutil.which(cxx) is None:
      why = f"no C++ compiler ({cxx!r} is not on PATH)"
    else:
      try:
        path = library_path(source, cxx, _usable_cache_dir())
        if not os.path.exists(path):
          _build(source, cxx, path)
        lib = ctypes.cdll.LoadLibrary(path)
      except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        why = f"building {os.path.basename(source)} failed: {e}"
    if lib is None and why and enabled():
      logging.warning("spmd_lopt kernels: %s; using the JAX reference instead.", why)
    _loaded[source] = lib
    _reasons[source] = why
    return lib


def reason(source: str) -> str:
  """Why ``load(source)`` returned None ("" if it did not or was not called)."""
  return _reasons.get(source, "")
