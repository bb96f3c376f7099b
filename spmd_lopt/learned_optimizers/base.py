"""The ``LearnedOptimizer`` interface and learnable hand-designed optimizers.

A learned optimizer is a pair: ``init(key) -> theta`` (its meta-parameters, a pytree of
float arrays) and ``opt_fn(theta, is_training) -> Optimizer`` (an inner optimizer whose
update rule is a function of ``theta``). Everything ``opt_fn`` builds must be a pure
function of ``theta``, because meta-training evaluates it at perturbed ``theta``s (ES/PES)
and differentiates through it (truncated backprop), vmapped over tasks.

``LearnableSGD``, ``LearnableSGDM`` and ``LearnableAdam`` expose hand-designed optimizers'
hyper-parameters as ``theta``: meta-training them has a known answer (the best fixed
hyper-parameters), which makes them the sanity check for every estimator.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Dict, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from spmd_lopt.optimizers import base as opt_base

MetaParams = Any


def _json_normal(value):
  """Tuples become lists (recursively) so that a config equals its own JSON round trip."""
  if isinstance(value, (tuple, list)):
    return [_json_normal(v) for v in value]
  if isinstance(value, dict):
    return {k: _json_normal(v) for k, v in value.items()}
  return value


class LearnedOptimizer:
  """Base class. Subclasses implement ``init`` and ``opt_fn``.

  Every subclass records the arguments its constructor was called with (defaults filled
  in), so ``type(lopt)(**lopt.config)`` rebuilds an equivalent optimizer; parameter
  checkpoints store ``config`` next to theta. The recording wraps each subclass's own
  ``__init__`` once, at class creation, so subclasses need no code for it.
  """

  name: Optional[str] = None
  # Whether XLA's CPU library graphs (``xla_options.CPU_OPTIONS``) speed up a meta step
  # that trains tasks with this rule. They fuse chains of products with their bias and
  # ReLU (MLPLOpt's per-parameter MLP, the tasks' own layers); rules whose per-parameter
  # work is mostly elementwise, or whose products feed products (Newton-Schulz), run
  # slower with them and set this False (measured per rule: docs/PERFORMANCE.md,
  # "Round six").
  cpu_library_graphs: bool = True

  def __init_subclass__(cls, **kwargs):
    super().__init_subclass__(**kwargs)
    if "__init__" not in cls.__dict__:
      return  # inherits an already-wrapped __init__ with the same arguments
    original_init = cls.__dict__["__init__"]
    signature = inspect.signature(original_init)

    @functools.wraps(original_init)
    def recording_init(self, *args, **kw):
      # The outermost constructor runs first, so a subclass calling super().__init__
      # keeps its own (the user's) arguments, not its parent's.
      if "_config" not in self.__dict__:
        bound = signature.bind(self, *args, **kw)
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        arguments.pop(next(iter(signature.parameters)))  # self
        for pname, param in signature.parameters.items():
          if param.kind is inspect.Parameter.VAR_KEYWORD and pname in arguments:
            arguments.update(arguments.pop(pname))
          elif param.kind is inspect.Parameter.VAR_POSITIONAL and pname in arguments:
            if arguments.pop(pname):
              raise TypeError(f"{cls.__name__}: *args constructors cannot be recorded "
                              "as a config; use keyword arguments.")
        self._config = _json_normal(arguments)
      original_init(self, *args, **kw)

    cls.__init__ = recording_init

  @property
  def config(self) -> Dict[str, Any]:
    """Constructor keyword arguments (tuples as lists): ``type(self)(**config)`` rebuilds
    an equivalent optimizer."""
    return _json_normal(self.__dict__.get("_config", {}))

  def init(self, key: jax.Array) -> MetaParams:
    raise NotImplementedError

  def opt_fn(self, theta: MetaParams, is_training: bool = False) -> opt_base.Optimizer:
    raise NotImplementedError


@flax.struct.dataclass
class LearnableOptState:
  """State of a learnable hand-designed optimizer: params, model state, an optax state and
  the int32 iteration."""
  params: Any
  state: Any
  optax_opt_state: Any
  iteration: jax.Array


class _ThetaOptax(opt_base.Optimizer):
  """An ``Optimizer`` running the optax transformation ``tx`` built from ``theta``."""

  def __init__(self, tx: optax.GradientTransformation, name: str):
    self.tx = tx
    self.name = name

  def init(self, params, model_state=None, num_steps=None, key=None):
    del num_steps, key
    # Build the optax state from (at least) float32 params: with bfloat16 params the
    # moments would start bfloat16 and turn float32 after one update (theta-derived
    # hyper-parameters are float32), which changes the state's dtype between steps and
    # breaks lax.scan carries (bfloat16 moments also round away (1 - beta2) g^2).
    wide = jax.tree.map(
        lambda p: jnp.asarray(p, jnp.promote_types(jnp.asarray(p).dtype, jnp.float32)),
        params)
    return LearnableOptState(params=params, state=model_state,
                             optax_opt_state=self.tx.init(wide),
                             iteration=jnp.asarray(0, jnp.int32))

  def update(self, opt_state, grad, loss=None, model_state=None, key=None, **kwargs):
    del loss, key, kwargs
    updates, tx_state = self.tx.update(grad, opt_state.optax_opt_state, opt_state.params)
    params = optax.apply_updates(opt_state.params, updates)
    state = opt_state.state if model_state is None else model_state
    return LearnableOptState(params=params, state=state, optax_opt_state=tx_state,
                             iteration=opt_state.iteration + 1)


class LearnableSGD(LearnedOptimizer):
  """SGD with a learned step size: ``theta = {log_lr}``, ``p <- p - exp(log_lr) * g``."""

  def __init__(self, initial_lr: float = 1e-3):
    if initial_lr <= 0:
      raise ValueError(f"LearnableSGD: initial_lr must be positive, got {initial_lr}.")
    self.initial_lr = initial_lr
    self.name = "LearnableSGD"

  def init(self, key):
    del key
    return {"log_lr": jnp.asarray(np.log(self.initial_lr), jnp.float32)}

  def opt_fn(self, theta, is_training=False):
    del is_training
    return _ThetaOptax(optax.sgd(jnp.exp(theta["log_lr"])), self.name)


class LearnableSGDM(LearnedOptimizer):
  """SGD with momentum, learned step size and momentum (the reference's semantics).

  ``theta = {log_lr, one_minus_momentum}`` with ``lr = exp(log_lr)`` and
  ``mu = 1 - exp(one_minus_momentum)``; the update is optax's heavy ball,
  ``m <- mu m + g``, ``p <- p - lr m``.
  """

  def __init__(self, initial_lr: float = 0.01, initial_momentum: float = 0.9):
    if initial_lr <= 0:
      raise ValueError(f"LearnableSGDM: initial_lr must be positive, got {initial_lr}.")
    if not 0.0 <= initial_momentum < 1.0:
      raise ValueError("LearnableSGDM: initial_momentum must lie in [0, 1), got "
                       f"{initial_momentum}.")
    self.initial_lr = initial_lr
    self.initial_momentum = initial_momentum
    self.name = "LearnableSGDM"

  def init(self, key):
    del key
    return {"log_lr": jnp.asarray(np.log(self.initial_lr), jnp.float32),
            "one_minus_momentum": jnp.asarray(np.log(1.0 - self.initial_momentum),
                                              jnp.float32)}

  def opt_fn(self, theta, is_training=False):
    del is_training
    momentum = 1.0 - jnp.exp(theta["one_minus_momentum"])
    return _ThetaOptax(optax.sgd(jnp.exp(theta["log_lr"]), momentum=momentum), self.name)


class LearnableAdam(LearnedOptimizer):
  """Adam with learned hyper-parameters.

  ``theta = {log_lr, one_minus_beta1, one_minus_beta2, log_epsilon}`` where the betas are
  stored as ``log(1 - beta)`` so that every real ``theta`` is a valid optimizer:
  ``lr = exp(log_lr)``, ``beta_i = 1 - exp(.)``, ``eps = exp(log_epsilon)``.
  """

  def __init__(self, initial_lr: float = 1e-3, initial_beta1: float = 0.9,
               initial_beta2: float = 0.999, initial_epsilon: float = 1e-8):
    self.initial = (initial_lr, initial_beta1, initial_beta2, initial_epsilon)
    self.name = "LearnableAdam"

  def init(self, key):
    del key
    lr, b1, b2, eps = self.initial
    f = lambda x: jnp.asarray(x, jnp.float32)
    return {"log_lr": f(np.log(lr)), "one_minus_beta1": f(np.log(1 - b1)),
            "one_minus_beta2": f(np.log(1 - b2)), "log_epsilon": f(np.log(eps))}

  def opt_fn(self, theta, is_training=False):
    del is_training
    tx = optax.adam(jnp.exp(theta["log_lr"]), b1=1 - jnp.exp(theta["one_minus_beta1"]),
                    b2=1 - jnp.exp(theta["one_minus_beta2"]),
                    eps=jnp.exp(theta["log_epsilon"]))
    return _ThetaOptax(tx, self.name)
