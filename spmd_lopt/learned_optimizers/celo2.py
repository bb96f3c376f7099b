"""Celo2 (Moudgil, Knyazev, Belilovsky, ICLR 2026): a 347-parameter learned update rule.

Per parameter tensor ``p`` (shape ``S``, rank ``r``) with gradient ``grad``, in float32:

1. ``g = clip(grad, -1000, 1000)``.
2. Accumulators, no bias correction, from 0: momenta ``m_b <- b m_b + (1-b) g`` for
   ``b in (0.9, 0.99, 0.999)``; ``v <- 0.95 v + 0.05 g^2``; Adafactor second moments of
   ``g^2 + 1e-30`` at the same three decays (``common.factored_update``: rows/columns over
   the two largest axes for ``r >= 2``, a full accumulator otherwise), which also give the
   factored gradient ``fac_g = g / sqrt(V_hat)``.
3. Features (after the update), ``s = rsqrt(v + 1e-8)``, as groups of widths
   ``g 1 | clip(g, -0.1, 0.1) 1 | p 1 | m 3 | v 1 | m s 3 | s 1 | fac_g 3 | g s 1`` and, for
   ``r >= 2`` only, ``row 3 | col 3 | rsqrt(row + 1e-8) 3 | rsqrt(col + 1e-8) 3 |
   m row_factor col_factor 3`` (row/col broadcast to ``S``): 15 or 30 features.
4. Every feature column is scaled to unit RMS over the last two axes of ``p`` (the only
   axis of a vector; a scalar is a length-1 vector): ``x rsqrt(1e-9 + mean(x^2))``.
5. A grouped MLP: ``h = relu(sum_i f_i @ W0_i + b0)``, ``h = relu(h @ W1 + b1)``,
   ``o = h @ W2 + b2`` (hidden 8, 3 outputs); the direction is ``o[..., 0]``.
6. Celo2 (not Celo2-base), ``r >= 2``: Newton-Schulz orthogonalisation of the direction
   over its last two axes (``newton_schulz``).
7. The step is scaled to unit RMS over the last two axes (as in 4).
8. ``p <- p - step_mult step - weight_decay step_mult p``.
9. Leaves whose '/'-joined key path matches ``regex_1d`` use un-bias-corrected Adam
   instead (raw gradient, b1 0.9, b2 0.95, ``m / sqrt(v + 1e-8)``) with step multiplier
   ``20 step_mult`` (also for the decay term).

Theta uses the authors' released layout, ``{"ff_mod_stack": {"~": {"w0__0".."w0__13",
"w1", ..., "b0", ...}}}``, so their ``theta.state`` files load without renaming
(``load_released_weights``). ``scale_by_celo2`` is items 1-7 as an optax transformation.
All matrix products run at ``Precision.HIGHEST`` (TF32 would move the steps visibly).

On CPU, items 1-5 of every vector and of every tensor factored over its last two axes run
as one fused kernel per leaf (``spmd_lopt.kernels.celo2_matrix``; hidden 8, 2 hidden
layers) and item 6 as another (``spmd_lopt.kernels.newton_schulz``); items 7-8 stay XLA
ops. ``implementation="reference"`` runs everything as XLA ops (other backends always do);
the two agree to float rounding.
"""

from __future__ import annotations

import os
import re
from typing import Any, List, Optional, Sequence, Tuple, Union

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from spmd_lopt.learned_optimizers import base as lopt_base
from spmd_lopt.learned_optimizers import common
from spmd_lopt.learned_optimizers import reference_thetas
from spmd_lopt import tree_utils
from spmd_lopt.kernels import celo2_matrix
from spmd_lopt.kernels import ffi_util
from spmd_lopt.kernels import newton_schulz as newton_schulz_kernel
from spmd_lopt.optimizers import base as opt_base

F32 = jnp.float32
HIGHEST = jax.lax.Precision.HIGHEST
MOMENTUM_DECAYS = (0.9, 0.99, 0.999)
RMS_DECAY = 0.95
ADAFACTOR_DECAYS = (0.9, 0.99, 0.999)
GRAD_CLIP = 1000.0
# Widths of the input feature groups in the order of item 3 (first 9: every tensor).
GROUP_WIDTHS = (1, 1, 1, 3, 1, 3, 1, 3, 1, 3, 3, 3, 3, 3)
NUM_VECTOR_GROUPS = 9
NS_COEFFS = (3.4445, -4.7750, 2.0315)
NS_ITERS = 5
ADAM_B1, ADAM_B2, ADAM_EPS, ADAM_MULT = 0.9, 0.95, 1e-8, 20.0
# Haiku's truncated normal ([-2, 2] std units) has std 0.8796; dividing restores stddev.
_TRUNC_STD = 0.87962566


