"""What every kernel's Python side needs around ``jax.ffi``: registering a built library's
handler once, and restoring the shard_map mesh axes a custom call's results vary over."""

from __future__ import annotations

from typing import Sequence

import jax

from spmd_lopt.kernels import cpu_build

_registered: set = set()


def register(target: str, source: str, symbol: str) -> None:
  """Register the handler ``symbol`` of ``source``'s library as the CPU custom-call
  ``target`` (once per process; the caller has checked that the library loads)."""
  if target not in _registered:
    lib = cpu_build.load(source)
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                platform="cpu")
    _registered.add(target)


def varying_axes(x) -> set:
  """The shard_map mesh axes ``x`` varies over (empty outside shard_map)."""
  t = jax.typeof(x)
  mat = getattr(t, "manual_axis_type", None)  # jax >= 0.9; older versions call it vma
  return set(mat.varying if mat is not None else getattr(t, "vma", ()))


def varying_like(outs: Sequence[jax.Array], args: Sequence[jax.Array]) -> tuple:
  """``outs`` marked as varying over every mesh axis some of ``args`` vary over. Inside
  shard_map an FFI call's results carry no varying axes of their own (nor does a
  reference that passes an unvarying input through), and scan carries and the branches
  of ``platform_dependent`` must all have one type."""
  varying = set().union(*(varying_axes(a) for a in args))
  fixed = []
  for out in outs:
    missing = tuple(sorted(varying - varying_axes(out)))
    fixed.append(jax.lax.pcast(out, missing, to="varying") if missing else out)
  return tuple(fixed)
