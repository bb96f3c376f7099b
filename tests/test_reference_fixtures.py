"""MLPLOpt and AdafacMLPLOpt against numbers the reference library produced.

``tests/fixtures/learned_optimization/`` (see its README) holds, per optimizer, a perturbed
theta in the reference's own checkpoint format, an inner parameter tree, ten gradients and
the parameters the reference produced after each update. Loading the theta through
``reference_thetas`` and replaying the call sequence must reproduce every entry to float32
rounding: steps are ~1e-4..1e-3 on params ~0.5 (spacing ~6e-8), so an absolute tolerance
of 2.5e-7 is a few ulps, far below any real difference in the update rule.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spmd_lopt.learned_optimizers import AdafacMLPLOpt, MLPLOpt
from spmd_lopt.learned_optimizers import reference_thetas

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "learned_optimization")
MODULES = ("mlp/~/linear_0", "mlp/~/linear_1")
ATOL = 2.5e-7


def _params(npz, prefix):
  return {m: {k: jnp.asarray(npz[f"{prefix}/{m}/{k}"]) for k in ("b", "w")} for m in MODULES}


def _replay(lopt, theta, npz, jit=False):
  opt = lopt.opt_fn(theta)
  update = jax.jit(opt.update) if jit else opt.update
  state = opt.init(_params(npz, "params_init"), num_steps=100)
  out = []
  for t in range(10):
    state = update(state, _params(npz, f"grads/{t}"), loss=jnp.float32(npz[f"loss/{t}"]))
    out.append(opt.get_params(state))
  return out


@pytest.mark.parametrize("name,cls", [("mlp_lopt", MLPLOpt), ("adafac_mlp_lopt", AdafacMLPLOpt)])
def test_matches_reference_params_after_every_update(name, cls):
  lopt = cls()
  theta = reference_thetas.load_reference_theta(
      os.path.join(FIXTURES, f"{name}_theta.state"), lopt)
  npz = np.load(os.path.join(FIXTURES, f"{name}.npz"))
  # The theta file and the npz copy of it agree leaf by leaf, in our layout.
  ref_layout = reference_thetas.reference_layout(lopt, theta)
  for path, leaf in reference_thetas._flat(ref_layout).items():  # pylint: disable=protected-access
    np.testing.assert_array_equal(np.asarray(leaf), npz[f"theta/{path}"])
  init = _params(npz, "params_init")
  for t, got in enumerate(_replay(lopt, theta, npz)):
    want = _params(npz, f"params_after/{t}")
    for m in MODULES:
      for k in ("b", "w"):
        g, w = np.asarray(got[m][k]), np.asarray(want[m][k])
        np.testing.assert_allclose(g, w, rtol=0, atol=ATOL, err_msg=f"{name} t={t} {m}/{k}")
        # The comparison is meaningful: every step moved entries by far more than ATOL.
        assert np.max(np.abs(w - np.asarray(init[m][k]))) > 100 * ATOL


def test_theta_perturbation_matters():
  """A different theta (our own init) gives params far outside the tolerance, so the test
  above would catch a wrong key mapping or a wrong update rule."""
  lopt = MLPLOpt()
  npz = np.load(os.path.join(FIXTURES, "mlp_lopt.npz"))
  got = _replay(lopt, lopt.init(jax.random.key(0)), npz)[-1]
  want = _params(npz, "params_after/9")
  diff = max(float(np.max(np.abs(np.asarray(got[m][k]) - want[m][k])))
             for m in MODULES for k in ("b", "w"))
  assert diff > 10 * ATOL


def test_reference_theta_round_trip(tmp_path):
  lopt = AdafacMLPLOpt()
  theta = lopt.init(jax.random.key(3))
  path = tmp_path / "theta.state"
  reference_thetas.save_reference_theta(path, lopt, theta)
  back = reference_thetas.load_reference_theta(path, lopt)
  jax.tree.map(np.testing.assert_array_equal, theta, back)


def test_wrong_reference_file_is_one_line_error(tmp_path):
  with pytest.raises(ValueError) as e:
    reference_thetas.load_reference_theta(
        os.path.join(FIXTURES, "adafac_mlp_lopt_theta.state"), MLPLOpt())
  msg = str(e.value)
  assert "\n" not in msg and "missing" in msg and "extra" in msg and "Dense_0" in msg
  with pytest.raises(ValueError, match="shapes.*w0"):
    reference_thetas.load_reference_theta(
        os.path.join(FIXTURES, "adafac_mlp_lopt_theta.state"), AdafacMLPLOpt(hidden_size=5))
  junk = tmp_path / "junk.state"
  junk.write_bytes(b"\xc1not msgpack")
  with pytest.raises(ValueError, match="cannot decode"):
    reference_thetas.load_reference_theta(junk, MLPLOpt())


def test_adafac_momentum_decays_are_not_clipped_like_the_reference():
  """The reference clips learned rms/adafactor decays to [0, 1] but not momentum decays;
  a theta trained there may push a momentum decay below 0 and must act the same here."""
  lopt = AdafacMLPLOpt()
  theta = lopt.init(jax.random.key(0))
  theta["momentum_decays"] = jnp.asarray([0.3, 0.0, 0.0], jnp.float32)
  theta["rms_decays"] = jnp.asarray([0.8], jnp.float32)
  mom, rms, _ = lopt.decays(theta)
  assert float(mom[0]) < -0.5 and float(rms[0]) < 0.0
  opt = lopt.opt_fn(theta)
  g = {"w": jnp.asarray([[1.0, -2.0], [0.5, 3.0]])}
  s = opt.update(opt.init({"w": jnp.zeros((2, 2))}, num_steps=10), g)
  np.testing.assert_allclose(s.momentum.m["w"][..., 0], (1 - float(mom[0])) * g["w"],
                             rtol=1e-6)
  np.testing.assert_allclose(s.rms.v["w"][..., 0], g["w"] ** 2, rtol=1e-6)  # clipped to 0
