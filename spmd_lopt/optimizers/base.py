"""The ``Optimizer`` interface and hand-designed optimizers built on optax.

An ``Optimizer`` owns its parameters: ``init(params) -> opt_state`` and
``update(opt_state, grad, loss=None, model_state=None, key=None) -> opt_state``, with
``get_params(opt_state)`` to read them back. This is the reference library's interface; it
lets a learned optimizer (which needs the loss, the iteration and a key) and a
hand-designed one be swapped everywhere, as the inner optimizer of a task or as the outer
optimizer of theta.

Every hand-designed optimizer here is an ``optax.GradientTransformation`` wrapped by
``OptaxOptimizer``; none is written by hand.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import flax
import jax
import jax.numpy as jnp
import optax

Params = Any
ModelState = Any
ScalarOrSchedule = Union[float, Callable[[jax.Array], jax.Array]]


@flax.struct.dataclass
class OptaxState:
  """State of an ``OptaxOptimizer``.

  params: the parameters being optimized. state: model state (e.g. batch-norm statistics)
  carried alongside, untouched by the optimizer. optax_opt_state: the wrapped
  transformation's state. iteration: int32 count of ``update`` calls.
  """
  params: Params
  state: ModelState
  optax_opt_state: Any
  iteration: jax.Array


class Optimizer:
  """Base class: pure ``init``/``update`` over an optimizer state that holds the params."""

  name: str = "Optimizer"

  def init(self, params: Params, model_state: ModelState = None,
           num_steps: Optional[int] = None, key: Optional[jax.Array] = None):
    raise NotImplementedError

  def update(self, opt_state, grad, loss: Optional[jax.Array] = None,
             model_state: ModelState = None, key: Optional[jax.Array] = None, **kwargs):
    raise NotImplementedError

  def get_params(self, opt_state) -> Params:
    return opt_state.params

  def get_state(self, opt_state) -> ModelState:
    return opt_state.state

  def set_params(self, opt_state, params: Params):
    return opt_state.replace(params=params)

  def get_params_state(self, opt_state):
    return self.get_params(opt_state), self.get_state(opt_state)


class OptaxOptimizer(Optimizer):
  """Adapt any ``optax.GradientTransformation`` to the ``Optimizer`` interface.

  update: ``u, s' = tx.update(g, s, params)``; ``params' = params + u``;
  ``iteration' = iteration + 1``. ``loss`` and ``key`` are accepted and ignored.
  """

  def __init__(self, tx: optax.GradientTransformation, name: Optional[str] = None):
    self.tx = tx
    self.name = name or type(self).__name__

  def init(self, params, model_state=None, num_steps=None, key=None):
    del num_steps, key
    return OptaxState(params=params, state=model_state,
                      optax_opt_state=self.tx.init(params),
                      iteration=jnp.asarray(0, jnp.int32))

  def update(self, opt_state, grad, loss=None, model_state=None, key=None, **kwargs):
    del loss, key, kwargs
    updates, new_tx_state = self.tx.update(grad, opt_state.optax_opt_state,
                                           opt_state.params)
    params = optax.apply_updates(opt_state.params, updates)
    state = opt_state.state if model_state is None else model_state
    return OptaxState(params=params, state=state, optax_opt_state=new_tx_state,
                      iteration=opt_state.iteration + 1)


class SGD(OptaxOptimizer):
  """``p <- p - lr * g``."""

  def __init__(self, learning_rate: ScalarOrSchedule = 0.01):
    self.learning_rate = learning_rate
    super().__init__(optax.sgd(learning_rate), name=f"SGD_lr{learning_rate}")


class SGDM(OptaxOptimizer):
  """Heavy-ball momentum: ``m <- mu*m + g``; ``p <- p - lr*m``."""

  def __init__(self, learning_rate: ScalarOrSchedule = 0.01, momentum: float = 0.9):
    self.learning_rate = learning_rate
    super().__init__(optax.sgd(learning_rate, momentum=momentum),
                     name=f"SGDM_lr{learning_rate}_m{momentum}")


class Adam(OptaxOptimizer):
  """Adam (Kingma & Ba): bias-corrected ``m/(sqrt(v + eps_root) + eps)`` steps.

  ``epsilon_root`` defaults to 1e-8 as in the reference library (it keeps the square root
  differentiable at zero, which matters when Adam is itself meta-trained).
  """

  def __init__(self, learning_rate: ScalarOrSchedule = 1e-4, beta1: float = 0.9,
               beta2: float = 0.999, epsilon: float = 1e-8, epsilon_root: float = 1e-8):
    self.learning_rate = learning_rate
    super().__init__(optax.adam(learning_rate, b1=beta1, b2=beta2, eps=epsilon,
                                eps_root=epsilon_root), name=f"Adam_lr{learning_rate}")


class AdamW(OptaxOptimizer):
  """Adam with decoupled weight decay: ``p <- p - lr*(adam_step + wd*p)``."""

  def __init__(self, learning_rate: ScalarOrSchedule = 1e-4, beta1: float = 0.9,
               beta2: float = 0.999, epsilon: float = 1e-8, weight_decay: float = 1e-4):
    self.learning_rate = learning_rate
    super().__init__(optax.adamw(learning_rate, b1=beta1, b2=beta2, eps=epsilon,
                                 weight_decay=weight_decay), name=f"AdamW_lr{learning_rate}")


class RMSProp(OptaxOptimizer):
  """``v <- decay*v + (1-decay)*g^2``; ``p <- p - lr*g/(sqrt(v)+eps)``."""

  def __init__(self, learning_rate: ScalarOrSchedule = 1e-3, decay: float = 0.9,
               epsilon: float = 1e-8, momentum: Optional[float] = None):
    self.learning_rate = learning_rate
    super().__init__(optax.rmsprop(learning_rate, decay=decay, eps=epsilon,
                                   momentum=momentum), name=f"RMSProp_lr{learning_rate}")


class GradientClipOptimizer(Optimizer):
  """Clip every gradient entry to ``[-grad_clip, grad_clip]``, then apply ``opt``."""

  def __init__(self, opt: Optimizer, grad_clip: float = 3.0):
    self.opt = opt
    self.grad_clip = grad_clip
    self.name = f"GradientClip{grad_clip}_{opt.name}"

  def init(self, *args, **kwargs):
    return self.opt.init(*args, **kwargs)

  def update(self, opt_state, grad, **kwargs):
    grad = jax.tree.map(lambda g: jnp.clip(g, -self.grad_clip, self.grad_clip), grad)
    return self.opt.update(opt_state, grad, **kwargs)

  def get_params(self, opt_state):
    return self.opt.get_params(opt_state)

  def get_state(self, opt_state):
    return self.opt.get_state(opt_state)

  def set_params(self, opt_state, params):
    return self.opt.set_params(opt_state, params)
