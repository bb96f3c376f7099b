"""The reference's host API in spmd_lopt.compat: checkpoints as the reference writes them,
the learner's init-from-path options, and estimators written to the reference's interface
only."""

import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spmd_lopt import checkpoints, compat
from spmd_lopt.compat import host_api
from spmd_lopt.learned_optimizers import base as lopt_base
from spmd_lopt.learned_optimizers import checkpoint as lopt_checkpoint
from spmd_lopt.optimizers import optax_opts
from spmd_lopt.outer_trainers import gradient_learner

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "learned_optimization")


# --- save_state / load_state ------------------------------------------------------------

@pytest.mark.parametrize("name", ["mlp_lopt", "adafac_mlp_lopt"])
def test_save_state_writes_the_reference_bytes(tmp_path, name):
  """The fixture files were written by the reference's save_state; a theta tree rebuilt by
  jax (as any meta-training update leaves it) is saved to identical bytes."""
  path = os.path.join(FIXTURES, f"{name}_theta.state")
  with open(path, "rb") as f:
    reference_bytes = f.read()
  raw = compat.load_state_dict(path)
  theta = jax.tree.map(jnp.asarray, raw)  # dict keys come back sorted, as jax orders them
  out = tmp_path / "theta.state"
  checkpoints.save_state(out, theta)
  assert out.read_bytes() == reference_bytes
  # ... and load_state reads it back into a template of the same structure.
  template = jax.tree.map(jnp.zeros_like, theta)
  back = checkpoints.load_state(path, template)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(theta)):
    np.testing.assert_array_equal(a, b)


def test_load_state_errors_name_the_file(tmp_path):
  path = tmp_path / "x.state"
  checkpoints.save_state(path, {"a": jnp.ones(3)})
  with pytest.raises(ValueError, match="x.state"):
    checkpoints.load_state(path, {"b": jnp.ones(3)})
  with pytest.raises(FileNotFoundError, match="missing.state"):
    checkpoints.load_state(tmp_path / "missing.state", {"a": jnp.ones(3)})
  (tmp_path / "junk.state").write_bytes(b"\xc1not msgpack")
  with pytest.raises(ValueError, match="junk.state"):
    checkpoints.load_state(tmp_path / "junk.state", {"a": jnp.ones(3)})


# --- GradientLearner init from files ----------------------------------------------------

def _learner(**kw):
  return gradient_learner.GradientLearner(lopt_base.LearnableSGD(0.1), optax_opts.SGD(1.0),
                                          **kw)


def test_gradient_learner_takes_the_reference_arguments_in_order():
  # The reference's positional order: meta_init, theta_opt, init_theta_from_path,
  # init_outer_state_from_path, reset_outer_iteration, num_steps, init_seed.
  lopt, opt = lopt_base.LearnableSGD(0.1), optax_opts.SGD(1.0)
  learner = host_api.GradientLearner(lopt, opt, None, None, True, 12, 3)
  assert learner.learned_optimizer is lopt and learner.theta_opt is opt
  assert (learner.reset_outer_iteration, learner.num_steps, learner.init_seed) == (True, 12, 3)
  with pytest.raises(TypeError):
    host_api.GradientLearner(lopt)


def test_init_theta_from_every_theta_file_format(tmp_path):
  lopt = lopt_base.LearnableSGD(0.1)
  theta = {"log_lr": jnp.asarray(-4.25, jnp.float32)}
  paths = {"parameter_checkpoint": tmp_path / "p.param", "bare": tmp_path / "t.state",
           "package": tmp_path / "pkg.ckpt"}
  checkpoints.save_state(paths["parameter_checkpoint"],
                         gradient_learner.ParameterCheckpoint(theta, gen_id="g", step=7))
  checkpoints.save_state(paths["bare"], theta)
  lopt_checkpoint.save_parameter_checkpoint(paths["package"], lopt, theta)
  for kind, path in paths.items():
    state = _learner(init_theta_from_path=str(path)).init(jax.random.key(0))
    assert float(state.theta_opt_state.params["log_lr"]) == -4.25, kind


def test_init_outer_state_from_path_and_reset_outer_iteration(tmp_path):
  learner = _learner()
  state = learner.init(jax.random.key(0))
  for _ in range(3):
    grads = gradient_learner.AggregatedGradient({"log_lr": np.float32(1.0)}, None, 0.5)
    state, _ = learner.update(state, [grads])
  path = tmp_path / "outer.state"
  checkpoints.save_state(path, gradient_learner.OptCheckpoint(state, elapsed_time=1.5,
                                                              total_inner_steps=99))
  restored = _learner(init_outer_state_from_path=str(path)).init(jax.random.key(1))
  assert int(restored.theta_opt_state.iteration) == 3
  np.testing.assert_allclose(restored.theta_opt_state.params["log_lr"],
                             state.theta_opt_state.params["log_lr"])
  reset = _learner(init_outer_state_from_path=str(path),
                   reset_outer_iteration=True).init(jax.random.key(1))
  assert int(reset.theta_opt_state.iteration) == 0
  np.testing.assert_allclose(reset.theta_opt_state.params["log_lr"],
                             state.theta_opt_state.params["log_lr"])


