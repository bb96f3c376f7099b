"""Outer training: truncation schedules, the vectorized truncated step, gradient
estimators (one module each, on the shared ``estimator_base`` package) and the learners
that fuse them into one SPMD program."""
