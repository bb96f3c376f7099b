"""``AdafacMLPLOpt``: a tiny per-parameter MLP over momentum, RMS and Adafactor features.

State, per parameter tensor ``p`` (shape ``S``) with gradient ``g``, in float32:

- momenta ``m`` at ``M`` decays, RMS ``v`` at ``R`` decays, Adafactor row/column (or full,
  for rank < 2) second moments at ``A`` decays (``common.py``).

The decays are learned: theta holds an offset ``o`` per decay and
``b = 1 - (1 - b0) * exp(10 o)``, i.e. ``o`` moves ``log(1 - b) / 10`` away from the
initial decay ``b0`` (``o = 0`` at init).

Features per scalar entry (after the accumulators are updated with ``g``), with
``y_k = g / sqrt(V_hat_k)`` the Adafactor-preconditioned gradient, ``r_k``/``c_k`` the row
and column statistics broadcast back to ``S`` and ``f_k = rsqrt(R/mean R) rsqrt(C)``:

  ``g, p`` (2) | ``m`` (M) | ``v`` (R) | ``m * rsqrt(v + 1e-6)`` (max(M, R), broadcast) |
  ``rsqrt(v + 1e-6)`` (R) | ``y`` (A) | ``r, c, rsqrt(r + 1e-8), rsqrt(c + 1e-8)`` (4A) |
  ``m * f`` (max(M, A), broadcast)

For rank < 2 tensors ``r = c = v_full`` and ``f = (v_full + 1e-6)^-1/2``, as RMSProp.
With the default decays that is ``2+3+1+3+1+3+12+3 = 28`` features; each is normalised by
its second moment over the entries of the tensor (``x rsqrt(1e-5 + mean x^2)``) and the 11
un-normalised step features ``tanh(t / tau - 1)`` are appended: 39 inputs.

The MLP ``39 -> hidden_size x hidden_layers (ReLU) -> 2`` gives a direction ``d`` and a
magnitude ``s``; ``p <- p - d exp(s exp_mult) step_mult``. With the defaults theta has
``39*4+4 + 4*4+4 + 4*2+2 = 190`` network weights plus ``3+1+3`` decay offsets: 197.

Two evaluation paths compute the same function: ``concat_weights=True`` stacks features
into ``[n, 39]`` and uses matmuls; ``concat_weights=False`` unrolls the network into
scalar multiply-adds over ``[n]`` vectors, which maps to elementwise hardware and can be
faster for hidden sizes this small. ``make_separate_weights=True`` (only with
``concat_weights=False``) stores every network weight as its own scalar leaf in theta
(``w{layer}_{in}_{out}``, ``b{layer}_{out}``); ``split_weights`` is accepted for
compatibility with the reference and changes nothing: the scalar path always reads
matrix entries one by one.
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from spmd_lopt.learned_optimizers import base as lopt_base
from spmd_lopt.learned_optimizers import common
from spmd_lopt.learned_optimizers.mlp_lopt import second_moment_normalizer, tanh_embedding
from spmd_lopt.learned_optimizers.mlp_lopt import TANH_TIMESCALES
from spmd_lopt.optimizers import base as opt_base

F32 = jnp.float32


def decay_to_param(decay):
  """``log(1 - b) / 10``: the unconstrained coordinate decay offsets are added in."""
  return jnp.log(1.0 - jnp.asarray(decay, F32)) / 10.0


def param_to_decay(x):
  """Inverse of ``decay_to_param``: ``1 - exp(10 x)``."""
  return 1.0 - jnp.exp(10.0 * x)


@flax.struct.dataclass
class AdafacMLPLOptState:
  """params; state: model state passed through; momentum/rms/factored: the
  ``common`` accumulator states (float32, trailing decay axis); num_steps: int32 length
  of the inner run given to ``init``; iteration: int32 count of updates."""
  params: Any
  state: Any
  momentum: common.MomentumState
  rms: common.RMSState
  factored: common.FactoredState
  num_steps: jax.Array
  iteration: jax.Array


class AdafacMLPLOpt(lopt_base.LearnedOptimizer):
  """Per-parameter MLP over Adafactor-style features (see module docstring for the math)."""

  # Its meta step on the image MLP runs 1.25x (1 device) to 1.67x (2) faster without
  # XLA's CPU library graphs (lopt_base.LearnedOptimizer.cpu_library_graphs).
  cpu_library_graphs = False

  def __init__(self, exp_mult: float = 0.001, step_mult: float = 0.001,
               hidden_size: int = 4, hidden_layers: int = 2,
               initial_momentum_decays: Sequence[float] = (0.9, 0.99, 0.999),
               initial_rms_decays: Sequence[float] = (0.999,),
               initial_adafactor_decays: Sequence[float] = (0.9, 0.99, 0.999),
               concat_weights: bool = True, make_separate_weights: bool = False,
               split_weights: bool = False):
    if hidden_size <= 0 or hidden_layers < 0:
      raise ValueError("AdafacMLPLOpt: hidden_size must be positive and hidden_layers >= 0,"
                       f" got {hidden_size}, {hidden_layers}.")
    self.mom_decays = tuple(float(d) for d in initial_momentum_decays)
    self.rms_decays = tuple(float(d) for d in initial_rms_decays)
    self.fac_decays = tuple(float(d) for d in initial_adafactor_decays)
    m, r, a = len(self.mom_decays), len(self.rms_decays), len(self.fac_decays)
    if min(m, r, a) == 0:
      raise ValueError("AdafacMLPLOpt: every decay list needs at least one decay.")
    for x, y, what in ((m, r, "momentum and rms"), (m, a, "momentum and adafactor")):
      # m * rsqrt(v) and m * f pair decays elementwise (broadcasting a single one).
      if x != y and 1 not in (x, y):
        raise ValueError(f"AdafacMLPLOpt: {what} decay counts must match or one must be "
                         f"1 (their products are paired elementwise), got {x} and {y}.")
    for d in self.mom_decays + self.rms_decays + self.fac_decays:
      if not 0.0 <= d < 1.0:
        raise ValueError(f"AdafacMLPLOpt: initial decays must lie in [0, 1), got {d}.")
    if make_separate_weights and concat_weights:
      raise ValueError("AdafacMLPLOpt: make_separate_weights needs concat_weights=False.")
    self.exp_mult = exp_mult
    self.step_mult = step_mult
    self.hidden_size = hidden_size
    self.hidden_layers = hidden_layers
    self.concat_weights = concat_weights
    self.make_separate_weights = make_separate_weights
    self.split_weights = split_weights
    self.name = "AdafacMLPLOpt"
    self.num_accumulator_features = (2 + m + r + max(m, r) + r + a + 4 * a + max(m, a))
    self.num_inputs = self.num_accumulator_features + len(TANH_TIMESCALES)
    self.layer_sizes = [hidden_size] * hidden_layers + [2]

  # ------------------------------------------------------------------ theta

  def init(self, key):
    """theta = {momentum_decays [M], rms_decays [R], adafactor_decays [A] (offsets, 0),
    nn: {w{l}: [fan_in, fan_out] truncated normal, std 1/sqrt(fan_in); b{l}: zeros}}."""
    nn_params: Dict[str, jax.Array] = {}
    fan_in = self.num_inputs
    keys = jax.random.split(key, len(self.layer_sizes))
    for layer, (k, fan_out) in enumerate(zip(keys, self.layer_sizes)):
      # The truncated normal on [-2, 2] has std ~0.88; divide so the std is 1/sqrt(fan_in).
      w = jax.random.truncated_normal(k, -2.0, 2.0, (fan_in, fan_out), F32)
      w = w / (0.87962566 * np.sqrt(fan_in))
      b = jnp.zeros((fan_out,), F32)
      if self.make_separate_weights:
        for i in range(fan_in):
          for o in range(fan_out):
            nn_params[f"w{layer}_{i}_{o}"] = w[i, o]
        for o in range(fan_out):
          nn_params[f"b{layer}_{o}"] = b[o]
      else:
        nn_params[f"w{layer}"] = w
        nn_params[f"b{layer}"] = b
      fan_in = fan_out
    return {"momentum_decays": jnp.zeros((len(self.mom_decays),), F32),
            "rms_decays": jnp.zeros((len(self.rms_decays),), F32),
            "adafactor_decays": jnp.zeros((len(self.fac_decays),), F32),
            "nn": nn_params}

  def decays(self, theta):
    """The (momentum, rms, adafactor) decay vectors that ``theta`` encodes."""
    shift = lambda init, off: param_to_decay(decay_to_param(init) + off)
    return (shift(self.mom_decays, theta["momentum_decays"]),
            shift(self.rms_decays, theta["rms_decays"]),
            shift(self.fac_decays, theta["adafactor_decays"]))

  def _weight(self, nn_params, layer, i, o):
    if self.make_separate_weights:
      return nn_params[f"w{layer}_{i}_{o}"]
    return nn_params[f"w{layer}"][i, o]

  def _bias(self, nn_params, layer, o):
    if self.make_separate_weights:
      return nn_params[f"b{layer}_{o}"]
    return nn_params[f"b{layer}"][o]

  # ------------------------------------------------------------------ features and MLP

  def _features(self, p, g, m, v, y, v_row, v_col, v_full) -> List[jax.Array]:
    """Accumulator feature groups for one tensor, each ``[n, width]`` float32, in the
    order of the module docstring (n = number of entries, scalars count as 1)."""
    shape = jnp.shape(p)
    n = max(int(np.prod(shape)), 1)
    flat = lambda x: jnp.reshape(x, (n, -1))
    g32, p32 = jnp.asarray(g, F32), jnp.asarray(p, F32)
    rsqrt_v = jax.lax.rsqrt(v + 1e-6)
    groups = [flat(g32), flat(p32), flat(m), flat(v), flat(m * rsqrt_v), flat(rsqrt_v),
              flat(y)]
    dims = common.factored_dims(shape)
    if dims is None:
      r = c = v_full
      mom_scaled = m * (v_full + 1e-6) ** -0.5
    else:
      d_col, d_row = dims
      r = jnp.broadcast_to(jnp.expand_dims(v_row, d_row), shape + v_row.shape[-1:])
      c = jnp.broadcast_to(jnp.expand_dims(v_col, d_col), shape + v_col.shape[-1:])
      row_factor, col_factor = common.factored_scales(v_row, v_col, shape)
      mom_scaled = m * row_factor * col_factor
    groups += [flat(r), flat(c), flat(jax.lax.rsqrt(r + 1e-8)),
               flat(jax.lax.rsqrt(c + 1e-8)), flat(mom_scaled)]
    return groups

  def _mlp_concat(self, nn_params, feats, step_features):
    """Matmul path: ``[n, F]`` features -> ``(direction [n], magnitude [n])``."""
    # The step features are the same for every entry: their share of the first layer,
    # s @ W0[F:] + b0, is computed once instead of as an [n, 11] block of the product.
    n_feats = feats.shape[1]
    w0 = nn_params["w0"]
    x = (second_moment_normalizer(feats, [0]) @ w0[:n_feats]
         + (step_features @ w0[n_feats:] + nn_params["b0"]))
    if len(self.layer_sizes) > 1:
      x = jax.nn.relu(x)
    for layer in range(1, len(self.layer_sizes)):
      x = x @ nn_params[f"w{layer}"] + nn_params[f"b{layer}"]
      if layer != len(self.layer_sizes) - 1:
        x = jax.nn.relu(x)
    return x[:, 0], x[:, 1]

  def _mlp_scalar(self, nn_params, feats, step_features):
    """Scalar path: the same network as ``_mlp_concat`` with every multiply-add written
    out over ``[n]`` vectors (normalisation per column, as in the matmul path)."""
    columns = [second_moment_normalizer(feats[:, i], [0]) for i in range(feats.shape[1])]
    inputs = columns + [step_features[i] for i in range(step_features.shape[0])]
    for layer, fan_out in enumerate(self.layer_sizes):
      outs = []
      for o in range(fan_out):
        acc = self._bias(nn_params, layer, o)
        for i, x in enumerate(inputs):
          acc = acc + x * self._weight(nn_params, layer, i, o)
        outs.append(acc)
      if layer != len(self.layer_sizes) - 1:
        outs = [jax.nn.relu(x) for x in outs]
      inputs = outs
    n = feats.shape[0]
    return jnp.broadcast_to(inputs[0], (n,)), jnp.broadcast_to(inputs[1], (n,))

  # ------------------------------------------------------------------ inner optimizer

  def opt_fn(self, theta, is_training=False):
    del is_training
    lopt = self
    mom_decays, rms_decays, fac_decays = self.decays(theta)
    nn_params = theta["nn"]
    mlp = self._mlp_concat if self.concat_weights else self._mlp_scalar

    class _Opt(opt_base.Optimizer):
      name = "AdafacMLPLOpt"

      def init(self, params, model_state=None, num_steps=None, key=None):
        """Zero accumulators. ``num_steps`` (the inner run length) is required, as in
        the reference; it is stored in the state for features that may use it."""
        del key
        if num_steps is None:
          raise ValueError("AdafacMLPLOpt: the inner optimizer's init needs num_steps "
                           "(the length of the inner training run).")
        return AdafacMLPLOptState(
            params=params, state=model_state,
            momentum=common.momentum_init(params, len(lopt.mom_decays)),
            rms=common.rms_init(params, len(lopt.rms_decays)),
            factored=common.factored_init(params, len(lopt.fac_decays)),
            num_steps=jnp.asarray(num_steps, jnp.int32),
            iteration=jnp.asarray(0, jnp.int32))

      def update(self, opt_state, grad, loss=None, model_state=None, key=None, **kw):
        del loss, key, kw
        # As the reference: learned momentum decays are not clipped (rms/adafactor are).
        momentum = common.momentum_update(opt_state.momentum, grad, mom_decays,
                                          clip=False)
        rms = common.rms_update(opt_state.rms, grad, rms_decays)
        factored, y = common.factored_update(opt_state.factored, grad, fac_decays)
        step_features = tanh_embedding(opt_state.iteration)

        def update_tensor(p, g, m, v, yy, v_row, v_col, v_full):
          groups = lopt._features(p, g, m, v, yy, v_row, v_col, v_full)
          direction, magnitude = mlp(nn_params, jnp.concatenate(groups, axis=-1),
                                     step_features)
          step = direction * jnp.exp(magnitude * lopt.exp_mult) * lopt.step_mult
          new_p = jnp.asarray(p, F32) - step.reshape(jnp.shape(p))
          return new_p.astype(jnp.asarray(p).dtype)

        params = jax.tree.map(update_tensor, opt_state.params, grad, momentum.m, rms.v, y,
                              factored.v_row, factored.v_col, factored.v_full)
        state = opt_state.state if model_state is None else model_state
        return AdafacMLPLOptState(params=params, state=state, momentum=momentum, rms=rms,
                                  factored=factored, num_steps=opt_state.num_steps,
                                  iteration=opt_state.iteration + 1)

    return _Opt()
