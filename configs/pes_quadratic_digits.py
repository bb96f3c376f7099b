"""The default job, written in the full config form: PES on quadratics plus the embedded
8x8-digits image MLP.

Trains: ``MLPLOpt`` with antithetic truncated PES (std 0.01, truncations of 20 inner steps,
trajectories of log-uniform length 100-300, staggered) on two estimators in one fused step:
8 tasks of ``FixedDimQuadraticFamily(10)`` and 8 of ``ImageMLP_Digits8_Relu32`` (64-32-10
ReLU MLP, batch 128, on the 1,797 8x8 digits shipped in the package), outer Adam(1e-3),
300 outer steps. It builds the same learner as the short-form default config
(``spmd_lopt/default_config.py``); ``--print_config`` shows every key of both.

Time on this 2-core CPU: about 20 s (about 9 s of it compiling; 33 outer steps/s with
MLPLOpt's fused CPU kernel, 2026-12-07).
Expected result (seed 0): quadratic meta-loss 19.0 -> 15.7, digits MLP 2.11 -> 0.98
(means of the first and last 3 of 30 logs); see README "Results".

Command:
  python -m spmd_lopt.launch --config configs/pes_quadratic_digits.py \
      --workdir runs/pes_quadratic_digits
"""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.name = "pes_quadratic_digits"
  c.seed = 0
  c.outer_steps = 300
  c.log_every = 10
  c.lopt = dict(name="mlp_lopt", hidden_size=32, hidden_layers=2, step_mult=1e-3,
                exp_mult=1e-3)
  c.outer_opt = dict(name="adam", learning_rate=1e-3)
  truncation = dict(name="log_uniform", min_length=100, max_length=300)
  common = dict(name="pes", num_tasks=8, trunc_length=20, std=0.01,
                random_initial_iteration_offset=300, truncation=truncation)
  c.estimators = [
      dict(common, task="quadratic", task_kwargs=dict(dim=10)),
      dict(common, task="ImageMLP_Digits8_Relu32"),
  ]
  return c
