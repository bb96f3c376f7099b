"""A small MLP applied to every entry of a tensor: the learned optimizers' hot loop.

For ``n`` entries with features ``X = [x_1 | ... | x_A]`` (arrays ``x_a`` of shape
``[n, f_a]``, ``F = sum_a f_a`` columns, never concatenated by the kernel), a first layer
``W0 [F, H]``, ``b0 [H]`` and ``L - 1`` hidden layers and an output layer packed in
``tail`` (``pack_tail``)::

  h_1 = relu(X W0 + b0),  h_{k+1} = relu(h_k W_k + b_k),  out = h_L W_L + b_L   [n, O]

``apply`` runs it as one fused CPU kernel (``per_entry_mlp.cc``, through ``jax.ffi``)
when it can: default backend CPU, float32, ``H`` in 16/32/48/64, ``F <= 64``,
``O <= 8``, ``L >= 1``, and the kernel built (``cpu_build``). Otherwise, and for every
gradient (a ``custom_vjp`` whose backward pass differentiates the reference), it runs
``reference``: the same math as XLA products. Both sum in float32; they agree to float
rounding (the order of the sums differs), and so does a run on 1 or 8 devices: lanes are
independent.

Under ``vmap`` (lanes: tasks, perturbations) every argument gains the same leading axes
and the kernel loops over them (``vmap_method="broadcast_all"``); a call of >= 2^26 FLOPs
on a device that owns several threads (one device using the whole CPU) spreads its lanes
over XLA's intra-op pool.
"""

from __future__ import annotations

import functools
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from spmd_lopt.kernels import ffi_util

SOURCE = os.path.join(os.path.dirname(__file__), "per_entry_mlp.cc")
TARGET = "spmd_lopt_per_entry_mlp"


def pack_tail(layers: Sequence[dict]) -> jax.Array:
  """The layers after the first, ``[{"kernel": [H, H'], "bias": [H']}, ...]`` (the last
  one's ``H'`` is ``O``), flattened row-major into one vector: what the kernel reads."""
  return jnp.concatenate([jnp.concatenate([jnp.ravel(l["kernel"]), jnp.ravel(l["bias"])])
                          for l in layers])


def _unpack_tail(tail: jax.Array, hidden: int, hidden_layers: int, num_out: int):
  layers, at = [], 0
  if hidden_layers == 0:
    return layers
  for out in [hidden] * (hidden_layers - 1) + [num_out]:
    k = tail[..., at:at + hidden * out].reshape(tail.shape[:-1] + (hidden, out))
    at += hidden * out
    layers.append((k, tail[..., at:at + out]))
    at += out
  return layers


def tail_size(hidden: int, hidden_layers: int, num_out: int) -> int:
  """Numbers in ``pack_tail``'s vector (0 with no hidden layers: the first layer is the
  output layer, ``kernel0`` is ``[F, O]``)."""
  if hidden_layers == 0:
    return 0
  return (hidden_layers - 1) * (hidden * hidden + hidden) + hidden * num_out + num_out


def reference(features: Sequence[jax.Array], kernel0: jax.Array, bias0: jax.Array,
              tail: jax.Array, hidden_layers: int, num_out: int) -> jax.Array:
  """The MLP as XLA products; ``[n, O]``."""
  x = jnp.concatenate(list(features), axis=-1) if len(features) > 1 else features[0]
  h = x @ kernel0 + bias0
  for k, b in _unpack_tail(tail, kernel0.shape[-1], hidden_layers, num_out):
    h = jax.nn.relu(h) @ k + b
  return h


def unavailable(num_features: int, hidden: int, hidden_layers: int, num_out: int) -> str:
  """Why the kernel cannot run an MLP of these sizes here ("" if it can): the sizes it
  takes, the backend, and whether it builds."""
  if hidden % 16 or not 16 <= hidden <= 64:
    return f"hidden size {hidden} is not 16, 32, 48 or 64"
  if not 1 <= num_features <= 64:
    return f"{num_features} features (at most 64)"
  if not 1 <= num_out <= 8 or hidden_layers < 1:
    return f"{num_out} outputs, {hidden_layers} hidden layers (1 to 8, at least 1)"
  return ffi_util.unavailable(SOURCE)