# ----------------------------------------------------------------------------- pieces


def rms_normalize(x: jax.Array, ndim: int, eps: float = 1e-9) -> jax.Array:
  """``x rsqrt(eps + mean(x^2))`` over the last ``min(ndim, 2)`` axes of the parameter,
  where ``x`` has shape ``S + T`` with ``len(S) == ndim >= 1`` and ``T`` trailing feature
  axes (0 or 1)."""
  trailing = x.ndim - ndim
  axes = tuple(range(max(ndim - 2, 0), ndim))
  axes = tuple(a - ndim - trailing for a in axes)  # negative, so trailing axes stay put
  return x * jax.lax.rsqrt(eps + jnp.mean(jnp.square(x), axis=axes, keepdims=True))


def newton_schulz(x: jax.Array, iters: int = NS_ITERS, eps: float = 1e-8) -> jax.Array:
  """Approximate ``U V^T`` of ``x = U S V^T`` over the last two axes (batched over the rest).

  With ``X`` the (possibly transposed, so rows <= cols) matrix divided by its Frobenius
  norm plus ``eps``: ``iters`` times ``A = X X^T``, ``X <- a X + (b A + c A A) X`` with
  ``(a, b, c) = (3.4445, -4.7750, 2.0315)``; then transposed back.
  """
  a, b, c = NS_COEFFS
  transpose = x.shape[-2] > x.shape[-1]
  if transpose:
    x = jnp.swapaxes(x, -1, -2)
  x = x / (jnp.sqrt(jnp.sum(jnp.square(x), axis=(-2, -1), keepdims=True)) + eps)
  mm = lambda u, v: jnp.matmul(u, v, precision=HIGHEST)
  for _ in range(iters):
    gram = mm(x, jnp.swapaxes(x, -1, -2))
    x = a * x + mm(b * gram + c * mm(gram, gram), x)
  return jnp.swapaxes(x, -1, -2) if transpose else x


@flax.struct.dataclass
class Celo2Accumulators:
  """Celo2's per-leaf statistics (float32; trailing decay axis as in ``common``):
  momentum (3 decays), rms (decay 0.95), factored (Adafactor, 3 decays) and the int32
  number of updates so far."""
  momentum: common.MomentumState
  rms: common.RMSState
  factored: common.FactoredState
  count: jax.Array


def accumulators_init(params: Any) -> Celo2Accumulators:
  """Zero accumulators for every leaf of ``params`` (any pytree)."""
  return Celo2Accumulators(
      momentum=common.momentum_init(params, len(MOMENTUM_DECAYS)),
      rms=common.rms_init(params, 1),
      factored=common.factored_init(params, len(ADAFACTOR_DECAYS)),
      count=jnp.zeros([], jnp.int32))


def _features(p, g, m, v, fac_g, v_row, v_col) -> List[jax.Array]:
  """Item 3's groups for one leaf of shape ``S``, float32, each broadcastable to
  ``S + (width,)``.

  The row/column groups (``row``, ``col`` and their rsqrt) are left un-broadcast: they
  keep a size-1 axis where the full feature is constant (``d_row`` for row statistics,
  ``d_col`` for column ones), so they cost ``O(S / S[d])`` rather than ``O(S)``.
  """
  shape = g.shape
  s = jax.lax.rsqrt(v + 1e-8)
  groups = [g[..., None], jnp.clip(g, -0.1, 0.1)[..., None], p[..., None], m, v, m * s, s,
            fac_g, g[..., None] * s]
  dims = common.factored_dims(shape)
  if dims is not None:
    d_col, d_row = dims
    row = jnp.expand_dims(v_row, d_row)
    col = jnp.expand_dims(v_col, d_col)
    row_factor, col_factor = common.factored_scales(v_row, v_col, shape)
    groups += [row, col, jax.lax.rsqrt(row + 1e-8), jax.lax.rsqrt(col + 1e-8),
               m * row_factor * col_factor]
  return groups


