"""The default job: PES on quadratics plus the embedded 8x8-digits image MLP.

Trains: ``MLPLOpt`` with antithetic truncated PES (std 0.01, truncations of 20 inner steps,
trajectories of log-uniform length 100-300, staggered) on two estimators in one fused step:
8 tasks of ``FixedDimQuadraticFamily(10)`` and 8 of ``ImageMLP_Digits8_Relu32`` (64-32-10
ReLU MLP, batch 128, on the 1,797 8x8 digits shipped in the package), outer Adam(1e-3),
300 outer steps.

Time on this 2-core CPU: about 20 s on a quiet machine (about 9 s of it compiling).
Expected result (seed 0): quadratic meta-loss 19.0 -> 15.7, digits MLP 2.11 -> 0.98
(means of the first and last 3 of 30 logs); see README "Results".

Command:
  python -m spmd_lopt.launch --config configs/pes_quadratic_digits.py \
      --workdir runs/pes_quadratic_digits
"""

from spmd_lopt import config


def get_config():
  c = config.base_config()
  c.name = "pes_quadratic_digits"
  return c
