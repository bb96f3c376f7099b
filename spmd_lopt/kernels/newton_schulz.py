"""Newton-Schulz orthogonalisation of small matrices, fused into one CPU kernel.

``apply(x, reference, iters)`` computes what ``reference(x)`` (the caller's XLA version,
e.g. ``celo2.newton_schulz``) does, for float32 ``x`` of shape ``[..., R, C]``: on CPU
through ``newton_schulz.cc`` (``jax.ffi``), every lane's iterations in cache with
register-tiled products; elsewhere, and for gradients (a ``custom_vjp`` through the
reference), the reference itself.
"""

from __future__ import annotations

import functools
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from spmd_lopt.kernels import cpu_build
from spmd_lopt.kernels import ffi_util

SOURCE = os.path.join(os.path.dirname(__file__), "newton_schulz.cc")
TARGET = "spmd_lopt_newton_schulz"


def unavailable() -> str:
  """Why the kernel cannot run here ("" if it can)."""
  if jax.default_backend() != "cpu":
    return f"the default backend is {jax.default_backend()}, not cpu"
  if cpu_build.load(SOURCE) is None:
    return cpu_build.reason(SOURCE)
  return ""


def _kernel_call(x, iters):
  ffi_util.register(TARGET, SOURCE, "SpmdLoptNewtonSchulz")
  call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(x.shape, jnp.float32),
                          vmap_method="broadcast_all")
  out = call(x, iters=np.int64(iters))
  return ffi_util.varying_like((out,), (x,))[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _fused(x, reference, iters):
  return jax.lax.platform_dependent(x, cpu=lambda a: _kernel_call(a, iters),
                                    default=reference)


def _fused_fwd(x, reference, iters):
  return _fused(x, reference, iters), x


def _fused_bwd(reference, iters, x, cotangent):
  del iters
  _, vjp = jax.vjp(reference, x)
  return vjp(cotangent)


_fused.defvjp(_fused_fwd, _fused_bwd)


def apply(x: jax.Array, reference: Callable, iters: int) -> jax.Array:
  """``reference(x)`` through the kernel (float32 ``x``, ``[..., R, C]``); ``reference``
  must be a module-level function (a static argument) running ``iters`` iterations."""
  return _fused(x, reference, iters)