def _inv_rms(x: jax.Array, ndim: int, eps: float = 1e-9) -> jax.Array:
  """``rsqrt(eps + mean(x^2))`` over the last ``min(ndim, 2)`` parameter axes of
  ``x`` (shape ``S' + (w,)``, ``S'`` equal to ``S`` or 1 along some axes), keepdims.

  Where ``x`` has a size-1 axis that the full feature is broadcast along, the mean over
  that axis is the value itself, so this equals the statistic of the broadcast feature.
  """
  axes = tuple(a - ndim - 1 for a in range(max(ndim - 2, 0), ndim))
  return jax.lax.rsqrt(eps + jnp.mean(jnp.square(x), axis=axes, keepdims=True))


def _left_product(w: jax.Array, x: jax.Array, axis: int = -1) -> jax.Array:
  """``y[..., k, ...] = sum_c w[c, k] x[..., c, ...]`` with ``w: (C, K)`` and the feature
  axis ``axis`` of ``x`` (size ``C``); ``y`` has ``K`` at the position of ``axis``
  (for ``axis = -1``: moved in front of the last two axes, as ``_mlp_direction`` lays
  hidden units out). Float32 at ``Precision.HIGHEST``."""
  axis = axis % x.ndim
  y = jax.lax.dot_general(w, x, (((0,), (axis,)), ((), ())), precision=HIGHEST)
  # dot_general puts w's free axis (K) first; move it to where the caller wants it.
  dest = axis if axis < x.ndim - 1 else max(x.ndim - 3, 0)
  return jnp.moveaxis(y, 0, dest)


