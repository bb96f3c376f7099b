"""The packaged default config (``python -m spmd_lopt.launch`` with no ``--config``).

Trains: MLPLOpt with truncated PES (truncations of 20 steps, trajectories of log-uniform
length 100-300) on two task families at once, 8 tasks each: random 10-d quadratic bowls and
the 64-32-10 ReLU MLP on the embedded 8x8 handwritten digits (``ImageMLP_Digits8_Relu32``,
batch 128), 300 outer steps, outer Adam(1e-3).
Time on a 2-core CPU: about 20 s (compile about 9 s) on a quiet machine.
Expected (seed 0): quadratic meta-loss 19.0 -> 15.7, digits MLP 2.11 -> 0.98 (means of
the first and last 3 logs).
Command: ``python -m spmd_lopt.launch`` (same learner as ``--config
configs/pes_quadratic_digits.py``, which spells it in the full config form; add
``--print_config`` to see every key).
"""

from spmd_lopt import config


def get_config():
  return config.base_config()
