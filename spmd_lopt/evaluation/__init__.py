"""Evaluating optimizers: training curves, sweeps, the held-out suite and its metrics.

Modules: ``training`` (one task's curves in one jit), ``sweep`` (hyper-parameter x seed
programs, ``evaluate_theta``), ``periodic`` (``PeriodicEvaluator`` for meta-training),
``suite`` (the suites' tasks and baselines), ``runner`` (running a suite with a resumable
cache), ``metrics`` (loss ratio, speedup, IQM, bootstrap intervals), ``report`` (table and
plots) and ``cli`` (``python -m spmd_lopt.evaluate``).
"""