def _mlp_direction(net, groups: Sequence[jax.Array]) -> jax.Array:
  """Items 4-5: normalise each feature column, run the grouped MLP, take output 0.

  With ``S`` the leaf's shape, ``L = S[:-2]`` its leading axes (``prod(L) = l``), ``e``
  the entries of its last two axes and ``n_c`` the inverse RMS of column ``c`` (shape
  ``L``: constant over the last two axes), the first layer is
  ``sum_c (x_c n_c) W0[c] = sum_c (n_c W0[c]) x_c``: the norms are folded into one
  ``(l, F, hidden)`` weight per leaf, so no normalised copy of the ``F`` (15 or 18) raw
  full-size columns is written. The row/column groups are ``O(S / S[d])`` arrays: they are
  normalised and multiplied un-broadcast (one product for the row groups, one for the
  column groups), and their ``hidden``-wide partial sums ``R`` and ``C`` enter as the table
  ``R[i] + C[j]``, built by a ``K = 2`` product.

  Layout: entries on the minor axis. The columns are stacked as ``X: (l, F, e)`` and every
  layer is ``H' = W^T H`` with ``H: (l, hidden, e)``, i.e. a ``(hidden, F) @ (F, e)``
  product per leading index (per task under ``vmap``): long rows for the matrix library
  and the vector units, where ``(e, F) @ (F, hidden)`` with ``F, hidden <= 18`` ran its
  inner loops over 8-18 elements. Only output 0 of the last layer is computed.
  """
  ndim = groups[0].ndim - 1
  shape = groups[0].shape[:-1]
  lead = shape[:max(ndim - 2, 0)]
  n_lead = int(np.prod(lead, dtype=np.int64))
  full = [i for i, x in enumerate(groups) if x.shape[:-1] == shape]
  # (l, F, e): each group's width axis moved in front of its entries.
  feats = jnp.concatenate(
      [jnp.swapaxes(jnp.reshape(groups[i], (n_lead, -1, groups[i].shape[-1])), -1, -2)
       for i in full], axis=1)
  # Inverse RMS of every column over its entries, from the stacked columns in one
  # reduction along their minor axis (per group it took a square, a split reduction and
  # a finishing reduce each).
  inv = jax.lax.rsqrt(1e-9 + jnp.mean(jnp.square(feats), axis=-1, keepdims=True))
  w0 = inv * jnp.concatenate([net[f"w0__{i}"] for i in full], axis=0)  # (l, F, hidden)
  hidden = w0.shape[-1]
  # Every product is a dot_general with the weights as its left operand, so its output is
  # (hidden, e) as written; through jnp.einsum XLA emitted (e, hidden) products and
  # transposed between the layers (interleaved A/Bs of the recipe step against one
  # baseline: 1.28x with einsum, 1.49x with dot_general).
  h = jax.lax.dot_general(w0, feats, (((1,), (1,)), ((0,), (0,))), precision=HIGHEST)
  # Row groups share one shape, column groups another: each set is one product.
  same_shape = {}
  for i, x in enumerate(groups):
    if i not in full:
      same_shape.setdefault(x.shape[:-1], []).append(i)
  partial = []
  for idx in same_shape.values():
    x = jnp.concatenate([groups[i] for i in idx], axis=-1)
    w = jnp.concatenate([net[f"w0__{i}"] for i in idx], axis=0)
    partial.append(_left_product(w, x * _inv_rms(x, ndim)))
  row_shape = col_shape = None  # rank < 2: no row/column groups
  if ndim >= 2:
    row_shape, col_shape = lead + (hidden, shape[-2], 1), lead + (hidden, 1, shape[-1])
  if partial and all(p.shape in (row_shape, col_shape) for p in partial):
    # Rows and columns factored over the last two axes (the usual case): the row sums R
    # (l, hidden, S[-2]) and column sums C (l, hidden, S[-1], with the bias) become the
    # table R[i] + C[j] through one K = 2 product, [R, 1] @ [1, C]^T, added to h in h's
    # own layout. Broadcast-adding them to h viewed as (l, hidden, S[-2], S[-1]) made
    # XLA's CPU loop fusion index every element through the reshape.
    # (+ zeros: the full shape also when one side has no groups)
    rows = sum(p for p in partial if p.shape == row_shape) + jnp.zeros(row_shape, F32)
    cols = (sum(p for p in partial if p.shape == col_shape) + jnp.zeros(col_shape, F32) +
            net["b0"][:, None, None])
    rows = jnp.reshape(rows, (n_lead, hidden, shape[-2], 1))
    cols = jnp.reshape(cols, (n_lead, hidden, shape[-1], 1))
    table = jnp.einsum("lhik,lhjk->lhij",
                       jnp.concatenate([rows, jnp.ones_like(rows)], axis=-1),
                       jnp.concatenate([jnp.ones_like(cols), cols], axis=-1),
                       precision=HIGHEST)
    h = h + jnp.reshape(table, (n_lead, hidden, -1))
  elif partial:  # rank >= 2: L + (hidden,) + (1 or S[-2], 1 or S[-1]) partial sums
    h = jnp.reshape(h + net["b0"][:, None], lead + (hidden,) + shape[-2:])
    for part in partial:
      h = h + part
    h = jnp.reshape(h, (n_lead, hidden, -1))
  else:
    h = h + net["b0"][:, None]
  layer = 1
  while f"w{layer + 1}" in net:
    h = _left_product(net[f"w{layer}"], jax.nn.relu(h), axis=1) + net[f"b{layer}"][:, None]
    layer += 1
  w_out, b_out = net[f"w{layer}"][:, :1], net[f"b{layer}"][:1]
  out = _left_product(w_out, jax.nn.relu(h), axis=1) + b_out[:, None]
  return jnp.reshape(out, shape)


def _leaf_accumulate(g, m, v, v_row, v_col, v_full):
  """Item 2 on one leaf (``g`` clipped, float32): the updated ``m, v, v_row, v_col, v_full``
  and the factored gradient ``fac_g``."""
  momentum = common.momentum_update(common.MomentumState(m=[m]), [g], MOMENTUM_DECAYS)
  rms = common.rms_update(common.RMSState(v=[v]), [g], (RMS_DECAY,))
  factored, fac_g = common.factored_update(
      common.FactoredState(v_row=[v_row], v_col=[v_col], v_full=[v_full]), [g],
      ADAFACTOR_DECAYS)
  return (momentum.m[0], rms.v[0], factored.v_row[0], factored.v_col[0],
          factored.v_full[0], fac_g[0])


def _leaf_direction(net, p32, g, m, v, fac_g, v_row, v_col) -> jax.Array:
  """Items 3-5 on one leaf: the MLP's output 0, shape ``p32.shape`` (a scalar counts as a
  length-1 vector)."""
  if not jnp.shape(p32):
    p32, g, m, v, fac_g = (jnp.reshape(x, (1,) + jnp.shape(x)) for x in (p32, g, m, v, fac_g))
  return _mlp_direction(net, _features(p32, g, m, v, fac_g, v_row, v_col))


