"""Task augmentation by reparameterisation: the same function, parameters on another scale.

For a task with loss ``L(theta)`` and init ``theta_0``, and a positive scale ``s`` (a
scalar, one per parameter tensor, or one per entry), the reparameterised task is

  init' = theta_0 / s,        L'(phi) = L(s * phi).

It computes the same function (``L'(theta / s) = L(theta)``), but its gradient is
``grad L'(phi) = s * grad L(s * phi)`` and its parameters are ``1/s`` times the original
ones, so a plain gradient step behaves very differently on it. A learned optimizer
meta-trained over many ``s`` must be invariant to the parameter scale to do well: this is
the augmentation of Celo/Celo2 (``level="global"``, ``s`` log-uniform on ``[1e-3, 1e3]``).

``ReparamWeightsFamily(family, level, param_scale_range=(lo, hi))`` draws, per sampled
task, ``log s ~ U[log lo, log hi]``:

- ``"global"``: one scalar ``s`` for every parameter;
- ``"tensor"``: one scalar per parameter tensor (leaf of the params pytree);
- ``"parameter"``: one per entry (an array of each leaf's shape).

The scales are drawn from the task's own sampling key, which the truncated step derives
from the task's global index, so a task draws the same ``s`` whichever device holds it.
They travel in the task parameter (``ReparamTaskParam.scales``), a traced pytree that
stacks and vmaps like any other, never a Python constant.
"""

from __future__ import annotations

import copy
from typing import Any, Optional, Sequence

import flax
import jax
import jax.numpy as jnp

from spmd_lopt.tasks import base

LEVELS = ("global", "tensor", "parameter")


def _scale_tree(params, scales, op):
  """``op(p, s)`` leaf by leaf; ``scales`` is one scalar or a tree with the structure of
  ``params`` whose leaves (numbers or arrays) broadcast against the parameters."""
  if isinstance(scales, (int, float)) or (isinstance(scales, jax.Array)
                                          and scales.ndim == 0):
    return jax.tree.map(lambda p: op(p, jnp.asarray(scales, p.dtype)), params)
  return jax.tree.map(lambda p, s: op(p, jnp.asarray(s, p.dtype)), params, scales)


class ReparamWeights(base.Task):
  """``task`` reparameterised by ``param_scale`` (a scalar or a tree of the params'
  structure whose leaves broadcast against them): ``init = theta_0 / s``,
  ``loss(phi) = task.loss(s * phi)``."""

  def __init__(self, task: base.Task, param_scale: Any):
    self.task = task
    self.param_scale = param_scale
    self.name = f"ReparamWeights_{task.name or type(task).__name__}"

  @property
  def datasets(self):
    return self.task.datasets

  def init_with_state(self, key):
    params, state = self.task.init_with_state(key)
    return _scale_tree(params, self.param_scale, jnp.divide), state

  def init(self, key):
    return self.init_with_state(key)[0]

  def _unscale(self, params):
    return _scale_tree(params, self.param_scale, jnp.multiply)

  def loss(self, params, key, data):
    return self.task.loss(self._unscale(params), key, data)

  def loss_with_state(self, params, state, key, data):
    return self.task.loss_with_state(self._unscale(params), state, key, data)

  def loss_and_aux(self, params, key, data):
    return self.task.loss_and_aux(self._unscale(params), key, data)

  def loss_with_state_and_aux(self, params, state, key, data):
    return self.task.loss_with_state_and_aux(self._unscale(params), state, key, data)

  def sample_batch(self, key, split="train"):
    return self.task.sample_batch(key, split)

  def normalizer(self, loss):
    return self.task.normalizer(loss)


@flax.struct.dataclass
class ReparamTaskParam:
  """base: the wrapped family's task parameter. scales: f32[] (``"global"``), a tree of
  f32[] matching the params (``"tensor"``) or a tree of the params' shapes
  (``"parameter"``)."""
  base: Any
  scales: Any


class ReparamWeightsFamily(base.TaskFamily):
  """``family`` with every sampled task reparameterised by a fresh log-uniform scale.

  Args:
    family: any task family (its samples must have fixed shapes, as every family here).
    level: ``"global"``, ``"tensor"`` or ``"parameter"`` (see the module docstring).
    param_scale_range: ``(lo, hi)`` with ``0 < lo <= hi``; ``log s ~ U[log lo, log hi]``.
  """

  def __init__(self, family: base.TaskFamily, level: str = "global",
               param_scale_range: Sequence[float] = (1e-3, 1e3),
               name: Optional[str] = None):
    if level not in LEVELS:
      raise ValueError(f"ReparamWeightsFamily: level must be one of {LEVELS}, got "
                       f"{level!r}.")
    try:
      lo, hi = (float(v) for v in param_scale_range)
    except (TypeError, ValueError):
      raise ValueError("ReparamWeightsFamily: param_scale_range must be two numbers "
                       f"(lo, hi), got {param_scale_range!r}.") from None
    if not 0 < lo <= hi < float("inf"):
      raise ValueError("ReparamWeightsFamily: param_scale_range needs 0 < lo <= hi < inf, "
                       f"got {param_scale_range!r}.")
    self.task_family = family
    self.level = level
    self.param_scale_range = (lo, hi)
    base_name = getattr(family, "name", None) or type(family).__name__
    self.name = name or f"ReparamWeights{level}_{base_name}"
    # The params' tree (abstract, no compute): the per-tensor scales must match it.
    self._param_shapes = jax.eval_shape(
        lambda k: family.task_fn(family.sample(k)).init_with_state(k)[0],
        jax.random.key(0))

  @property
  def datasets(self):
    return self.task_family.datasets

  def with_datasets(self, datasets):
    """The same augmentation over ``family.with_datasets(datasets)``."""
    out = copy.copy(self)
    out.task_family = self.task_family.with_datasets(datasets)
    return out

  def _log_uniform(self, key, shape):
    lo, hi = self.param_scale_range
    u = jax.random.uniform(key, shape, jnp.float32, jnp.log(lo), jnp.log(hi))
    return jnp.exp(u)

  def sample(self, key):
    k_base, k_scale = jax.random.split(key)
    if self.level == "global":
      scales = self._log_uniform(k_scale, ())
    else:
      leaves, treedef = jax.tree.flatten(self._param_shapes)
      # leaf i draws from fold_in(key, i): stable however the leaves are laid out
      draws = [self._log_uniform(jax.random.fold_in(k_scale, i),
                                 () if self.level == "tensor" else leaf.shape)
               for i, leaf in enumerate(leaves)]
      scales = jax.tree.unflatten(treedef, draws)
    return ReparamTaskParam(base=self.task_family.sample(k_base), scales=scales)

  def task_fn(self, task_param: ReparamTaskParam):
    return ReparamWeights(self.task_family.task_fn(task_param.base), task_param.scales)

  def eval_task_fn(self, task_param: ReparamTaskParam):
    return ReparamWeights(self.task_family.eval_task_fn(task_param.base),
                          task_param.scales)
