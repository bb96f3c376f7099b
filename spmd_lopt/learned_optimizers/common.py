"""Gradient accumulators shared by learned optimizers, each at several decays at once.

Every accumulator is a pure ``*_init(params, num_decays)`` / ``*_update(state, grad,
decays)`` pair over a ``flax.struct.dataclass`` state. ``decays`` is a float32 vector of
``K`` decay rates (it may be a function of theta, so it is an argument, not a constant);
each state leaf carries a trailing axis of size ``K``, one slot per decay. Decays are
clipped to ``[0, 1]`` so that any learned offset still gives a convex average (momentum
can opt out, as the reference's AdafacMLPLOpt does).

Accumulators are float32 whatever the parameter dtype: an exponential average with decay
0.999 cannot move in bfloat16 (its 8-bit mantissa rounds ``0.001 * g`` away), and a fixed
dtype keeps the state a valid ``lax.scan`` carry.

- momentum: ``m_k <- b_k m_k + (1 - b_k) g``;
- RMS: ``v_k <- b_k v_k + (1 - b_k) g^2``;
- Adafactor (Shazeer & Stern 2018), factored second moments: see ``factored_update``.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

F32 = jnp.float32
# Added to g^2 before averaging, as in Adafactor, so that all-zero rows stay positive.
FACTORED_EPS = 1e-30


def _decays(decays) -> jax.Array:
  return jnp.clip(jnp.asarray(decays, F32), 0.0, 1.0)


def safe_rsqrt(x: jax.Array) -> jax.Array:
  """``1 / sqrt(max(x, 1e-9))``: finite for ``x <= 0``."""
  return jax.lax.rsqrt(jnp.maximum(x, 1e-9))


def _zeros_per_decay(params: Any, num_decays: int) -> Any:
  """float32 zeros of shape ``p.shape + (num_decays,)`` for every leaf ``p``."""
  return jax.tree.map(lambda p: jnp.zeros(jnp.shape(p) + (num_decays,), F32), params)


def _ema(acc: Any, grad: Any, b: jax.Array, of_grad) -> Any:
  """``a_k <- b_k a_k + (1 - b_k) of_grad(g)`` per leaf, for every decay ``b_k`` (the
  trailing axis of ``a``); the one update behind momentum and RMS."""
  return jax.tree.map(lambda a, g: b * a + (1.0 - b) * of_grad(jnp.asarray(g, F32))[..., None],
                      acc, grad)


# ----------------------------------------------------------------------------- momentum


@flax.struct.dataclass
class MomentumState:
  """m: pytree like params, each leaf float32 of shape ``p.shape + (K,)``."""
  m: Any


def momentum_init(params: Any, num_decays: int) -> MomentumState:
  """All-zero momenta, shape ``p.shape + (num_decays,)`` per leaf."""
  return MomentumState(m=_zeros_per_decay(params, num_decays))


def momentum_update(state: MomentumState, grad: Any, decays, clip: bool = True
                    ) -> MomentumState:
  """``m_k <- b_k m_k + (1 - b_k) g`` for every decay ``b_k``; ``clip=False`` uses the
  decays as given (the reference's AdafacMLPLOpt does not clip its learned momentum
  decays, so a theta trained there may hold decays outside ``[0, 1]``)."""
  b = _decays(decays) if clip else jnp.asarray(decays, F32)
  return MomentumState(m=_ema(state.m, grad, b, lambda g: g))


# ----------------------------------------------------------------------------- RMS


@flax.struct.dataclass
class RMSState:
  """v: pytree like params, each leaf float32 of shape ``p.shape + (K,)`` (mean of g^2)."""
  v: Any


def rms_init(params: Any, num_decays: int) -> RMSState:
  """All-zero second moments, shape ``p.shape + (num_decays,)`` per leaf."""
  return RMSState(v=_zeros_per_decay(params, num_decays))


def rms_update(state: RMSState, grad: Any, decays) -> RMSState:
  """``v_k <- b_k v_k + (1 - b_k) g^2`` for every decay ``b_k``."""
  return RMSState(v=_ema(state.v, grad, _decays(decays), jnp.square))


# ----------------------------------------------------------------------------- Adafactor


def factored_dims(shape: Sequence[int]) -> Optional[Tuple[int, int]]:
  """The axes a tensor's second moment is factored over, or None for rank < 2.

  Returns ``(d_col, d_row)``: ``d_row`` is the largest axis and ``d_col`` the second
  largest (ties: the later axis counts as larger), as Adafactor does. "Row" statistics
  average ``g^2`` over ``d_row`` (one value per index of every other axis), "column"
  statistics average over ``d_col``.
  """
  if len(shape) < 2:
    return None
  order = np.argsort(np.asarray(shape), kind="stable")
  return int(order[-2]), int(order[-1])


@flax.struct.dataclass
class FactoredState:
  """Adafactor accumulators, per leaf (``K`` decays on the trailing axis):

  v_row: ``mean_{d_row}(g^2)``, shape ``delete(p.shape, d_row) + (K,)``;
  v_col: ``mean_{d_col}(g^2)``, shape ``delete(p.shape, d_col) + (K,)``;
  v_full: ``g^2`` itself, shape ``p.shape + (K,)``.
  Factored leaves (rank >= 2) hold an empty ``[0, K]`` v_full; unfactored ones an empty
  v_row/v_col. Empty arrays (not None) keep all three trees shaped like params.
  """
  v_row: Any
  v_col: Any
  v_full: Any


def factored_init(params: Any, num_decays: int) -> FactoredState:
  """Zero accumulators; see ``FactoredState`` for the shapes."""
  empty = lambda: jnp.zeros((0, num_decays), F32)

  def one(p):
    shape = tuple(jnp.shape(p))
    dims = factored_dims(shape)
    if dims is None:
      return empty(), empty(), jnp.zeros(shape + (num_decays,), F32)
    d_col, d_row = dims
    row_shape = tuple(np.delete(np.asarray(shape), d_row)) + (num_decays,)
    col_shape = tuple(np.delete(np.asarray(shape), d_col)) + (num_decays,)
    return jnp.zeros(row_shape, F32), jnp.zeros(col_shape, F32), empty()

  leaves, treedef = jax.tree.flatten(params)
  rows, cols, fulls = zip(*[one(p) for p in leaves]) if leaves else ((), (), ())
  return FactoredState(v_row=jax.tree.unflatten(treedef, rows),
                       v_col=jax.tree.unflatten(treedef, cols),
                       v_full=jax.tree.unflatten(treedef, fulls))


def factored_scales(v_row: jax.Array, v_col: jax.Array, shape: Sequence[int]):
  """Per-axis factors whose product is ``1 / sqrt(V_hat)`` for a factored tensor.

  ``V_hat = R C / mean(R)`` is Adafactor's rank-1 estimate of ``E[g^2]`` (exact when
  ``g^2`` is itself rank 1), with ``R = v_row`` expanded along ``d_row`` and ``C = v_col``
  expanded along ``d_col``; ``mean(R)`` averages ``v_row`` over its ``d_col`` axis.
  Returns ``(row_factor, col_factor)`` of shapes broadcastable to ``shape + (K,)``:
  ``rsqrt(R / mean(R))`` and ``rsqrt(C)``.
  """
  d_col, d_row = factored_dims(shape)
  d_col_in_row = d_col - 1 if d_col > d_row else d_col  # v_row lacks axis d_row
  row_mean = jnp.mean(v_row, axis=d_col_in_row, keepdims=True)
  row_factor = safe_rsqrt(v_row / (row_mean + 1e-9))
  col_factor = safe_rsqrt(v_col)
  return jnp.expand_dims(row_factor, d_row), jnp.expand_dims(col_factor, d_col)


def factored_update(state: FactoredState, grad: Any, decays) -> Tuple[FactoredState, Any]:
  """One Adafactor accumulator step and the preconditioned gradient, per decay.

  With ``s = g^2 + 1e-30`` and decay ``b_k``:

  - rank >= 2: ``v_row <- b v_row + (1-b) mean_{d_row}(s)``,
    ``v_col <- b v_col + (1-b) mean_{d_col}(s)``, and
    ``y = g * rsqrt(R / mean(R)) * rsqrt(C)`` (``= g / sqrt(V_hat)``, see
    ``factored_scales``);
  - rank < 2: ``v_full <- b v_full + (1-b) s`` and ``y = g * rsqrt(v_full + 1e-9)``.

  Returns ``(new_state, y)``; ``y`` has one leaf per param, shape ``p.shape + (K,)``.
  """
  b = _decays(decays)

  def one(v_row, v_col, v_full, g):
    g = jnp.asarray(g, F32)
    s = jnp.square(g) + FACTORED_EPS
    dims = factored_dims(g.shape)
    if dims is None:
      v_full = b * v_full + (1.0 - b) * s[..., None]
      return v_row, v_col, v_full, g[..., None] * safe_rsqrt(v_full + 1e-9)
    d_col, d_row = dims
    v_row = b * v_row + (1.0 - b) * jnp.mean(s, axis=d_row)[..., None]
    v_col = b * v_col + (1.0 - b) * jnp.mean(s, axis=d_col)[..., None]
    row_factor, col_factor = factored_scales(v_row, v_col, g.shape)
    return v_row, v_col, v_full, g[..., None] * row_factor * col_factor

  leaves_g, treedef = jax.tree.flatten(grad)
  rows = treedef.flatten_up_to(state.v_row)
  cols = treedef.flatten_up_to(state.v_col)
  fulls = treedef.flatten_up_to(state.v_full)
  outs = [one(*a) for a in zip(rows, cols, fulls, leaves_g)]
  unflat = lambda i: jax.tree.unflatten(treedef, [o[i] for o in outs])
  return FactoredState(v_row=unflat(0), v_col=unflat(1), v_full=unflat(2)), unflat(3)
