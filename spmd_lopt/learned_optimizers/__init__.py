"""Learned optimizers: ``LearnedOptimizer.opt_fn(theta)`` is an ``Optimizer``.

The zoo: ``LearnableSGD``, ``LearnableSGDM``, ``LearnableAdam`` (``base``), ``MLPLOpt``
(``mlp_lopt``), ``AdafacMLPLOpt`` (``adafac_mlp_lopt``), ``NNAdam`` (``nn_adam``), ``Celo2``
and ``Celo2Base`` (``celo2``). Trained theta travels as a ``ParameterCheckpoint``
(``checkpoint``), runs in any optax loop via ``as_optax``, and ``resolve(spec)`` turns a
command-line spec (a file, a released or reference theta, a fresh init) into
``(lopt, theta)`` (``specs``). Thetas trained with learned_optimization load through
``reference_thetas``.
"""

from spmd_lopt.learned_optimizers.adafac_mlp_lopt import AdafacMLPLOpt
from spmd_lopt.learned_optimizers.base import (LearnableAdam, LearnableSGD, LearnableSGDM,
                                               LearnedOptimizer)
from spmd_lopt.learned_optimizers.celo2 import Celo2, Celo2Base, scale_by_celo2
from spmd_lopt.learned_optimizers.checkpoint import (ParameterCheckpoint,
                                                     load_parameter_checkpoint,
                                                     save_parameter_checkpoint)
from spmd_lopt.learned_optimizers.mlp_lopt import MLPLOpt
from spmd_lopt.learned_optimizers.nn_adam import NNAdam
from spmd_lopt.learned_optimizers.optax_adapter import as_optax
from spmd_lopt.learned_optimizers import registry
from spmd_lopt.learned_optimizers.specs import resolve

registry.register("mlp_lopt", MLPLOpt)
registry.register("adafac_mlp_lopt", AdafacMLPLOpt)
registry.register("nn_adam", NNAdam)
registry.register("learnable_adam", LearnableAdam)
registry.register("learnable_sgd", LearnableSGD)
registry.register("learnable_sgdm", LearnableSGDM)
registry.register("celo2", Celo2)
registry.register("celo2_base", Celo2Base)

__all__ = ["AdafacMLPLOpt", "Celo2", "Celo2Base", "LearnableAdam", "LearnableSGD",
           "LearnableSGDM", "LearnedOptimizer", "MLPLOpt", "NNAdam", "ParameterCheckpoint",
           "as_optax", "load_parameter_checkpoint", "registry", "resolve",
           "save_parameter_checkpoint", "scale_by_celo2"]
