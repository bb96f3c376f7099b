"""A learned optimizer's step scaled by a learning-rate multiplier, as Celo2 is deployed.

A learned rule's step has the scale it was meta-trained with (Celo2: ``step_mult`` times a
unit-RMS direction); its authors tune a learning rate on top of it per task. For an inner
optimizer ``opt`` with parameters ``p_t`` and ``p'_{t+1} = get_params(opt.update(s_t, g_t))``,
``ScaledUpdateOptimizer(opt, m)`` steps to

  ``p_{t+1} = p_t + m * (p'_{t+1} - p_t)``

and keeps the rest of the updated state (accumulators, iteration count) as ``opt`` left it,
so the rule sees the same gradient statistics and only the applied step changes. ``m`` may
be a traced scalar (the suite vmaps a grid of multipliers); at ``m == 1`` the parameters are
exactly ``opt``'s own (selected, not recomputed, so the x1 run equals the untuned one).

``ScaledUpdateOptimizer(opt, m, decay)`` adds decoupled weight decay on top:

  ``p_{t+1} = p_t + m * (p'_{t+1} - p_t) - m * decay * p_t``

which is Celo2's deployment ``chain(rule, add_decayed_weights(wd), scale(lr))`` with
``lr = m * step_mult`` and ``decay = wd * step_mult`` (AdamW's ``lr * wd`` per step). With
``decay == 0`` (the default) it is exactly the decay-free update above.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from spmd_lopt.optimizers import base as opt_base


class ScaledUpdateOptimizer(opt_base.WrappedOptimizer):
  """``opt`` with each step's parameter change multiplied by ``multiplier`` (f32[]) and,
  if ``decay`` (f32[]) is not 0, ``multiplier * decay * p`` taken off every parameter."""

  def __init__(self, opt: opt_base.Optimizer, multiplier: Any, decay: Any = 0.0):
    super().__init__(opt)
    self.multiplier = multiplier
    self.decay = decay
    self.name = f"LRScaled_{opt.name}"

  def update(self, opt_state, grad, *args, **kwargs):
    old = self.opt.get_params(opt_state)
    new_state = self.opt.update(opt_state, grad, *args, **kwargs)
    new = self.opt.get_params(new_state)
    m = jnp.asarray(self.multiplier, jnp.float32)
    decay = jnp.asarray(self.decay, jnp.float32)

    def scale(a, b):
      stepped = a + (m * (b - a).astype(jnp.float32)).astype(b.dtype)
      stepped = jnp.where(m == 1.0, b, stepped)
      # decay == 0 selects the decay-free value itself, so wd-free grid points are unchanged
      decayed = stepped - (m * decay * a.astype(jnp.float32)).astype(b.dtype)
      return jnp.where(decay == 0.0, stepped, decayed)

    return self.opt.set_params(new_state, jax.tree.map(scale, old, new))