def pack_net(net) -> jax.Array:
  """Celo2's weights (released layout, hidden 8, 2 hidden layers) as the fused matrix
  kernel reads them (``celo2_matrix.pack``)."""
  first = jnp.concatenate([net[f"w0__{i}"] for i in range(len(GROUP_WIDTHS))], axis=0)
  return celo2_matrix.pack(first, net["b0"], net["w1"], net["b1"], net["w2"], net["b2"])


def _unpack_net(packed: jax.Array) -> dict:
  first, b0, w1, b1, w2, b2 = celo2_matrix.unpack(packed)
  net = {f"w0__{i}": block for i, block in enumerate(
      jnp.split(first, np.cumsum(GROUP_WIDTHS)[:-1], axis=-2))}
  net.update(b0=b0, w1=w1, b1=b1, w2=w2, b2=b2)
  return net


def _matrix_reference(p, grad, m, v, v_row, v_col, packed):
  """``celo2_matrix``'s reference: items 1-5 on one factored float32 matrix with packed
  weights, as XLA ops; ``(m, v, v_row, v_col, direction)``."""
  g = jnp.clip(grad, -GRAD_CLIP, GRAD_CLIP)
  m, v, v_row, v_col, _, fac_g = _leaf_accumulate(g, m, v, v_row, v_col,
                                                  jnp.zeros((0, len(ADAFACTOR_DECAYS)), F32))
  return m, v, v_row, v_col, _leaf_direction(_unpack_net(packed), p, g, m, v, fac_g, v_row,
                                             v_col)


def _vector_reference(p, grad, m, v, v_full, v_col, packed):
  """``celo2_matrix``'s reference for a vector (``v_full`` in the ``v_row`` slot, ``v_col``
  empty); ``(m, v, v_full, v_col, direction)``."""
  g = jnp.clip(grad, -GRAD_CLIP, GRAD_CLIP)
  m, v, _, _, v_full, fac_g = _leaf_accumulate(g, m, v, v_col, v_col, v_full)
  return m, v, v_full, v_col, _leaf_direction(_unpack_net(packed), p, g, m, v, fac_g, v_col,
                                              v_col)


def kernel_unavailable(implementation: str, hidden_size: int, hidden_layers: int) -> str:
  """Why no leaf would run the fused kernel (``celo2_matrix``) with these sizes and
  ``implementation`` ("" if the leaves it covers would: ``celo2_matrix.shape_unsupported``)."""
  if implementation == "reference":
    return "implementation='reference'"
  return celo2_matrix.unavailable(hidden_size, hidden_layers)


