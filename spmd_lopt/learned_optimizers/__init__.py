"""Learned optimizers: ``LearnedOptimizer.opt_fn(theta)`` is an ``Optimizer``."""
