"""``MLPLOpt``: a small MLP applied to every parameter independently (reference "LOLv2").

For each parameter tensor ``p`` with gradient ``g`` the optimizer keeps momenta
``m_k <- b_k m_k + (1 - b_k) g`` for decays ``b = (0.1, 0.5, 0.9, 0.99, 0.999, 0.9999)``.
Per scalar entry it builds 19 features:

- 8 "tensor" features ``[g, p, m_1..m_6]``, each normalised by its second moment over the
  entries of that tensor: ``x * rsqrt(1e-5 + mean(x^2))``;
- 11 training-step features ``tanh(t / tau - 1)`` for
  ``tau in (1, 3, 10, 30, 100, 300, 1e3, 3e3, 1e4, 3e4, 1e5)`` (shared by every entry,
  not normalised).

An MLP ``19 -> hidden_size x hidden_layers (ReLU) -> 2`` maps them to a direction ``d`` and
a magnitude ``s``; the update is ``p <- p - d * exp(s * exp_mult) * step_mult``. With the
defaults (hidden 32, 2 layers) theta has 1,762 parameters, as in the reference.

Shapes: a tensor of shape ``S`` has ``prod(S)`` entries of 19 features each (scalars are
treated as shape ``[1]``), so the cost per step is ``O(num_params * |theta|)``.

Computation: the 11 step features and the normalisation are folded into the first layer
(``[x / r, s] W0 + b0 = x (W0[:8] / r) + (s W0[8:] + b0)``, ``r`` the 8 second-moment
norms), so the MLP runs on the raw ``[g, p, m]`` columns of each entry. On CPU the norms,
the MLP and the steps of every tensor of an update are one fused kernel call
(``spmd_lopt.kernels.mlp_lopt_step``; the momenta and ``p - step`` are XLA ops);
``implementation="reference"`` (or ``SPMD_LOPT_KERNELS=0``) runs it all as XLA ops
(``step_entries``). Both are float32 and agree to rounding.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from spmd_lopt.kernels import ffi_util
from spmd_lopt.kernels import mlp_lopt_step
from spmd_lopt.kernels import per_entry_mlp
from spmd_lopt.learned_optimizers import base as lopt_base
from spmd_lopt.learned_optimizers import common
from spmd_lopt.optimizers import base as opt_base

MOMENTUM_DECAYS = (0.1, 0.5, 0.9, 0.99, 0.999, 0.9999)
TANH_TIMESCALES = (1, 3, 10, 30, 100, 300, 1000, 3000, 10000, 30000, 100000)
NUM_TENSOR_FEATURES = 2 + len(MOMENTUM_DECAYS)  # g, p and the momenta: per entry
NUM_FEATURES = NUM_TENSOR_FEATURES + len(TANH_TIMESCALES)


def second_moment_normalizer(x: jax.Array, axis: Sequence[int], eps: float = 1e-5):
  """``x * rsqrt(eps + mean(x^2, axis))``."""
  return x * jax.lax.rsqrt(eps + jnp.mean(jnp.square(x), axis=axis, keepdims=True))


def tanh_embedding(iteration: jax.Array) -> jax.Array:
  """``[tanh(t/tau - 1) for tau in TANH_TIMESCALES]``, shape ``[11]``."""
  t = jnp.asarray(iteration, jnp.float32)
  taus = jnp.asarray(TANH_TIMESCALES, jnp.float32)
  return jnp.tanh(t / taus - 1.0)


def step_entries(p: jax.Array, g: jax.Array, m: jax.Array, tensor_kernel: jax.Array,
                 step_bias: jax.Array, tail: jax.Array, *, exp_mult: float, step_mult: float,
                 hidden_layers: int, implementation: str = "reference") -> jax.Array:
  """One tensor's step as XLA ops (``p' = p - step``; ``mlp_lopt_step``'s docstring).

  ``p`` and ``g`` ``[n]`` float32, ``m`` ``[n, 6]`` (the updated momenta),
  ``tensor_kernel`` ``[8, H]``, ``step_bias`` ``[H]``, ``tail`` packed. ``implementation`` is the per-entry MLP's (``per_entry_mlp.apply``);
  with ``"reference"`` this is the fused kernel's reference and gradient.
  """
  columns = [g[:, None], p[:, None], m]
  # x * rsqrt(1e-5 + mean(x^2)) @ W0 = x @ (rsqrt(...) W0): the normalisation moves into
  # the [8, hidden] kernel instead of a normalised copy of the columns.
  second_moments = jnp.concatenate([jnp.mean(jnp.square(c), axis=0) for c in columns])
  kernel0 = jax.lax.rsqrt(1e-5 + second_moments)[:, None] * tensor_kernel
  out = per_entry_mlp.apply(columns, kernel0, step_bias, tail, hidden_layers=hidden_layers,
                            num_out=2, implementation=implementation)
  return out[:, 0] * jnp.exp(out[:, 1] * exp_mult) * step_mult


def steps_of_tensors(tensors, tensor_kernel, step_bias, tail, **kwargs):
  """``step_entries`` of each ``(p, g, m)`` in ``tensors``: the fused call's reference."""
  return tuple(step_entries(p, g, m, tensor_kernel, step_bias, tail, **kwargs)
               for p, g, m in tensors)


