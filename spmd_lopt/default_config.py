"""The packaged default config (``python -m spmd_lopt.launch`` with no ``--config``).

Trains: MLPLOpt with truncated PES on 16 random 10-d quadratic bowls, 300 outer steps.
Takes about 15 s on one 2-core CPU (compile about 4 s). Expect the meta-loss (mean inner
training loss over a truncation) to fall from about 20 to about 15-16.
Command: ``python -m spmd_lopt.launch``.
"""

from spmd_lopt import config


def get_config():
  return config.base_config()
