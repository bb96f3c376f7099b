"""The reference library's module name for the augmentation families.

``learned_optimization.tasks.task_augmentation`` scripts port by changing the import; the
implementation lives in ``spmd_lopt.tasks.augmentation``.
"""

from spmd_lopt.tasks.augmentation import (LEVELS, ReparamTaskParam, ReparamWeights,
                                          ReparamWeightsFamily)

__all__ = ["LEVELS", "ReparamTaskParam", "ReparamWeights", "ReparamWeightsFamily"]
