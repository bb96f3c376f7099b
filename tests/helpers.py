"""Small builders shared by the tests."""

import json
import os
import subprocess
import sys

import jax
import numpy as np

from spmd_lopt import sharding
from spmd_lopt.learned_optimizers import mlp_lopt
from spmd_lopt.optimizers import base as opt_base
from spmd_lopt.outer_trainers import gradient_learner
from spmd_lopt.outer_trainers import lopt_truncated_step
from spmd_lopt.outer_trainers import truncated_pes
from spmd_lopt.outer_trainers import truncation_schedule
from spmd_lopt.tasks import quadratics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_module(module, args, num_devices=None, timeout=300):
  """``python -m module *args`` from the repository root, importing this checkout, as a
  user runs it, with ``num_devices`` virtual CPU devices (None: a script's default, one).
  Returns the ``CompletedProcess`` (text stdout and stderr)."""
  env = dict(os.environ)
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  env["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={num_devices}"
                      if num_devices else "")
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


def pes_estimator(lopt, num_tasks=16, dim=10, trunc_length=10, min_length=20,
                  max_length=60, offset=60, std=0.01, family=None):
  sched = truncation_schedule.LogUniformLengthSchedule(min_length, max_length)
  step = lopt_truncated_step.VectorizedLOptTruncatedStep(
      family or quadratics.FixedDimQuadraticFamily(dim), lopt, sched, num_tasks=num_tasks,
      random_initial_iteration_offset=offset)
  return truncated_pes.TruncatedPES(truncated_step=step, trunc_length=trunc_length, std=std)


def learner(num_devices, estimators_fn, lr=1e-3, lopt=None):
  lopt = lopt or mlp_lopt.MLPLOpt()
  mesh = sharding.make_mesh(num_devices=num_devices)
  return gradient_learner.SpmdGradientLearner(lopt, estimators_fn(lopt), opt_base.Adam(lr),
                                              mesh=mesh)


def max_rel_err(a, b):
  """max over leaves of ``|a - b| / (|b| + tiny)`` measured as a whole-leaf norm ratio."""
  errs = jax.tree.leaves(jax.tree.map(
      lambda x, y: float(np.linalg.norm(np.asarray(x) - np.asarray(y)) /
                         (np.linalg.norm(np.asarray(y)) + 1e-30)), a, b))
  return max(errs)


def cosine(a, b):
  va = np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(a)])
  vb = np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(b)])
  return float(va @ vb / (np.linalg.norm(va) * np.linalg.norm(vb)))


def global_rel_err(a, b):
  """``||a - b|| / ||b||`` over all leaves flattened together."""
  va = np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(a)])
  vb = np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(b)])
  return float(np.linalg.norm(va - vb) / np.linalg.norm(vb))


def run_theta(workdir):
  """The meta-parameters a launcher run wrote (``<workdir>/theta.lopt``)."""
  from spmd_lopt.learned_optimizers import checkpoint as lopt_checkpoint
  return lopt_checkpoint.load_parameter_checkpoint(os.path.join(workdir, "theta.lopt")).theta


def run_records(workdir):
  """The records of ``<workdir>/metrics.jsonl``."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


# Prepended to a launcher subprocess: slows each meta step down (0.3 s) so a signal sent
# by a test lands well before the run ends.
SLOW_STEPS = """
import time
from spmd_lopt.outer_trainers import gradient_learner as _gl
_orig_update = _gl.SpmdGradientLearner.update
def _slow_update(self, *a, **k):
  time.sleep(0.3)
  return _orig_update(self, *a, **k)
_gl.SpmdGradientLearner.update = _slow_update
"""
