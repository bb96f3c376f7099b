"""``python -m spmd_lopt.evaluate``: the evaluation CLI (see ``spmd_lopt.evaluation.cli``).

This module keeps the old import path: the sweep library, ``evaluate_theta`` and the
launcher's ``PeriodicEvaluator`` live in ``spmd_lopt.evaluation`` and are re-exported here.
"""

from spmd_lopt.evaluation.cli import evaluate_main, plot, run, suite_main  # noqa: F401
from spmd_lopt.evaluation.periodic import PeriodicEvaluator  # noqa: F401
from spmd_lopt.evaluation.sweep import (  # noqa: F401
    TaskLike, _theta_eval_fn, as_family, compare, evaluate_theta,
    lopt_classes, make_lopt, sweep_fn)

if __name__ == "__main__":
  run()
