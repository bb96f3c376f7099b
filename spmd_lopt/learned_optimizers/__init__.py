"""Learned optimizers: ``LearnedOptimizer.opt_fn(theta)`` is an ``Optimizer``.

The zoo: ``LearnableSGD``, ``LearnableAdam`` (``base``), ``MLPLOpt`` (``mlp_lopt``),
``AdafacMLPLOpt`` (``adafac_mlp_lopt``), ``NNAdam`` (``nn_adam``). Trained theta travels
as a ``ParameterCheckpoint`` (``checkpoint``) and runs in any optax loop via ``as_optax``.
"""

from spmd_lopt.learned_optimizers.adafac_mlp_lopt import AdafacMLPLOpt
from spmd_lopt.learned_optimizers.base import LearnableAdam, LearnableSGD, LearnedOptimizer
from spmd_lopt.learned_optimizers.checkpoint import (ParameterCheckpoint,
                                                     load_parameter_checkpoint,
                                                     save_parameter_checkpoint)
from spmd_lopt.learned_optimizers.mlp_lopt import MLPLOpt
from spmd_lopt.learned_optimizers.nn_adam import NNAdam
from spmd_lopt.learned_optimizers.optax_adapter import as_optax
from spmd_lopt.learned_optimizers import registry

registry.register("mlp_lopt", MLPLOpt)
registry.register("adafac_mlp_lopt", AdafacMLPLOpt)
registry.register("nn_adam", NNAdam)
registry.register("learnable_adam", LearnableAdam)
registry.register("learnable_sgd", LearnableSGD)

__all__ = ["AdafacMLPLOpt", "LearnableAdam", "LearnableSGD", "LearnedOptimizer", "MLPLOpt",
           "NNAdam", "ParameterCheckpoint", "as_optax", "load_parameter_checkpoint",
           "registry", "save_parameter_checkpoint"]