class _PerParamMLP(nn.Module):
  hidden_size: int
  hidden_layers: int

  @nn.compact
  def __call__(self, x):
    for _ in range(self.hidden_layers):
      x = nn.relu(nn.Dense(self.hidden_size)(x))
    return nn.Dense(2)(x)


@flax.struct.dataclass
class SplitTheta:
  """theta with the first layer's kernel ``[19, hidden]`` split into its rows for the 8
  tensor features (``tensor_kernel``, ``[8, hidden]``) and for the 11 step features
  (``step_kernel``, ``[11, hidden]``); ``bias0`` ``[hidden]``; ``tail``: the later layers'
  kernels and biases packed in order (``per_entry_mlp.pack_tail``; empty without hidden
  layers). ``MLPLOpt.prepare_theta`` builds it."""
  tensor_kernel: jax.Array
  step_kernel: jax.Array
  bias0: jax.Array
  tail: jax.Array


@flax.struct.dataclass
class MLPLOptState:
  """params; rolling_features: per-leaf momenta with a trailing axis of size 6;
  iteration: int32 step count; state: model state passed through."""
  params: Any
  rolling_features: Any
  iteration: jax.Array
  state: Any


class MLPLOpt(lopt_base.LearnedOptimizer):
  """Per-parameter MLP learned optimizer (see module docstring for the math)."""

  def __init__(self, exp_mult: float = 0.001, step_mult: float = 0.001,
               hidden_size: int = 32, hidden_layers: int = 2, implementation: str = "auto"):
    """``implementation``: how the rule runs: ``"auto"`` (the fused CPU kernel,
    ``mlp_lopt_step``, where it can run), ``"kernel"`` (it, or an error saying why not) or
    ``"reference"`` (XLA ops)."""
    if hidden_size <= 0 or hidden_layers < 0:
      raise ValueError("MLPLOpt: hidden_size must be positive and hidden_layers >= 0, got "
                       f"{hidden_size}, {hidden_layers}.")
    ffi_util.check_implementation("MLPLOpt", implementation)
    self.implementation = implementation
    self.exp_mult = exp_mult
    self.step_mult = step_mult
    self.hidden_size = hidden_size
    self.hidden_layers = hidden_layers
    self.name = "MLPLOpt"
    self._mlp = _PerParamMLP(hidden_size, hidden_layers)

  def kernel_unavailable(self) -> str:
    """Why ``implementation="auto"`` would not run the fused CPU kernel here ("" if it
    would): the backend, this optimizer's sizes, or the build."""
    return mlp_lopt_step.unavailable(len(MOMENTUM_DECAYS), self.hidden_size,
                                     self.hidden_layers)

  @property
  def cpu_library_graphs(self) -> bool:
    """XLA's CPU library graphs paid for the per-entry MLP as XLA products (1.2-1.5x);
    with the fused kernel they slow the rest of the step (0.90x on 16 image tasks on 1
    device, 0.96x on 64 on 2; docs/PERFORMANCE.md, "Round eight")."""
    return self.implementation == "reference" or bool(self.kernel_unavailable())

  def init(self, key):
    return self._mlp.init(key, jnp.zeros([1, NUM_FEATURES], jnp.float32))

  def prepare_theta(self, theta) -> SplitTheta:
    """theta as ``opt_fn`` reads it (``SplitTheta``); ``opt_fn`` accepts either form.

    Callers that run many steps with one theta (the truncated step's ``unroll``) call this
    once outside their loop: the row blocks are slices of the kernel, which XLA would
    otherwise copy out of it on every inner step (two copies of ``[tasks, 8 | 11, 32]``
    per step, loop-invariant, not hoisted by XLA's CPU pipeline).
    """
    if isinstance(theta, SplitTheta):
      return theta
    layers = [theta["params"][f"Dense_{i}"] for i in range(len(theta["params"]))]
    n_tensor = NUM_TENSOR_FEATURES
    kernel = layers[0]["kernel"]
    tail = (per_entry_mlp.pack_tail(layers[1:]) if len(layers) > 1
            else jnp.zeros(kernel.shape[:-2] + (0,), kernel.dtype))
    return SplitTheta(tensor_kernel=kernel[:n_tensor], step_kernel=kernel[n_tensor:],
                      bias0=layers[0]["bias"], tail=tail)

  def opt_fn(self, theta, is_training=False):
    del is_training
    exp_mult, step_mult = self.exp_mult, self.step_mult
    hidden_layers, implementation = self.hidden_layers, self.implementation
    split = self.prepare_theta(theta)

    class _Opt(opt_base.Optimizer):
      name = "MLPLOpt"

      def init(self, params, model_state=None, num_steps=None, key=None):
        del num_steps, key
        # common's momenta are float32 whatever the params' dtype: a 0.9999 running
        # average cannot move in bfloat16.
        moms = common.momentum_init(params, len(MOMENTUM_DECAYS)).m
        return MLPLOptState(params=params, rolling_features=moms,
                            iteration=jnp.asarray(0, jnp.int32), state=model_state)

      def update(self, opt_state, grad, loss=None, model_state=None, key=None, **kw):
        del loss, key, kw
        moms = common.momentum_update(common.MomentumState(m=opt_state.rolling_features),
                                      grad, MOMENTUM_DECAYS).m
        step_features = tanh_embedding(opt_state.iteration)

        # The 11 step features are shared by every entry of every tensor, so the first
        # layer factors: [x, s] @ W0 + b0 = x @ W0[:8] + (s @ W0[8:] + b0). The second term
        # is computed once per step, and the [n, 19] feature matrix is never built
        # (-17% FLOPs, -30% step time on the tutorial workload; docs/PERFORMANCE.md).
        step_bias = step_features @ split.step_kernel + split.bias0
        consts = {"exp_mult": exp_mult, "step_mult": step_mult,
                  "hidden_layers": hidden_layers}
        weights = (split.tensor_kernel, step_bias, split.tail)

        params, treedef = jax.tree.flatten(opt_state.params)
        # Every tensor as [n] entries (a scalar as [1]) with its momenta as [n, 6].
        flat = [(jnp.reshape(p, (-1,)).astype(jnp.float32),
                 jnp.reshape(g, (-1,)).astype(jnp.float32),
                 jnp.reshape(m, (-1, m.shape[-1])))
                for p, g, m in zip(params, treedef.flatten_up_to(grad),
                                   treedef.flatten_up_to(moms))]
        fused = [i for i, t in enumerate(flat) if implementation != "reference" and
                 not mlp_lopt_step.unsupported(*t, split.tensor_kernel, hidden_layers)]
        # A tensor without entries has no step (its norms would be 0 / 0).
        steps = [jnp.zeros((0,), jnp.float32) if t[0].size == 0 else None for t in flat]
        if fused:
          # The norms, the MLP and the step of every tensor the kernel takes: one call.
          reference = functools.partial(steps_of_tensors, implementation="reference",
                                        **consts)
          for i, s in zip(fused, mlp_lopt_step.apply(reference, [flat[i] for i in fused],
                                                     *weights, **consts)):
            steps[i] = s
        for i, t in enumerate(flat):
          if steps[i] is None:
            steps[i] = step_entries(*t, *weights, implementation=implementation, **consts)
        params = jax.tree.unflatten(treedef, [
            p - jnp.reshape(s, jnp.shape(p)).astype(p.dtype) for p, s in zip(params, steps)])
        state = opt_state.state if model_state is None else model_state
        return MLPLOptState(params=params, rolling_features=moms,
                            iteration=opt_state.iteration + 1, state=state)

    return _Opt()
