"""What a compiled meta step costs, from XLA's own analyses (no timing).

- FLOPs and bytes: ``compiled.cost_analysis()``, plus the FLOPs of spmd_lopt's FFI
  kernels counted from the HLO (XLA counts a custom call as none). XLA counts a ``while``
  body once, and the truncation is a ``lax.scan`` of ``trunc_length`` inner steps, so the
  step's figure is corrected by ``+ (trunc_length - 1) x`` the cost of one inner step,
  compiled separately from the truncated step's public ``unroll_step`` on the same
  per-device shapes.
- Device memory: ``compiled.memory_analysis()`` (arguments + outputs not aliased to inputs
  + temporaries).
- Collectives: all-reduce ops in the compiled HLO.
- Program size: the lowered StableHLO text and the bytes of its dense constants (what
  closing over a data set costs every program that touches it).
- The roofline's peak: the best time of an ``n x n`` f32 matmul.
"""

from __future__ import annotations

import math
import re
import time

import numpy as np


def xla_cost(compiled) -> dict[str, float]:
  """``{"flops", "bytes"}`` of one call as XLA counts them (loop bodies once), plus the
  FLOPs of spmd_lopt's own kernels, which XLA counts as zero (``spmd_lopt.kernels``;
  their bytes are not added)."""
  from spmd_lopt.kernels import celo2_matrix, mlp_lopt_step, newton_schulz, per_entry_mlp  # pylint: disable=import-outside-toplevel
  ca = compiled.cost_analysis()
  if isinstance(ca, (list, tuple)):
    ca = ca[0] if ca else {}
  ca = ca or {}
  text = compiled.as_text()
  kernel_flops = (per_entry_mlp.hlo_flops(text) + mlp_lopt_step.hlo_flops(text) +
                  celo2_matrix.hlo_flops(text) + newton_schulz.hlo_flops(text))
  return {"flops": float(ca.get("flops", 0.0)) + kernel_flops,
          "bytes": float(ca.get("bytes accessed", 0.0))}


def memory(compiled) -> dict[str, int]:
  """Device bytes of one call: argument, output, alias, temp, generated_code and total."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  (backends without the analysis)
    m = None
  if m is None:
    return {}
  out = {k: int(getattr(m, f"{k}_size_in_bytes", 0)) for k in
         ("argument", "output", "alias", "temp", "generated_code")}
  # Live device bytes of a call: inputs + outputs not aliased to inputs (donation) + temps.
  out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
  return out


def all_reduce_ops(compiled) -> int:
  """Number of all-reduce ops (sync or async start) in the compiled HLO."""
  hlo = compiled.as_text()
  return hlo.count(" all-reduce(") + hlo.count(" all-reduce-start(")


_ELEMENT_BYTES = {"i1": 1, "i8": 1, "ui8": 1, "i16": 2, "ui16": 2, "f16": 2, "bf16": 2,
                  "i32": 4, "ui32": 4, "f32": 4, "i64": 8, "ui64": 8, "f64": 8}
_CONSTANT_TYPE = re.compile(r"stablehlo\.constant.*:\s*tensor<([0-9x]*?)x?([a-z]+[0-9]+)>")


def program_size(lowered) -> dict[str, int]:
  """Size of a lowered program: ``text_bytes`` (its StableHLO text), ``constant_bytes``
  (sum over dense constants of ``prod(shape) x element size``) and the largest constant.

  A data set closed over by the program appears here as constants; passed as an argument
  it does not."""
  text = lowered.as_text()
  sizes = []
  for line in text.splitlines():
    m = _CONSTANT_TYPE.search(line)
    if m:
      dims = [int(d) for d in m.group(1).split("x") if d]
      sizes.append(math.prod(dims) * _ELEMENT_BYTES.get(m.group(2), 4))
  return {"text_bytes": len(text.encode()), "constant_bytes": int(sum(sizes)),
          "largest_constant_bytes": int(max(sizes, default=0))}


def corrected_cost(step_cost: float, inner_step_cost: float, trunc_length: int) -> float:
  """XLA's cost analysis counts a ``while`` body once; the step runs the inner step
  ``trunc_length`` times, so add ``trunc_length - 1`` more inner steps."""
  return float(step_cost) + (int(trunc_length) - 1) * float(inner_step_cost)


def inner_step_cost(learner, mesh_size: int) -> dict[str, float]:
  """FLOPs and bytes of ONE inner step of every estimator, per device (the body of the
  truncation scan, which XLA's cost analysis counts once)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from spmd_lopt.outer_trainers import estimator_base  # pylint: disable=import-outside-toplevel
  abstract = learner.abstract_state()
  theta = jax.eval_shape(learner.get_meta_params, abstract)
  total = {"flops": 0.0, "bytes": 0.0}
  for est, st in zip(learner.gradient_estimators, abstract.gradient_estimator_states):
    n = est.num_tasks // mesh_size
    stacked = getattr(est, "stack_antithetic_samples", True)
    batch, calls = (2 * n, 1) if stacked else (n, 2)
    per_task = lambda x, b=batch: jax.ShapeDtypeStruct((b,) + x.shape[1:], x.dtype)
    state = jax.tree.map(per_task, st.pos_state)
    th = jax.tree.map(lambda x, b=batch: jax.ShapeDtypeStruct((b,) + x.shape, x.dtype), theta)
    step = est.truncated_step

    def one(th, state, key, ids, it, step=step):
      return step.unroll_step(th, state, key, outer_state=estimator_base.OuterState(it),
                              theta_is_vector=True, task_ids=ids)

    compiled = jax.jit(one).lower(
        th, state, jax.ShapeDtypeStruct((), jax.random.key(0).dtype),
        jax.ShapeDtypeStruct((batch,), jnp.int32),
        jax.ShapeDtypeStruct((), jnp.int32)).compile()
    c = xla_cost(compiled)
    total["flops"] += calls * c["flops"]
    total["bytes"] += calls * c["bytes"]
  return total


def measure_peak_matmul(n: int = 1024, repeats: int = 5, device=None) -> dict[str, float]:
  """Best-of-``repeats`` FLOP/s of an ``n x n`` f32 matmul on one device."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  device = device or jax.local_devices()[0]
  a = jax.device_put(jax.random.normal(jax.random.key(0), (n, n), jnp.float32), device)
  b = jax.device_put(jax.random.normal(jax.random.key(1), (n, n), jnp.float32), device)
  f = jax.jit(lambda a, b: a @ b)
  f(a, b).block_until_ready()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(a, b).block_until_ready()
    times.append(time.perf_counter() - t0)
  best = min(times)
  return {"n": n, "flops_per_s": 2.0 * n ** 3 / best, "best_s": best,
          "median_s": float(np.median(times))}
