"""MLPLOpt's steps for all tensors of a model after their momenta, as one CPU kernel call.

For each tensor of ``n`` entries, ``p`` and ``g`` ``[n]`` and its updated momenta ``m``
``[n, K]``, with the first layer's rows for the ``F = 2 + K`` tensor features
``tensor_kernel`` ``[F, H]``, the step's first-layer bias ``step_bias`` ``[H]`` (the step
features' rows times their values, plus ``b0``) and the later layers ``tail``
(``per_entry_mlp.pack_tail``), ``apply`` returns the tensor's step ``[n]``::

  x      = [g, p, m_1 .. m_K]                                 (per entry, F numbers)
  r_a    = rsqrt(1e-5 + mean_i x_a[i]^2)                      (per feature, over the tensor)
  (d, s) = MLP(x; W0 = diag(r) tensor_kernel, b0 = step_bias, tail)   (per entry)
  step   = d exp(s exp_mult) step_mult                        (p' = p - step)

On CPU all tensors go through one call of ``mlp_lopt_step`` in ``per_entry_mlp.cc``
(``jax.ffi``): per tensor and lane one pass for the sums of squares and one for the MLP
(``per_entry_mlp``'s register tiles, the first layer's kernel scaled by ``r`` once) and
the step, where XLA ran the 8 norms' reductions, the kernel's scaling, one MLP call per
tensor and the step as separate loops; the lanes x tensors of one call share a device's
threads. The momenta and ``p - step`` stay XLA loops: a custom call's result that becomes
loop state (the new ``p`` or ``m``) cost the unroll's while loop a copy of it per inner
step (0.92x with both), where a fusion's result is written in place. Elsewhere, for other
sizes and for every gradient (a ``custom_vjp`` that differentiates it), it runs
``reference``, the caller's XLA implementation; the two agree to float rounding. Lanes
(``vmap``: tasks, perturbations) are independent (``vmap_method="broadcast_all"``), so
results do not depend on how they are spread over devices.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from spmd_lopt.kernels import ffi_util
from spmd_lopt.kernels import per_entry_mlp

SOURCE = per_entry_mlp.SOURCE
TARGET = "spmd_lopt_mlp_lopt_step"
MAX_MOMENTA = 8
MAX_TENSORS = 64


def unavailable(num_momenta: int, hidden: int, hidden_layers: int) -> str:
  """Why the kernel cannot run an MLPLOpt of these sizes here ("" if it can)."""
  if not 1 <= num_momenta <= MAX_MOMENTA:
    return f"{num_momenta} momenta (1 to {MAX_MOMENTA})"
  return per_entry_mlp.unavailable(2 + num_momenta, hidden, hidden_layers, 2)


def unsupported(p: jax.Array, g: jax.Array, m: jax.Array, tensor_kernel: jax.Array,
                hidden_layers: int) -> str:
  """Why the kernel cannot run on these arrays ("" if it can): float32 ``p [n]``,
  ``g [n]``, ``m [n, K]``, ``tensor_kernel [2 + K, H]``, ``n >= 1``."""
  if any(jnp.result_type(a) != jnp.float32 for a in (p, g, m, tensor_kernel)):
    return "not float32"
  if p.ndim != 1 or g.shape != p.shape or m.ndim != 2 or m.shape[0] != p.shape[0]:
    return "p and g must be [n] and m [n, K]"
  if p.shape[0] == 0:
    return "no entries"
  if tensor_kernel.ndim != 2 or tensor_kernel.shape[0] != 2 + m.shape[1]:
    return f"tensor_kernel {tensor_kernel.shape} for {m.shape[1]} momenta"
  return unavailable(m.shape[1], tensor_kernel.shape[1], hidden_layers)


def _kernel_call(tensors, tensor_kernel, step_bias, tail, *, exp_mult, step_mult,
                 hidden_layers):
  ffi_util.register(TARGET, SOURCE, "SpmdLoptMlpLoptStep")
  shapes = tuple(jax.ShapeDtypeStruct(p.shape, jnp.float32) for p, _, _ in tensors)
  call = jax.ffi.ffi_call(TARGET, shapes, vmap_method="broadcast_all")
  return tuple(call(tensor_kernel, step_bias, tail, *(x for t in tensors for x in t),
                    momenta=np.int64(tensors[0][2].shape[-1]),
                    hidden=np.int64(tensor_kernel.shape[-1]),
                    hidden_layers=np.int64(hidden_layers), exp_mult=np.float32(exp_mult),
                    step_mult=np.float32(step_mult)))


def apply(reference: Callable, tensors: Sequence[Tuple[jax.Array, jax.Array, jax.Array]],
          tensor_kernel: jax.Array, step_bias: jax.Array, tail: jax.Array, *,
          exp_mult: float, step_mult: float, hidden_layers: int) -> Tuple[jax.Array, ...]:
  """The module docstring's steps of ``tensors`` (``(p, g, m)`` each) through the kernel.

  ``reference(tensors, tensor_kernel, step_bias, tail)`` must compute them with XLA ops
  (static: the same callable each call, e.g. a ``functools.partial`` of a module
  function). The caller checks ``unsupported`` for each tensor first.
  """
  tensors = tuple(tuple(t) for t in tensors)
  kernel = functools.partial(_kernel_call, exp_mult=float(exp_mult),
                             step_mult=float(step_mult), hidden_layers=int(hidden_layers))
  steps = ()
  for at in range(0, len(tensors), MAX_TENSORS):  # the kernel takes up to 64 per call
    steps += tuple(ffi_util.kernel_or_reference(kernel, reference,
                                                tensors[at:at + MAX_TENSORS],
                                                tensor_kernel, step_bias, tail))
  return steps


def hlo_flops(hlo_text: str) -> float:
  """The MLP's FLOPs in this kernel's calls in a compiled module's HLO text (each call
  once, as XLA's cost analysis counts a loop body; it counts a custom call as nothing),
  ``2 x lanes x sum_t n_t x (F H + (L - 1) H^2 + 2 H)``: the MLP as
  ``per_entry_mlp.hlo_flops`` counts it; the norms and step (~20 per entry) are not."""
  total = 0.0
  for shapes, attrs in ffi_util.hlo_custom_calls(hlo_text, TARGET):
    h, layers = attrs["hidden"], attrs["hidden_layers"]
    f = 2 + attrs["momenta"]
    entries = sum(float(np.prod(dims, dtype=np.float64)) for dims in shapes)
    total += 2.0 * entries * (f * h + (layers - 1) * h * h + h * 2)
  return total


def hlo_calls(hlo_text: str) -> int:
  """How many calls of this kernel a compiled module's HLO text holds."""
  return len(ffi_util.hlo_custom_calls(hlo_text, TARGET))
