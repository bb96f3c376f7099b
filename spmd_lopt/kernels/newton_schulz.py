"""Newton-Schulz orthogonalisation of small matrices, fused into one CPU kernel.

``apply(x, reference, iters)`` computes what ``reference(x)`` (the caller's XLA version,
e.g. ``celo2.newton_schulz``) does, for float32 ``x`` of shape ``[..., R, C]``: on CPU
through ``newton_schulz.cc`` (``jax.ffi``), every lane's iterations in cache with
register-tiled products (~80% of one core's matmul peak on ``32 x 64``, where XLA's
separate library products reach ~47%); elsewhere, and for gradients (a ``custom_vjp``
through the reference), the reference itself. They agree to float rounding; lanes are
independent, so sharding does not change the numbers.
"""

from __future__ import annotations

import functools
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from spmd_lopt.kernels import ffi_util

SOURCE = os.path.join(os.path.dirname(__file__), "newton_schulz.cc")
TARGET = "spmd_lopt_newton_schulz"


# Larger matrices run faster as XLA's products (cache-blocked, multi-threaded on a device
# that owns several cores): one jitted 5-iteration call, 1 device, both cores free, XLA /
# kernel time: 128 x 256 1.59, 128 x 128 (4 lanes) 1.06, 256 x 256 0.79, 512 x 512 0.74.
MAX_SHORT_SIDE = 128
MAX_ENTRIES = 128 * 256


def shape_unsupported(shape) -> str:
  """Why the kernel is not used for a matrix of this shape (``[..., R, C]``; "" if it is)."""
  if len(shape) < 2:
    return "rank < 2"
  rows, cols = shape[-2:]
  if min(rows, cols) > MAX_SHORT_SIDE or rows * cols > MAX_ENTRIES:
    return (f"{rows} x {cols} is larger than the kernel's sizes (short side <= "
            f"{MAX_SHORT_SIDE}, <= {MAX_ENTRIES} entries): XLA's products are faster there")
  return ""


def unavailable() -> str:
  """Why the kernel cannot run here ("" if it can)."""
  return ffi_util.unavailable(SOURCE)


def _kernel_call(x, iters):
  ffi_util.register(TARGET, SOURCE, "SpmdLoptNewtonSchulz")
  call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(x.shape, jnp.float32),
                          vmap_method="broadcast_all")
  return call(x, iters=np.int64(iters))


def apply(x: jax.Array, reference: Callable, iters: int) -> jax.Array:
  """``reference(x)`` through the kernel (float32 ``x``, ``[..., R, C]``); ``reference``
  must be a module-level function (a static argument) running ``iters`` iterations."""
  return ffi_util.kernel_or_reference(functools.partial(_kernel_call, iters=iters),
                                      reference, x)


def hlo_flops(hlo_text: str) -> float:
  """FLOPs of this kernel's calls in a compiled module's HLO text (each call once, as
  XLA's cost analysis counts a loop body, which counts a custom call as nothing): per
  ``m x n`` matrix (``m <= n``) and iteration ``4 m^2 n + 2 m^3`` (``Y Y^T``, ``A A``,
  ``B Y``)."""
  total = 0.0
  for (dims,), attrs in ffi_util.hlo_custom_calls(hlo_text, TARGET):
    iters = attrs["iters"]
    rows, cols = dims[-2:]
    small, large = min(rows, cols), max(rows, cols)
    lanes = float(np.prod(dims[:-2], dtype=np.float64))
    total += lanes * iters * (4.0 * small * small * large + 2.0 * small ** 3)
  return total
