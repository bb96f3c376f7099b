"""Celo2's learned rule on a tensor, fused into one CPU kernel (before Newton-Schulz).

For a parameter ``p`` of shape ``L + (R, C)`` whose Adafactor factoring runs over its last
two axes, with gradient ``grad``, momenta ``m`` (``L + (R, C, 3)``), second moment ``v``
(``L + (R, C, 1)``), the factored statistics ``v_row`` / ``v_col`` (``common.FactoredState``
layout; for a vector ``p`` of shape ``(n,)``: its full second moments ``v_full`` ``(n, 3)``
as ``v_row`` and an empty ``(0, 3)`` ``v_col``) and Celo2's weights packed by ``pack``
(``THETA_SIZE`` numbers: the first layer ``[30, 8]``, ``b0``, ``w1 [8, 8]``, ``b1``,
output 0 of ``w2`` and of ``b2``), ``apply`` returns ``(m, v, v_row, v_col, direction)``:
items 1-5 of ``celo2``'s docstring (the updated accumulators and the grouped MLP's output
0 on the unit-RMS features).

On CPU it runs ``celo2_matrix.cc`` through ``jax.ffi``: three passes over each matrix
(accumulators and sums, the factored columns' sums, features and MLP in registers) where
XLA ran ~100 fused loops, transposes and small products. Elsewhere, for other sizes and
for every gradient (a ``custom_vjp`` that differentiates it) it runs ``reference``, the
caller's XLA implementation of the same math; the two agree to float rounding. Leading
axes ``L`` and ``vmap``'s lanes are independent matrices (``vmap_method="broadcast_all"``),
so the results do not depend on how lanes are spread over devices.
"""

from __future__ import annotations

import os
from typing import Callable, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from spmd_lopt.kernels import ffi_util

SOURCE = os.path.join(os.path.dirname(__file__), "celo2_matrix.cc")
TARGET = "spmd_lopt_celo2_matrix"
HIDDEN = 8
FIRST_LAYER_ROWS = 30
THETA_SIZE = FIRST_LAYER_ROWS * HIDDEN + HIDDEN + HIDDEN * HIDDEN + HIDDEN + HIDDEN + 1


def pack(first_layer: jax.Array, b0: jax.Array, w1: jax.Array, b1: jax.Array,
         w2: jax.Array, b2: jax.Array) -> jax.Array:
  """Celo2's weights as the kernel reads them: ``first_layer [30, 8]`` (the 14 groups'
  blocks stacked), ``b0 [8]``, ``w1 [8, 8]`` (in, out), ``b1 [8]``, ``w2[:, 0]``,
  ``b2[0]``; ``[THETA_SIZE]``."""
  return jnp.concatenate([jnp.ravel(first_layer), b0, jnp.ravel(w1), b1, w2[:, 0], b2[:1]])


def unpack(packed: jax.Array):
  """``pack``'s inverse (``w2`` as ``[8, 1]``, ``b2`` as ``[1]``)."""
  h, f = HIDDEN, FIRST_LAYER_ROWS
  sizes = [f * h, h, h * h, h, h, 1]
  parts = jnp.split(packed, np.cumsum(sizes)[:-1], axis=-1)
  first, b0, w1, b1, w2, b2 = parts
  return (first.reshape(packed.shape[:-1] + (f, h)), b0,
          w1.reshape(packed.shape[:-1] + (h, h)), b1, w2[..., None], b2)


def unavailable(hidden: int = HIDDEN, hidden_layers: int = 2) -> str:
  """Why the kernel cannot run Celo2 with these sizes here ("" if it can): the sizes it
  takes, the backend, and whether it builds."""
  if hidden != HIDDEN or hidden_layers != 2:
    return f"hidden size {hidden} and {hidden_layers} hidden layers (the kernel: 8 and 2)"
  return ffi_util.unavailable(SOURCE)


def shape_unsupported(shape: Sequence[int], factored_dims) -> str:
  """Why the kernel does not cover a parameter of this shape ("" if it does);
  ``factored_dims`` is ``common.factored_dims(shape)``. Parameters are cast to float32;
  a scalar is passed as a length-1 vector."""
  if len(shape) == 0:
    return "a scalar (pass it as a length-1 vector)"
  if len(shape) >= 2 and set(factored_dims) != {len(shape) - 2, len(shape) - 1}:
    return f"shape {tuple(shape)} is factored over axes {factored_dims}, not the last two"
  if int(np.prod(shape)) == 0:
    return "no entries"
  return ""


def _kernel_call(p, grad, m, v, v_row, v_col, packed):
  ffi_util.register(TARGET, SOURCE, "SpmdLoptCelo2Matrix")
  vector = p.ndim == 1
  rows, cols = (1, p.shape[0]) if vector else p.shape[-2:]
  # The "row" statistic averages over the last axis (always, for a vector's v_full).
  d_row_last = vector or v_row.shape[-2] == rows
  packed = jnp.broadcast_to(packed, p.shape[:-2] + packed.shape[-1:])
  shapes = tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (m, v, v_row, v_col, p))
  # The accumulators are updated in place (the kernel reads each entry before writing it).
  call = jax.ffi.ffi_call(TARGET, shapes, vmap_method="broadcast_all",
                          input_output_aliases={2: 0, 3: 1, 4: 2, 5: 3})
  return tuple(call(p, grad, m, v, v_row, v_col, packed, rows=np.int64(rows),
                    cols=np.int64(cols), d_row_last=np.int64(d_row_last),
                    vector=np.int64(vector)))


def apply(reference: Callable, p: jax.Array, grad: jax.Array, m: jax.Array, v: jax.Array,
          v_row: jax.Array, v_col: jax.Array, packed: jax.Array) -> Tuple[jax.Array, ...]:
  """The module docstring's ``(m, v, v_row, v_col, direction)`` through the kernel.

  ``reference(p, grad, m, v, v_row, v_col, packed)`` must compute the same tuple with XLA
  ops (a module-level function: it is a static argument). The caller checks
  ``unavailable`` and ``shape_unsupported`` first; all arrays are float32.
  """
  return ffi_util.kernel_or_reference(_kernel_call, reference, p, grad, m, v, v_row, v_col,
                                      packed)


def hlo_flops(hlo_text: str) -> float:
  """The MLP's FLOPs in this kernel's calls in a compiled module's HLO text (each call
  once, as XLA's cost analysis counts a loop body, which counts a custom call as
  nothing): ``2 x entries x (F H + H^2 + H)`` with ``F`` 18 full-size features for a
  tensor, 15 for a vector, ``H = 8``. The features and accumulators are not counted."""
  total = 0.0
  for shapes, attrs in ffi_util.hlo_custom_calls(hlo_text, TARGET):
    entries = float(np.prod(shapes[-1], dtype=np.float64))  # the direction's
    features = 15 if attrs.get("vector", 0) else 18
    total += 2.0 * entries * (features * HIDDEN + HIDDEN * HIDDEN + HIDDEN)
  return total


def hlo_calls(hlo_text: str) -> int:
  """How many calls of this kernel a compiled module's HLO text holds."""
  return len(ffi_util.hlo_custom_calls(hlo_text, TARGET))
