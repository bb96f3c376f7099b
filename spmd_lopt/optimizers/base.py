"""The ``Optimizer`` interface and hand-designed optimizers built on optax.

An ``Optimizer`` owns its parameters: ``init(params) -> opt_state`` and
``update(opt_state, grad, loss=None, model_state=None, key=None) -> opt_state``, with
``get_params(opt_state)`` to read them back. This is the reference library's interface; it
lets a learned optimizer (which needs the loss, the iteration and a key) and a
hand-designed one be swapped everywhere, as the inner optimizer of a task or as the outer
optimizer of theta.

Every hand-designed optimizer is an ``optax.GradientTransformation`` wrapped by
``OptaxOptimizer``; none is written by hand. They live in ``optimizers.optax_opts`` under
the reference library's names and arguments; ``SGD``, ``SGDM``, ``Adam``, ``AdamW`` and
``RMSProp`` are also reachable from this module, as in the reference.
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
    self.opt = tx  # the reference's attribute name
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


class WrappedOptimizer(Optimizer):
  """Base of an optimizer that wraps ``opt`` and changes only its ``update``: state layout,
  ``init``, ``get_params``, ``get_state`` and ``set_params`` are ``opt``'s own."""

  def __init__(self, opt: Optimizer):
    _check_instance(opt, type(self).__name__)
    self.opt = opt

  def init(self, *args, **kwargs):
    return self.opt.init(*args, **kwargs)

  def get_params(self, opt_state):
    return self.opt.get_params(opt_state)

  def get_state(self, opt_state):
    return self.opt.get_state(opt_state)

  def set_params(self, opt_state, params):
    return self.opt.set_params(opt_state, params)


class GradientClipOptimizer(WrappedOptimizer):
  """Clip every gradient entry to ``[-grad_clip, grad_clip]``, then apply ``opt``."""

  def __init__(self, opt: Optimizer, grad_clip: float = 3.0):
    super().__init__(opt)
    self.grad_clip = grad_clip
    self.name = f"GradientClip{grad_clip}_{opt.name}"

  def update(self, opt_state, grad, *args, **kwargs):
    grad = jax.tree.map(lambda g: jnp.clip(g, -self.grad_clip, self.grad_clip), grad)
    return self.opt.update(opt_state, grad, *args, **kwargs)


def _check_instance(opt, who: str):
  if not isinstance(opt, Optimizer):
    raise ValueError(f"{who} needs an Optimizer instance, got {opt!r} (a class instead of an "
                     "instance?).")


@flax.struct.dataclass
class GraftedOptimizerState:
  """State of ``GraftedOptimizer``: the params, the model state, and both inner states
  (each of which also tracks its own copy of the params)."""
  iteration: jax.Array
  params: Params
  state: ModelState
  mag_opt_state: Any
  dir_opt_state: Any


class GraftedOptimizer(Optimizer):
  """Learning-rate grafting (Agarwal et al., 2020): the step length of one optimizer, the
  step direction of another.

  Both optimizers step from the current params ``p``; with their steps
  ``m = mag_opt(p) - p`` and ``d = dir_opt(p) - p`` (whole trees),
  ``p <- p + d * ||m|| / ||d||`` with global norms over all leaves, as the reference does
  (no step where ``d = 0``, where the reference would divide by zero). Both inner states are
  then re-anchored at the new params so their statistics stay in step.
  """

  def __init__(self, magnitude_opt: Optimizer, direction_opt: Optimizer):
    _check_instance(magnitude_opt, "GraftedOptimizer")
    _check_instance(direction_opt, "GraftedOptimizer")
    self.magnitude_opt = magnitude_opt
    self.direction_opt = direction_opt
    self.name = f"Grafted_{magnitude_opt.name}_{direction_opt.name}"

  def init(self, params, model_state=None, num_steps=None, key=None, **kwargs):
    kw = dict(model_state=model_state, num_steps=num_steps, key=key, **kwargs)
    return GraftedOptimizerState(
        iteration=jnp.asarray(0, jnp.int32), params=params, state=model_state,
        mag_opt_state=self.magnitude_opt.init(params, **kw),
        dir_opt_state=self.direction_opt.init(params, **kw))

  def update(self, opt_state, grad, loss=None, model_state=None, key=None, **kwargs):
    p = opt_state.params
    kw = dict(loss=loss, model_state=model_state, key=key, **kwargs)
    mag_state = self.magnitude_opt.update(opt_state.mag_opt_state, grad, **kw)
    dir_state = self.direction_opt.update(opt_state.dir_opt_state, grad, **kw)
    # float32 steps and norms: a float16 step can round to exactly 0.
    f32 = lambda a, b: a.astype(jnp.float32) - b.astype(jnp.float32)
    m = jax.tree.map(f32, self.magnitude_opt.get_params(mag_state), p)
    d = jax.tree.map(f32, self.direction_opt.get_params(dir_state), p)
    d_norm = optax.tree.norm(d)
    scale = jnp.where(d_norm > 0, optax.tree.norm(m) / jnp.maximum(d_norm, 1e-30), 0.0)
    new_p = jax.tree.map(lambda x, dx: (x + dx * scale).astype(x.dtype), p, d)
    state = opt_state.state if model_state is None else model_state
    return GraftedOptimizerState(
        iteration=opt_state.iteration + 1, params=new_p, state=state,
        mag_opt_state=self.magnitude_opt.set_params(mag_state, new_p),
        dir_opt_state=self.direction_opt.set_params(dir_state, new_p))


# The reference also exposes its basic optax-backed optimizers from this module.
_FROM_OPTAX_OPTS = ("SGD", "SGDM", "Adam", "AdamW", "RMSProp", "PiecewiseLinearAdam")


def __getattr__(name):
  # Lazy, so that ``optax_opts`` (which subclasses ``OptaxOptimizer``) can import this module.
  if name in _FROM_OPTAX_OPTS:
    from spmd_lopt.optimizers import optax_opts
    return getattr(optax_opts, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
