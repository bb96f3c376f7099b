"""Parametric task families whose samples are fixed-shape pytrees of arrays.

``image_mlp.ParametricImageMLP``: MLPs of random architecture (one of a few static shape
buckets, no padding or masking) and activation. ``sample_fixed.SampleFixedTasksFamily``:
a random choice among fixed tasks.
Both can be stacked and vmapped over tasks (``tasks.base.check_task_family`` passes).
"""

from spmd_lopt.tasks.parametric.image_mlp import ImageMLPConfig, ParametricImageMLP
from spmd_lopt.tasks.parametric.sample_fixed import SampleFixedTasksFamily

__all__ = ["ImageMLPConfig", "ParametricImageMLP", "SampleFixedTasksFamily"]