def accumulate_and_step(theta: Any, acc: Celo2Accumulators, grads: Any, params: Any,
                        orthogonalize: bool = True, implementation: str = "auto"
                        ) -> Tuple[Celo2Accumulators, Any]:
  """Items 1-7 on every leaf: the updated accumulators and the unit-RMS steps.

  ``grads`` and ``params`` share a structure; each step has its parameter's shape and is
  float32 (positive direction: the caller subtracts it). ``implementation``: ``"auto"``
  runs items 1-5 of every leaf the fused CPU kernel covers (``celo2_matrix``: vectors,
  scalars and tensors factored over their last two axes; hidden 8, 2 hidden layers, CPU)
  through it, Newton-Schulz through its CPU kernel (``newton_schulz``), and the rest as
  XLA ops; ``"kernel"`` the same but a ValueError where the rule's kernel cannot run at
  all; ``"reference"`` XLA ops everywhere. The two agree to float rounding.
  """
  ffi_util.check_implementation("Celo2", implementation)
  net = theta["ff_mod_stack"]["~"]
  # Sizes from theta itself: w1 .. w{hidden_layers}, b0 of [hidden].
  why_not = kernel_unavailable(implementation, net["b0"].shape[-1],
                               sum(1 for k in net if re.fullmatch(r"w[1-9][0-9]*", k)))
  if why_not and implementation == "kernel":
    raise ValueError(f"Celo2: the fused kernel cannot run here: {why_not}")
  ns_why_not = ("implementation='reference'" if implementation == "reference" else
                newton_schulz_kernel.unavailable() if orthogonalize else "not orthogonalised")
  leaves, treedef = jax.tree.flatten(params)
  parts = [treedef.flatten_up_to(t) for t in (grads, acc.momentum.m, acc.rms.v,
                                              acc.factored.v_row, acc.factored.v_col,
                                              acc.factored.v_full)]
  packed = None
  new_parts, steps = [], []
  for p, grad, m, v, v_row, v_col, v_full in zip(leaves, *parts):
    shape = jnp.shape(p)
    p32, grad32 = jnp.asarray(p, F32), jnp.asarray(grad, F32)
    dims = common.factored_dims(shape)
    if not why_not and not celo2_matrix.shape_unsupported(shape or (1,), dims):
      packed = pack_net(net) if packed is None else packed
      if dims is None:  # a vector (a scalar as a length-1 one): v_full in v_row's place
        vec = lambda x: jnp.reshape(x, (-1,) + jnp.shape(x)[len(shape):])
        m2, v2, v_full2, _, direction = celo2_matrix.apply(
            _vector_reference, vec(p32), vec(grad32), vec(m), vec(v), vec(v_full), v_col,
            packed)
        m, v, v_full = (jnp.reshape(a, jnp.shape(b)) for a, b in
                        ((m2, m), (v2, v), (v_full2, v_full)))
        direction = jnp.reshape(direction, shape or (1,))
      else:
        m, v, v_row, v_col, direction = celo2_matrix.apply(
            _matrix_reference, p32, grad32, m, v, v_row, v_col, packed)
    else:
      g = jnp.clip(grad32, -GRAD_CLIP, GRAD_CLIP)
      m, v, v_row, v_col, v_full, fac_g = _leaf_accumulate(g, m, v, v_row, v_col, v_full)
      direction = _leaf_direction(net, p32, g, m, v, fac_g, v_row, v_col)
    new_parts.append((m, v, v_row, v_col, v_full))
    if orthogonalize and direction.ndim >= 2:
      direction = (newton_schulz(direction)
                   if ns_why_not or newton_schulz_kernel.shape_unsupported(direction.shape)
                   else newton_schulz_kernel.apply(direction, newton_schulz, NS_ITERS))
    steps.append(jnp.reshape(rms_normalize(direction, direction.ndim), shape))
  unflat = lambda i: jax.tree.unflatten(treedef, [x[i] for x in new_parts])
  new = Celo2Accumulators(
      momentum=common.MomentumState(m=unflat(0)), rms=common.RMSState(v=unflat(1)),
      factored=common.FactoredState(v_row=unflat(2), v_col=unflat(3), v_full=unflat(4)),
      count=optax.safe_increment(acc.count))
  return new, jax.tree.unflatten(treedef, steps)


# ----------------------------------------------------------------------------- theta


def init_theta(key: jax.Array, hidden_size: int = 8, hidden_layers: int = 2) -> Any:
  """Theta in the released layout: first-layer blocks ``w0__i`` of shape
  ``(GROUP_WIDTHS[i], hidden)``, ``w1..`` ``(hidden, hidden)``, the last ``(hidden, 3)``,
  biases zero. Weights: truncated normal, stddev ``1/sqrt(fan_in)`` (fan-in 30 for every
  first-layer block). The defaults give 347 numbers."""
  keys = jax.random.split(key, len(GROUP_WIDTHS) + hidden_layers)
  trunc = lambda k, shape, fan_in: (jax.random.truncated_normal(k, -2.0, 2.0, shape, F32)
                                    / (_TRUNC_STD * np.sqrt(fan_in)))
  net = {}
  fan0 = sum(GROUP_WIDTHS)
  for i, width in enumerate(GROUP_WIDTHS):
    net[f"w0__{i}"] = trunc(keys[i], (width, hidden_size), fan0)
  sizes = [hidden_size] * (hidden_layers - 1) + [3]
  for layer, out in enumerate(sizes, start=1):
    net[f"w{layer}"] = trunc(keys[len(GROUP_WIDTHS) + layer - 1], (hidden_size, out),
                             hidden_size)
  for layer, out in enumerate([hidden_size] + sizes):
    net[f"b{layer}"] = jnp.zeros((out,), F32)
  return {"ff_mod_stack": {"~": net}}