def unsupported(features: Sequence[jax.Array], kernel0: jax.Array, hidden_layers: int,
                num_out: int) -> str:
  """Why the kernel cannot run on these arrays ("" if it can)."""
  if any(jnp.result_type(a) != jnp.float32 for a in list(features) + [kernel0]):
    return "not float32"
  if not 1 <= len(features) <= 16:
    return f"{len(features)} feature arrays (1 to 16)"
  if any(x.ndim != 2 or x.shape[0] != features[0].shape[0] for x in features):
    return "features must be [n, f_a] arrays with one n"
  if features[0].shape[0] == 0:
    return "no entries"
  f, h = kernel0.shape
  if f != sum(x.shape[1] for x in features):
    return f"kernel0 has {f} rows for {sum(x.shape[1] for x in features)} feature columns"
  return unavailable(f, h, hidden_layers, num_out)


def _kernel_call(features, kernel0, bias0, tail, hidden_layers, num_out):
  ffi_util.register(TARGET, SOURCE, "SpmdLoptPerEntryMlp")
  n, h = features[0].shape[0], kernel0.shape[-1]
  call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((n, num_out), jnp.float32),
                          vmap_method="broadcast_all")
  return call(kernel0, bias0, tail, *features, num_features=np.int64(kernel0.shape[0]),
              hidden=np.int64(h), hidden_layers=np.int64(hidden_layers),
              num_out=np.int64(num_out))


def apply(features: Sequence[jax.Array], kernel0: jax.Array, bias0: jax.Array,
          tail: jax.Array, *, hidden_layers: int, num_out: int,
          implementation: str = "auto") -> jax.Array:
  """The MLP of the module docstring on ``features`` (``[n, f_a]`` each); ``[n, O]``.

  ``implementation``: ``"auto"`` (the kernel where it can run, else the reference),
  ``"kernel"`` (the kernel, or a ValueError saying why not) or ``"reference"``.
  """
  ffi_util.check_implementation("per_entry_mlp", implementation)
  features = tuple(features)
  expected = tail_size(kernel0.shape[-1], hidden_layers, num_out)
  if tail.shape[-1] != expected:
    raise ValueError(f"per_entry_mlp: tail has {tail.shape[-1]} numbers, expected "
                     f"{expected} for hidden {kernel0.shape[-1]}, {hidden_layers} hidden "
                     f"layers and {num_out} outputs")
  if implementation == "reference":
    return reference(features, kernel0, bias0, tail, hidden_layers, num_out)
  why = unsupported(features, kernel0, hidden_layers, num_out)
  if why:
    if implementation == "kernel":
      raise ValueError(f"per_entry_mlp: the kernel cannot run here: {why}")
    return reference(features, kernel0, bias0, tail, hidden_layers, num_out)
  sizes = {"hidden_layers": hidden_layers, "num_out": num_out}
  return ffi_util.kernel_or_reference(functools.partial(_kernel_call, **sizes),
                                      functools.partial(reference, **sizes),
                                      features, kernel0, bias0, tail)


def hlo_flops(hlo_text: str) -> float:
  """FLOPs of this kernel's calls in a compiled module's HLO text, each call counted once
  (as XLA's cost analysis counts a loop body), ``2 x lanes x n x (F H + (L - 1) H^2 +
  H O)``: XLA's cost analysis counts nothing for a custom call."""
  total = 0.0
  for (dims,), attrs in ffi_util.hlo_custom_calls(hlo_text, TARGET):
    f, h = attrs["num_features"], attrs["hidden"]
    layers, o = attrs["hidden_layers"], attrs["num_out"]
    rows = float(np.prod(dims[:-1], dtype=np.float64))
    total += 2.0 * rows * (f * h + (layers - 1) * h * h + h * o)
  return total
