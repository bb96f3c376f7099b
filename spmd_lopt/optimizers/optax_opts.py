"""Hand-designed optimizers under the reference library's names and constructor arguments.

Each class is one ``optax`` transformation behind the ``Optimizer`` interface
(``OptaxOptimizer``): see optax's documentation for the update rule of each. Defaults are
the reference's (e.g. ``Adam(learning_rate=0.01, epsilon_root=1e-8)``), so a ported script
gets the same numbers. ``learning_rate`` may be a float or an optax schedule
``step -> lr`` (e.g. one from ``optimizers.learning_rate_schedules``).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import flax
import jax
import jax.numpy as jnp
import optax

from spmd_lopt.optimizers.base import (  # noqa: F401  (re-exported, reference names)
    OptaxOptimizer, OptaxState, ScalarOrSchedule)


def _fmt(**kw) -> str:
  return "_".join(f"{k}{v}" for k, v in kw.items())


class SGD(OptaxOptimizer):
  """``p <- p - lr * g``."""

  def __init__(self, learning_rate: ScalarOrSchedule = 0.01):
    self.learning_rate = learning_rate
    super().__init__(optax.sgd(learning_rate), name=f"SGD_lr{learning_rate}")


class SGDM(OptaxOptimizer):
  """Heavy-ball momentum: ``m <- mu*m + g``; ``p <- p - lr*m``."""

  def __init__(self, learning_rate: ScalarOrSchedule = 0.01, momentum: float = 0.9):
    self.learning_rate = learning_rate
    self.momentum = momentum
    super().__init__(optax.sgd(learning_rate, momentum=momentum),
                     name=f"SGDM_lr{learning_rate}_m{momentum}")


class Adam(OptaxOptimizer):
  """Adam: bias-corrected ``p <- p - lr * m_hat / (sqrt(v_hat + eps_root) + eps)``.

  ``epsilon_root`` (default 1e-8, the reference's) keeps the square root differentiable at
  zero, which matters when Adam itself is differentiated through.
  """

  def __init__(self, learning_rate: ScalarOrSchedule = 0.01, beta1: float = 0.9,
               beta2: float = 0.999, epsilon: float = 1e-8, epsilon_root: float = 1e-8):
    self.learning_rate, self.beta1, self.beta2 = learning_rate, beta1, beta2
    self.epsilon, self.epsilon_root = epsilon, epsilon_root
    super().__init__(
        optax.adam(learning_rate, b1=beta1, b2=beta2, eps=epsilon, eps_root=epsilon_root),
        name="Adam_" + _fmt(lr=learning_rate, b1=beta1, b2=beta2, eps=epsilon,
                            epsroot=epsilon_root))


def piecewise_linear(times: Sequence[float], vals: Sequence[float]) -> Callable:
  """``step -> value``: linear between ``(times[i], vals[i])``, constant outside.

  An optax schedule (``optax.piecewise_interpolate_schedule`` needs multiplicative
  boundaries, so ``optax.join_schedules`` of linear pieces is used).
  """
  times, vals = list(times), list(vals)
  if len(times) != len(vals) or not times:
    raise ValueError(f"piecewise_linear needs as many times as vals (>= 1), got "
                     f"{len(times)} and {len(vals)}.")
  if len(times) == 1:
    return optax.constant_schedule(vals[0])
  pieces = [optax.constant_schedule(vals[0])]
  for (t0, v0), (t1, v1) in zip(zip(times, vals), zip(times[1:], vals[1:])):
    pieces.append(optax.linear_schedule(v0, v1, transition_steps=t1 - t0))
  return optax.join_schedules(pieces, boundaries=times[:-1])


class PiecewiseLinearAdam(OptaxOptimizer):
  """Adam whose learning rate follows ``piecewise_linear(times, lrs)`` over steps."""

  def __init__(self, times: Sequence[float] = (10000, 20000),
               lrs: Sequence[float] = (1e-4, 1e-5), beta1: float = 0.9,
               beta2: float = 0.999, epsilon: float = 1e-8, epsilon_root: float = 1e-8):
    self.times, self.lrs = tuple(times), tuple(lrs)
    super().__init__(
        optax.adam(piecewise_linear(times, lrs), b1=beta1, b2=beta2, eps=epsilon,
                   eps_root=epsilon_root),
        name=f"PiecewiseLinearAdam_times{self.times}_lrs{self.lrs}")


class RMSProp(OptaxOptimizer):
  """``v <- decay*v + (1-decay)*g^2``; step ``lr*g/(sqrt(v)+eps)``, optionally with
  (Nesterov) momentum."""

  def __init__(self, learning_rate: ScalarOrSchedule = 0.01, decay: float = 0.9,
               epsilon: float = 1e-8, momentum: Optional[float] = 0.0,
               nesterov: bool = False):
    self.learning_rate, self.decay, self.epsilon = learning_rate, decay, epsilon
    self.momentum, self.nesterov = momentum, nesterov
    super().__init__(
        optax.rmsprop(learning_rate, decay=decay, eps=epsilon, momentum=momentum or None,
                      nesterov=nesterov),
        name="RMSProp_" + _fmt(lr=learning_rate, d=decay, eps=epsilon, m=momentum,
                               nesterov=nesterov))


class AdaBelief(OptaxOptimizer):
  """AdaBelief: Adam with the second moment of ``g - m`` instead of ``g``."""

  def __init__(self, learning_rate: ScalarOrSchedule = 0.01, b1: float = 0.9,
               b2: float = 0.999, eps: float = 1e-16, eps_root: float = 1e-16):
    super().__init__(optax.adabelief(learning_rate, b1=b1, b2=b2, eps=eps, eps_root=eps_root),
                     name="AdaBelief_" + _fmt(lr=learning_rate, b1=b1, b2=b2))


class AdamW(OptaxOptimizer):
  """Adam with decoupled weight decay: ``p <- p - lr*(adam_step + weight_decay*p)``."""

  def __init__(self, learning_rate: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999,
               eps: float = 1e-8, eps_root: float = 0.0, mu_dtype: Optional[Any] = None,
               weight_decay: float = 1e-4, mask: Optional[Any] = None):
    self.learning_rate, self.weight_decay = learning_rate, weight_decay
    super().__init__(
        optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, eps_root=eps_root,
                    mu_dtype=mu_dtype, weight_decay=weight_decay, mask=mask),
        name="AdamW_" + _fmt(lr=learning_rate, wd=weight_decay))


class Fromage(OptaxOptimizer):
  """Fromage: steps relative to each tensor's norm."""

  def __init__(self, learning_rate: float, min_norm: float = 1e-6):
    super().__init__(optax.fromage(learning_rate, min_norm), name=f"Fromage_lr{learning_rate}")


class Lars(OptaxOptimizer):
  """LARS: SGD momentum with a per-layer trust ratio."""

  def __init__(self, learning_rate: float, weight_decay: float = 0.0,
               weight_decay_mask: Any = True, trust_coefficient: float = 0.001,
               eps: float = 0.0, trust_ratio_mask: Any = True, momentum: float = 0.9,
               nesterov: bool = False, min_norm: float = 1e-6):
    del min_norm  # accepted for the reference's signature; optax's lars has no such knob
    super().__init__(
        optax.lars(learning_rate, weight_decay=weight_decay,
                   weight_decay_mask=weight_decay_mask, trust_coefficient=trust_coefficient,
                   eps=eps, trust_ratio_mask=trust_ratio_mask, momentum=momentum,
                   nesterov=nesterov),
        name=f"Lars_lr{learning_rate}")


class Lamb(OptaxOptimizer):
  """LAMB: Adam steps rescaled by a per-layer trust ratio."""

  def __init__(self, learning_rate: float, b1: float = 0.9, b2: float = 0.999,
               eps: float = 1e-6, eps_root: float = 0.0, weight_decay: float = 0.0,
               mask: Optional[Any] = None):
    super().__init__(optax.lamb(learning_rate, b1=b1, b2=b2, eps=eps, eps_root=eps_root,
                                weight_decay=weight_decay, mask=mask),
                     name=f"Lamb_lr{learning_rate}")


class RAdam(OptaxOptimizer):
  """Rectified Adam."""

  def __init__(self, learning_rate: float, b1: float = 0.9, b2: float = 0.999,
               eps: float = 1e-8, eps_root: float = 0.0, threshold: float = 5.0):
    super().__init__(optax.radam(learning_rate, b1=b1, b2=b2, eps=eps, eps_root=eps_root,
                                 threshold=threshold), name=f"RAdam_lr{learning_rate}")


class Yogi(OptaxOptimizer):
  """Yogi: Adam with an additive, sign-controlled second-moment update."""

  def __init__(self, learning_rate: float, b1: float = 0.9, b2: float = 0.999,
               eps: float = 1e-3):
    super().__init__(optax.yogi(learning_rate, b1=b1, b2=b2, eps=eps),
                     name=f"Yogi_lr{learning_rate}")


class Adafactor(OptaxOptimizer):
  """Adafactor: factored second moments for matrices of at least
  ``min_dim_size_to_factor`` rows and columns."""

  def __init__(self, learning_rate: float, min_dim_size_to_factor: int = 128,
               decay_rate: float = 0.8, decay_offset: int = 0,
               multiply_by_parameter_scale: bool = True,
               clipping_threshold: Optional[float] = 1.0, momentum: Optional[float] = None,
               dtype_momentum: Any = jnp.float32, weight_decay_rate: Optional[float] = None,
               eps: float = 1e-30, factored: bool = True, weight_decay_mask: Any = None):
    super().__init__(
        optax.adafactor(learning_rate, min_dim_size_to_factor=min_dim_size_to_factor,
                        decay_rate=decay_rate, decay_offset=decay_offset,
                        multiply_by_parameter_scale=multiply_by_parameter_scale,
                        clipping_threshold=clipping_threshold, momentum=momentum,
                        dtype_momentum=dtype_momentum, weight_decay_rate=weight_decay_rate,
                        eps=eps, factored=factored, weight_decay_mask=weight_decay_mask),
        name=f"Adafactor_lr{learning_rate}")


class AdaGrad(OptaxOptimizer):
  """AdaGrad: ``a <- a + g^2``; step ``lr * g / sqrt(a + eps)``."""

  def __init__(self, learning_rate: float, initial_accumulator_value: float = 0.1,
               eps: float = 1e-7):
    super().__init__(optax.adagrad(learning_rate,
                                   initial_accumulator_value=initial_accumulator_value,
                                   eps=eps), name=f"AdaGrad_lr{learning_rate}")


@flax.struct.dataclass
class SM3OptState:
  """``OptaxState`` plus which leaves (flatten order) were scalars: SM3 needs rank >= 1, so
  scalars are kept as shape ``[1]`` inside and squeezed back by ``get_params``."""
  params: Any
  state: Any
  optax_opt_state: Any
  iteration: jax.Array
  should_reshape: Any = flax.struct.field(pytree_node=False)


class SM3(OptaxOptimizer):
  """SM3: memory-efficient adaptive steps from per-axis accumulators."""

  def __init__(self, learning_rate: float, momentum: float = 0.9, b2: float = 1.0):
    super().__init__(optax.chain(optax.scale_by_sm3(b1=momentum, b2=b2),
                                 optax.scale(-learning_rate)), name=f"SM3_lr{learning_rate}")

  @staticmethod
  def _expand(tree, reshape):
    leaves, treedef = jax.tree.flatten(tree)
    return treedef.unflatten(
        [jnp.expand_dims(x, 0) if r else x for x, r in zip(leaves, reshape)])

  def init(self, params, model_state=None, num_steps=None, key=None):
    reshape = tuple(jnp.ndim(x) == 0 for x in jax.tree.leaves(params))
    out = super().init(self._expand(params, reshape), model_state, num_steps, key)
    return SM3OptState(out.params, out.state, out.optax_opt_state, out.iteration, reshape)

  def update(self, opt_state, grad, loss=None, model_state=None, key=None, **kwargs):
    grad = self._expand(grad, opt_state.should_reshape)
    inner = OptaxState(opt_state.params, opt_state.state, opt_state.optax_opt_state,
                       opt_state.iteration)
    out = super().update(inner, grad, loss, model_state, key, **kwargs)
    return SM3OptState(out.params, out.state, out.optax_opt_state, out.iteration,
                       opt_state.should_reshape)

  def get_params(self, opt_state):
    leaves, treedef = jax.tree.flatten(opt_state.params)
    return treedef.unflatten([jnp.squeeze(x, 0) if r else x
                              for x, r in zip(leaves, opt_state.should_reshape)])

  def set_params(self, opt_state, params):
    return opt_state.replace(params=self._expand(params, opt_state.should_reshape))
