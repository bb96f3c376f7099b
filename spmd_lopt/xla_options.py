"""XLA compiler options for the fused meta step, per platform.

On CPU the learned optimizers' per-parameter MLPs are chains of small batched products
(``[tasks, entries, 8..32] @ [tasks, 8..32, 32]``) with a bias and a ReLU between them. By
default XLA's CPU backend hands each product to its matmul library on its own and writes
every hidden activation to memory twice (product, then bias + ReLU); with
``xla_cpu_experimental_ynn_fusion_type = LIBRARY_FUSION_TYPE_DOT`` it hands the library the
whole product/elementwise chain as one fused graph, which keeps the activations in cache.
On the 8x8 image MLP workload (16 PES tasks, MLPLOpt) this cut the bytes XLA accounts per
inner step from 129 to 50 MB and the step's temporaries from 20.5 to 6.9 MB
(``docs/PERFORMANCE.md``). Results agree with the default compile to float32 rounding.

The option is experimental in XLA: ``step_options`` probes once per process that this
jaxlib knows it (a tiny compile) and returns ``{}`` otherwise, so an XLA that renamed it
compiles as before instead of failing. Other platforms get ``{}``.

The library graph only pays when the products have rows to fill it: a task whose largest
parameter tensor has ``n`` entries gives products ``[tasks, n, 8..32] @ [tasks, 8..32, 32]``.
Interleaved A/B of that 3-layer chain (plain / fused CPU time, loaded; ``docs/perf_round3/small_tasks.md``):
``n = 10`` 0.97x and 1.07x in two runs (inside the noise), ``n = 40`` 1.36x / 1.32x,
``n = 512`` 1.37x, ``n = 2048`` 1.69x / 1.81x; and the whole fused meta step on 10-d quadratics (64 PES tasks, MLPLOpt) ran as fast
or faster without the option (three A/Bs, CPU time 1.09x, 1.06x, 1.04x; wall 1.09x, 1.06x,
0.99x). So ``step_options`` takes the largest per-task tensor size
(``max_entries``) when the caller knows it and keeps the default compile below
``MIN_LIBRARY_ROWS`` entries.

Nor does it pay for every learned optimizer. Interleaved A/B of whole meta steps with and
without the options (``docs/PERFORMANCE.md``, "Round six"): MLPLOpt 1.2-1.56x faster with
them, LearnableSGD / LearnableAdam 1.09-1.12x (the tasks' own products); but Celo2 1.10-1.16x
slower on its recipe (its Newton-Schulz products, fused into one graph, take 1.8x their
separate time), Celo2-base 1.10x, AdafacMLPLOpt 1.25-1.67x and NNAdam 1.09-1.11x. A rule
states which it is (``LearnedOptimizer.cpu_library_graphs``) and the learner passes it as
``library_graphs``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}
# Below this many rows per product the fused library graph is no faster (see above); 32 is
# between the measured 10 (no gain) and 40 (1.36x).
MIN_LIBRARY_ROWS = 32


@functools.lru_cache(maxsize=None)
def _cpu_options_supported() -> bool:
  x = jnp.zeros((2, 2), jnp.float32)
  try:
    jax.jit(lambda a: jax.nn.relu(a @ a)).lower(x).compile(dict(CPU_OPTIONS))
  except Exception:  # pylint: disable=broad-except  (an XLA without the option)
    return False
  return True


def step_options(mesh: jax.sharding.Mesh | None = None,
                 max_entries: int | None = None, library_graphs: bool = True) -> dict:
  """Compiler options for a program running on ``mesh``'s devices (default devices when
  ``None``): ``CPU_OPTIONS`` on CPU when this XLA supports them, else ``{}``.

  max_entries: the size of the largest parameter tensor of one inner task (the rows of
  the per-parameter MLP's products), if known; below ``MIN_LIBRARY_ROWS`` the options are
  left out. ``None`` (unknown) keeps them.
  library_graphs: ``False`` leaves them out: the step's learned optimizer runs slower
  with them (``LearnedOptimizer.cpu_library_graphs``).
  """
  devices = mesh.devices.flat if mesh is not None else jax.devices()
  platform = next(iter(devices)).platform
  if not library_graphs:
    return {}
  if max_entries is not None and max_entries < MIN_LIBRARY_ROWS:
    return {}
  if platform == "cpu" and _cpu_options_supported():
    return dict(CPU_OPTIONS)
  return {}