def load_released_weights(path: Union[str, os.PathLike], hidden_size: int = 8,
                          hidden_layers: int = 2) -> Any:
  """Theta from the authors' ``theta.state`` (``flax.serialization.to_bytes`` of the nested
  dict in the module docstring). The file is decoded as msgpack data only. A file of
  another layout raises one ValueError naming every missing or extra key and wrong shape.
  """
  what = "Celo2 checkpoint"
  tree = reference_thetas.read_msgpack_tree(path, what)
  template = jax.eval_shape(lambda k: init_theta(k, hidden_size, hidden_layers),
                            jax.random.key(0))
  reference_thetas.check_layout(tree, template, os.fspath(path),
                                f"{what} (hidden_size {hidden_size}, "
                                f"hidden_layers {hidden_layers})")
  return jax.tree.map(lambda t, x: jnp.asarray(x, F32), template, tree)


def save_released_weights(path: Union[str, os.PathLike], theta: Any) -> None:
  """Write theta in the released ``theta.state`` layout (the inverse of the loader)."""
  blob = flax.serialization.to_bytes(jax.tree.map(np.asarray, jax.device_get(theta)))
  with open(os.fspath(path), "wb") as f:
    f.write(blob)


# ----------------------------------------------------------------------------- optax


def scale_by_celo2(theta: Any, orthogonalize: bool = True,
                   implementation: str = "auto") -> optax.GradientTransformation:
  """Celo2's learned rule (items 1-7) on every leaf, as an optax transformation.

  ``update(grads, state, params)`` needs ``params`` and returns the raw, positive,
  unit-RMS step (no learning rate, no sign), so the authors' usage ports as::

    optax.chain(scale_by_celo2(theta), optax.add_decayed_weights(wd),
                optax.scale_by_learning_rate(lr))

  State: ``Celo2Accumulators`` (momenta, second moment, factored moments, int32 count).
  """
  def init_fn(params):
    return accumulators_init(params)

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("scale_by_celo2: Celo2 reads the parameters; call "
                       "tx.update(grads, state, params).")
    return accumulate_and_step(theta, state, updates, params, orthogonalize,
                               implementation)[::-1]

  return optax.GradientTransformation(init_fn, update_fn)


# ----------------------------------------------------------------------------- LearnedOptimizer


@flax.struct.dataclass
class Celo2State:
  """params; state: model state passed through; learned: ``Celo2Accumulators`` over the
  list of leaves the learned rule updates; adam_m / adam_v: momentum and RMS states over
  the list of ``regex_1d`` leaves; num_steps: int32 inner run length given to ``init``;
  iteration: int32 count of updates."""
  params: Any
  state: Any
  learned: Celo2Accumulators
  adam_m: common.MomentumState
  adam_v: common.RMSState
  num_steps: jax.Array
  iteration: jax.Array


