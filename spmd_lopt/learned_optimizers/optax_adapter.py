"""``as_optax``: run a trained learned optimizer inside any optax training loop.

A learned optimizer's inner ``Optimizer`` owns the parameters (``update`` returns new
params inside its state), while optax returns additive updates and leaves the params to
the caller. The adapter bridges the two:

- state: the inner optimizer state with ``params`` set to None (the loop already holds
  the params; keeping a second copy would double parameter memory);
- ``update(grads, state, params, loss=..., key=...)``: put ``params`` back into the
  inner state, run the inner ``update`` (with the loss and key when given), and return
  ``updates = new_params - params`` with the params dropped from the new state again.

Taking params from the caller each step (rather than trusting a stored copy) means the
learned optimizer sees the loop's real params even if the loop edits them between steps.
Updates are computed in at least float32 and ``optax.apply_updates`` casts the sum back
to the parameter dtype, so low-precision params follow the learned optimizer's own
trajectory up to the final rounding.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import optax

from spmd_lopt.learned_optimizers import base as lopt_base
from spmd_lopt.learned_optimizers import checkpoint as ckpt_lib
from spmd_lopt.learned_optimizers import specs


def _difference(new, old):
  dtype = jnp.promote_types(jnp.asarray(old).dtype, jnp.float32)
  return jnp.asarray(new, dtype) - jnp.asarray(old, dtype)


def as_optax(path_or_theta: Union[str, os.PathLike, Any],
             lopt: Optional[lopt_base.LearnedOptimizer] = None,
             num_steps: Optional[int] = None) -> optax.GradientTransformationExtraArgs:
  """An optax transformation applying a learned optimizer with fixed ``theta``.

  Args:
    path_or_theta: a parameter checkpoint path (the optimizer is rebuilt from the file;
      if ``lopt`` is also given the file must match it), a foreign theta file together
      with ``lopt`` (e.g. Celo2's released ``theta.state`` with ``lopt=Celo2()``), a spec
      of ``specs.resolve`` (``celo2=PATH``, ``pretrained:NAME``, ``init:NAME``), or theta
      itself (then ``lopt`` is required).
    lopt: the learned optimizer theta belongs to.
    num_steps: the inner run length given to the inner ``init`` (``AdafacMLPLOpt``
      requires it).

  Returns:
    ``optax.GradientTransformationExtraArgs``; ``update(grads, state, params, loss=None,
    key=None)`` needs ``params`` (the learned optimizer reads them) and forwards ``loss``
    and ``key`` to the learned optimizer.
  """
  if isinstance(path_or_theta, (str, os.PathLike)):
    spec = os.fspath(path_or_theta)
    if os.path.isfile(spec) and specs.is_parameter_checkpoint(spec):
      loaded = ckpt_lib.load_parameter_checkpoint(spec, expect=lopt)
      theta, lopt = loaded.theta, loaded.lopt
    elif os.path.isfile(spec) and lopt is not None:
      theta = specs.load_theta_file(spec, lopt)  # e.g. Celo2's released theta.state
    else:
      resolved, theta = specs.resolve(spec)
      if lopt is not None and type(resolved) is not type(lopt):
        raise ValueError(f"as_optax: {spec!r} gives a {type(resolved).__name__}, but "
                         f"lopt is a {type(lopt).__name__}.")
      lopt = resolved
  else:
    if lopt is None:
      raise ValueError("as_optax: pass the LearnedOptimizer (lopt=...) along with theta, "
                       "or a checkpoint path instead of theta.")
    theta = path_or_theta
  opt = lopt.opt_fn(theta, is_training=False)

  def init_fn(params):
    return opt.set_params(opt.init(params, num_steps=num_steps), None)

  def update_fn(updates, state, params=None, *, loss=None, key=None, **extra_args):
    del extra_args  # other transformations' extra args (optax passes them to everyone)
    if params is None:
      raise ValueError("as_optax: the learned optimizer reads the parameters; call "
                       "tx.update(grads, state, params).")
    inner = opt.update(opt.set_params(state, params), updates, loss=loss, key=key)
    new_params = opt.get_params(inner)
    return jax.tree.map(_difference, new_params, params), opt.set_params(inner, None)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