# --- estimators written to the reference's interface only -------------------------------

class _ReferenceOnlyEstimator(gradient_learner.GradientEstimator):
  """Implements only init_worker_state / compute_gradient_estimate, as a user of the
  reference would: a constant gradient, the call count as state, a loss of 2."""

  def __init__(self, grad_val, loss=2.0):
    self.grad_val = grad_val
    self.loss = loss

  def init_worker_state(self, worker_weights, key):
    return 0

  def compute_gradient_estimate(self, worker_weights, key, state, with_summary=False):
    grad = jax.tree.map(lambda x: jnp.full_like(x, self.grad_val), worker_weights.theta)
    out = gradient_learner.GradientEstimatorOut(mean_loss=self.loss, grad=grad,
                                                unroll_state=state + 1, unroll_info=None)
    return out, {"mean||calls": state + 1}


def test_reference_only_estimators_in_gradient_worker_compute():
  ests = [_ReferenceOnlyEstimator(1.0), _ReferenceOnlyEstimator(3.0, loss=np.nan)]
  ww = gradient_learner.WorkerWeights({"log_lr": jnp.asarray(0.0)}, None,
                                      gradient_learner.OuterState(jnp.asarray(0)))
  states = [e.init_worker_state(ww, jax.random.key(0)) for e in ests]
  out = gradient_learner.gradient_worker_compute(ww, ests, states, jax.random.key(0),
                                                 with_metrics=True)
  assert float(out.to_put.theta_grads["log_lr"]) == 2.0
  assert out.to_put.mean_loss == (2.0 + 20.0) / 2  # a NaN loss counts as 20
  assert out.unroll_states == [1, 1]
  name = ests[0].task_name()  # the reference default, "unnamed_task"
  assert out.metrics[f"mean||{name}/nonfinite"] == 0.5  # one of the two was non-finite
  assert out.metrics["mean||calls"] == 1.0


def test_single_machine_learner_falls_back_to_the_host_path_with_one_warning():
  lopt = lopt_base.LearnableSGD(1.0)
  ests = [_ReferenceOnlyEstimator(0.0), _ReferenceOnlyEstimator(1.0)]
  host_api._WARNED.discard(_ReferenceOnlyEstimator)
  with pytest.warns(RuntimeWarning, match="outside the fused step"):
    learner = gradient_learner.SingleMachineGradientLearner(lopt, ests, optax_opts.SGD(3.0))
  assert isinstance(learner, compat.HostSingleMachineGradientLearner)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # the second construction stays quiet
    gradient_learner.SingleMachineGradientLearner(lopt, ests, optax_opts.SGD(3.0))
  state = learner.init(jax.random.key(0))
  state2, loss, metrics = learner.update(state, jax.random.key(1), with_metrics=True)
  # mean gradient 0.5, SGD(3): log_lr 0 -> -1.5
  assert float(learner.get_lopt_params(state)["log_lr"]) == 0.0
  assert float(learner.get_lopt_params(state2)["log_lr"]) == -1.5
  assert float(loss) == 2.0 and metrics["none||mean_loss"] == 2.0
  assert state2.gradient_estimator_states == (1, 1)


def test_fused_estimators_keep_the_fused_learner():
  from helpers import pes_estimator  # pylint: disable=import-outside-toplevel
  lopt = lopt_base.LearnableSGD(0.1)
  learner = gradient_learner.SingleMachineGradientLearner(lopt, [pes_estimator(lopt)],
                                                          optax_opts.Adam(1e-3))
  assert isinstance(learner, gradient_learner.SingleMachineGradientLearner)
  assert isinstance(learner, gradient_learner.SpmdGradientLearner)


def test_reference_import_path_reexports_the_compat_room():
  for name in ("GradientLearner", "gradient_worker_compute", "AggregatedGradient",
               "WorkerComputeOut", "GradientLearnerState", "ParameterCheckpoint",
               "OptCheckpoint"):
    assert getattr(gradient_learner, name) is getattr(compat, name)
  assert checkpoints.save_state is compat.save_state
  assert checkpoints.load_state is compat.load_state