class Celo2(lopt_base.LearnedOptimizer):
  """Celo2 (``orthogonalize=True``) and Celo2-base (``False``); math in the module
  docstring. ``regex_1d`` (e.g. ``"/b$"``) routes matching leaves to the Adam branch."""

  # The Celo2 recipe's meta step ran 1.10-1.16x faster without XLA's CPU library graphs
  # (their fused Newton-Schulz graph alone took 1.8x its separate products), Celo2-base's
  # 1.10x; with the CPU kernels they touch only the tasks' products and still do not pay
  # (0.98x); lopt_base.LearnedOptimizer.cpu_library_graphs.
  cpu_library_graphs = False

  def __init__(self, orthogonalize: bool = True, step_mult: float = 1e-3,
               weight_decay: float = 0.0, regex_1d: Optional[str] = None,
               hidden_size: int = 8, hidden_layers: int = 2, implementation: str = "auto"):
    """``implementation``: how items 1-6 run (``accumulate_and_step``): ``"auto"`` (the
    fused CPU kernels where they can run), ``"kernel"`` (the rule's kernel or a
    ValueError) or ``"reference"`` (XLA ops)."""
    ffi_util.check_implementation("Celo2", implementation)
    if hidden_size <= 0 or hidden_layers < 1:
      raise ValueError("Celo2: hidden_size must be positive and hidden_layers >= 1, got "
                       f"{hidden_size}, {hidden_layers}.")
    if regex_1d is not None:
      try:
        re.compile(regex_1d)
      except re.error as e:
        raise ValueError(f"Celo2: regex_1d {regex_1d!r} is not a valid regex: {e}.") from e
    self.orthogonalize = bool(orthogonalize)
    self.step_mult = float(step_mult)
    self.weight_decay = float(weight_decay)
    self.regex_1d = regex_1d
    self.hidden_size = hidden_size
    self.hidden_layers = hidden_layers
    self.implementation = implementation
    self.name = "Celo2" if orthogonalize else "Celo2Base"

  def kernel_unavailable(self) -> str:
    """Why this optimizer's leaves would not run the fused CPU kernel here ("" if the
    ones it covers would)."""
    return kernel_unavailable(self.implementation, self.hidden_size, self.hidden_layers)

  def init(self, key):
    return init_theta(key, self.hidden_size, self.hidden_layers)

  def adam_mask(self, params) -> List[bool]:
    """Per flattened leaf: True when its '/'-joined key path matches ``regex_1d``."""
    paths = [tree_utils.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    if self.regex_1d is None:
      return [False] * len(paths)
    pattern = re.compile(self.regex_1d)
    return [bool(pattern.search(p)) for p in paths]

  def opt_fn(self, theta, is_training=False):
    del is_training
    lopt = self

    def split(tree, mask):
      leaves = jax.tree.leaves(tree)
      return ([x for x, a in zip(leaves, mask) if not a], [x for x, a in zip(leaves, mask) if a])

    class _Opt(opt_base.Optimizer):
      name = lopt.name

      def init(self, params, model_state=None, num_steps=None, key=None):
        """Zero accumulators; ``num_steps`` (the inner run length) is stored, not needed."""
        del key
        learned, adam = split(params, lopt.adam_mask(params))
        return Celo2State(
            params=params, state=model_state, learned=accumulators_init(learned),
            adam_m=common.momentum_init(adam, 1), adam_v=common.rms_init(adam, 1),
            num_steps=jnp.asarray(-1 if num_steps is None else num_steps, jnp.int32),
            iteration=jnp.asarray(0, jnp.int32))

      def update(self, opt_state, grad, loss=None, model_state=None, key=None, **kw):
        del loss, key, kw
        params = opt_state.params
        mask = lopt.adam_mask(params)
        p_learned, p_adam = split(params, mask)
        g_learned, g_adam = split(grad, mask)
        learned, steps = accumulate_and_step(theta, opt_state.learned, g_learned, p_learned,
                                             lopt.orthogonalize, lopt.implementation)
        adam_m = common.momentum_update(opt_state.adam_m, g_adam, (ADAM_B1,))
        adam_v = common.rms_update(opt_state.adam_v, g_adam, (ADAM_B2,))
        adam_steps = [(m * jax.lax.rsqrt(v + ADAM_EPS))[..., 0]
                      for m, v in zip(adam_m.m, adam_v.v)]

        def apply(p, step, mult):
          p32 = jnp.asarray(p, F32)
          new = p32 - mult * step - lopt.weight_decay * mult * p32
          return new.astype(jnp.asarray(p).dtype)

        it_l, it_a = iter(zip(p_learned, steps)), iter(zip(p_adam, adam_steps))
        new_leaves = [apply(*next(it_a), ADAM_MULT * lopt.step_mult) if a
                      else apply(*next(it_l), lopt.step_mult) for a in mask]
        new_params = jax.tree.unflatten(jax.tree.structure(params), new_leaves)
        state = opt_state.state if model_state is None else model_state
        return Celo2State(params=new_params, state=state, learned=learned, adam_m=adam_m,
                          adam_v=adam_v, num_steps=opt_state.num_steps,
                          iteration=opt_state.iteration + 1)

    return _Opt()


class Celo2Base(Celo2):
  """Celo2-base: ``Celo2`` without the Newton-Schulz orthogonalisation (item 6)."""

  def __init__(self, step_mult: float = 1e-3, weight_decay: float = 0.0,
               regex_1d: Optional[str] = None, hidden_size: int = 8,
               hidden_layers: int = 2, implementation: str = "auto"):
    super().__init__(orthogonalize=False, step_mult=step_mult, weight_decay=weight_decay,
                     regex_1d=regex_1d, hidden_size=hidden_size, hidden_layers=hidden_layers,
                     implementation=implementation)
