"""Outer training: truncation schedules, the vectorized truncated step, gradient
estimators (one module each) and the learners that fuse them into one SPMD program."""
