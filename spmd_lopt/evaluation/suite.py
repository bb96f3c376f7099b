"""The held-out evaluation suites: which tasks, at which horizons, against which baselines.

Every task is defined in the package and needs no files (the 8x8 digits are embedded;
the other data are generated on device). Each ``SuiteTask`` is a task family (a fixed task
is the family whose every sample is that task) trained for ``steps`` inner steps; its
curves record the ``"inner_valid"`` split (the validation split that picks each
baseline's learning rate) and the ``"test"`` split (the reported numbers).

``full`` (``MT_HORIZON = 300`` is the default meta-training job's longest trajectory;
every task appears at ``300`` and ``5 x 300 = 1500`` steps, 5 seeds):
  * in distribution: ``ImageMLP_Digits8_Relu32`` (the default job's image task);
  * larger and deeper: ``ImageMLP_Digits8_Relu128x128``, ``ImageMLP_Digits8_Relu64x64x64``
    (3 hidden layers), ``Conv_Digits8_16x32``, ``Autoencoder_Digits8_32x16x32``;
  * other kinds: ``TransformerLM_Copy8x8`` (2-layer causal transformer, copying task made
    on device), ``NoisyQuadratic_10_cond1000`` (random rotated quadratics, condition number
    up to 1000, gradient noise; evaluated noise-free) and ``LayerNormMLP_Digits8_64x64``.

``quick`` (what the tests run): ``ImageMLP_Digits8_Relu32``
and ``NoisyQuadratic_10_cond1000`` at 60 steps, 2 seeds, the same grids for Adam and SGD
with momentum and AdamW at one weight decay (0.01).

Baselines (tuned per task on the validation split's final loss, mean over seeds; a
diverged run counts as ``+inf``): ``Adam`` over ``ADAM_LRS`` (9 points, 1e-4 .. 1,
half-decade steps), ``AdamW`` over ``ADAM_LRS`` x ``WEIGHT_DECAYS``, ``SGDM`` (momentum
0.9) over ``SGDM_LRS`` (the same 9 points). Every learned optimizer runs as shipped (x1)
and with its step scaled by each of ``LOPT_LR_MULTS`` (``lr_scaled``), the multiplier
chosen the same way (its ``+lr`` row); in ``full`` also at ``LOPT_WD_MULTS`` x
``LOPT_WEIGHT_DECAYS`` with decoupled weight decay, tuned together with the decay-free
points (its ``+lr+wd`` row: 23 points, against AdamW's 27).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from spmd_lopt.optimizers import base as opt_base
from spmd_lopt.tasks import base as tasks_base
from spmd_lopt.tasks import quadratics
from spmd_lopt.tasks.fixed import autoencoder, conv, image_mlp, norm_mlp, transformer_lm
from spmd_lopt.tasks.fixed.classification import ImageClassificationTask

MT_HORIZON = 300
VALID_SPLIT, TEST_SPLIT = "inner_valid", "test"
# half-decade grids, 9 points each; runs are cheap next to the compile of each optimizer's
# program, so wide grids keep the tuned optimum off the grid's edges for little time
ADAM_LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
SGDM_LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
WEIGHT_DECAYS = (1e-2, 1e-1, 1.0)
# the learned optimizers' weight decays (decoupled, per step ``m * wd * step_mult``, so a
# rule's x10 with wd 0.1 decays like AdamW at lr 1e-2 with wd 0.1) and the multipliers they
# run at: the middle of the multiplier grid, where every tuned multiplier so far fell
LOPT_WEIGHT_DECAYS = (1e-1, 1.0)
LOPT_WD_MULTS = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0)
# learned optimizers' step multipliers (Celo2's deployment: a learning rate tuned on top of
# the rule), half decades around the shipped x1; up to 1e3 because a rule meta-trained
# with step_mult 1e-3 takes steps ~1e-3, and tuned Adam wants up to 0.1-1 on some tasks
LOPT_LR_MULTS = (1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0)


@dataclasses.dataclass(frozen=True)
class Baseline:
  """A hand-designed optimizer and its tuning grid: ``make(*grid[i])`` is grid point i."""
  name: str
  make: Callable[..., opt_base.Optimizer]
  grid: tuple[tuple[float, ...], ...]
  hparam_names: tuple[str, ...]

  def label(self, point: Sequence[float]) -> str:
    return ",".join(f"{n}={v:g}" for n, v in zip(self.hparam_names, point))


def _adamw(lr, wd):
  return opt_base.AdamW(lr, weight_decay=wd)


def _sgdm(lr):
  return opt_base.SGDM(lr, momentum=0.9)


def baselines(weight_decays: Sequence[float] = WEIGHT_DECAYS) -> tuple[Baseline, ...]:
  """Adam (the reference every metric is relative to: it comes first), AdamW, SGDM."""
  return (Baseline("Adam", opt_base.Adam, tuple((lr,) for lr in ADAM_LRS), ("lr",)),
          Baseline("AdamW", _adamw, tuple((lr, wd) for wd in weight_decays
                                          for lr in ADAM_LRS), ("lr", "wd")),
          Baseline("SGDM", _sgdm, tuple((lr,) for lr in SGDM_LRS), ("lr",)))


@dataclasses.dataclass(frozen=True)
class SuiteTask:
  """``build()`` -> a ``TaskFamily``; trained ``steps`` steps; ``label`` = name@steps."""
  name: str
  build: Callable[[], tasks_base.TaskFamily]
  steps: int
  kind: str  # "in-distribution" | "larger" | "other"

  @property
  def label(self) -> str:
    return f"{self.name}@{self.steps}"

  @property
  def eval_every(self) -> int:
    return max(1, self.steps // 30)


class _NoiseFreeEval(tasks_base.Task):
  """A noisy quadratic whose non-train splits see zero gradient noise, so its validation
  and test loss is the clean ``1/2 (p - c)^T A (p - c) >= 0`` (a ratio of two such losses
  is meaningful; the noisy one can be negative)."""

  def __init__(self, inner):
    self.inner, self.name = inner, inner.name

  def init(self, key):
    return self.inner.init(key)

  def loss(self, params, key, data):
    return self.inner.loss(params, key, data)

  def sample_batch(self, key, split="train"):
    batch = self.inner.sample_batch(key, split)
    return batch if split == "train" else jnp.zeros_like(batch)


class _NoiseFreeEvalFamily(tasks_base.TaskFamily):

  def __init__(self, family):
    self.family, self.name = family, family.name

  def sample(self, key):
    return self.family.sample(key)

  def task_fn(self, task_param):
    return _NoiseFreeEval(self.family.task_fn(task_param))


def _fixed(builder: Callable[[], tasks_base.Task]) -> Callable[[], tasks_base.TaskFamily]:
  return lambda: tasks_base.single_task_to_family(builder())


def _mlp3():
  from spmd_lopt import datasets as ds_lib  # pylint: disable=import-outside-toplevel
  ds = ds_lib.digits8_datasets(128)
  return ImageClassificationTask(image_mlp.MLP((64, 64, 64), ds.num_classes), ds,
                                 name="ImageMLP_Digits8_Relu64x64x64")


def _quadratic():
  return _NoiseFreeEvalFamily(
      quadratics.RotatedNoisyQuadraticFamily(dim=10, max_condition=1000.0))


# name -> (family builder, kind)
TASKS: dict[str, tuple[Callable[[], tasks_base.TaskFamily], str]] = {
    "ImageMLP_Digits8_Relu32": (_fixed(image_mlp.ImageMLP_Digits8_Relu32), "in-distribution"),
    "ImageMLP_Digits8_Relu128x128": (_fixed(image_mlp.ImageMLP_Digits8_Relu128x128),
                                     "larger"),
    "ImageMLP_Digits8_Relu64x64x64": (_fixed(_mlp3), "larger"),
    "Conv_Digits8_16x32": (_fixed(conv.Conv_Digits8_16x32), "larger"),
    "Autoencoder_Digits8_32x16x32": (_fixed(autoencoder.Autoencoder_Digits8_32x16x32),
                                     "larger"),
    "TransformerLM_Copy8x8": (_fixed(transformer_lm.TransformerLM_Copy8x8), "other"),
    "NoisyQuadratic_10_cond1000": (_quadratic, "other"),
    "LayerNormMLP_Digits8_64x64": (_fixed(norm_mlp.LayerNormMLP_Digits8_64x64), "other"),
}


@dataclasses.dataclass(frozen=True)
class Suite:
  name: str
  tasks: tuple[SuiteTask, ...]
  seeds: int
  baselines: tuple[Baseline, ...]
  eval_batches: int = 5
  # every learned optimizer also runs at these multipliers of its step (x1 always runs)
  lopt_lr_mults: tuple[float, ...] = LOPT_LR_MULTS
  # and at the multipliers ``lopt_wd_mults`` (empty: all of ``lopt_lr_mults``) with each
  # of these decoupled weight decays (empty: no ``+lr+wd`` row)
  lopt_weight_decays: tuple[float, ...] = ()
  lopt_wd_mults: tuple[float, ...] = ()


def _entries(names, horizons):
  return tuple(SuiteTask(n, TASKS[n][0], h, TASKS[n][1]) for h in horizons for n in names)


def _suites() -> dict[str, Suite]:
  return {
      "full": Suite("full", _entries(list(TASKS), (MT_HORIZON, 5 * MT_HORIZON)), seeds=5,
                    baselines=baselines(), lopt_weight_decays=LOPT_WEIGHT_DECAYS,
                    lopt_wd_mults=LOPT_WD_MULTS),
      "quick": Suite("quick", _entries(["ImageMLP_Digits8_Relu32",
                                        "NoisyQuadratic_10_cond1000"], (60,)),
                     seeds=2, baselines=baselines((1e-2,)), eval_batches=3),
  }


SUITE_NAMES = ("full", "quick")


def get_suite(name: str) -> Suite:
  """The suite called ``name`` (``full`` or ``quick``); ValueError otherwise."""
  suites = _suites()
  if name not in suites:
    raise ValueError(f"unknown suite {name!r}; known: {', '.join(suites)}.")
  return suites[name]


def select(suite: Suite, tasks: Sequence[str] = (), horizons: Sequence[int] = ()) -> Suite:
  """``suite`` restricted to the tasks in ``tasks`` (a name: every horizon of it; a label
  ``name@steps``: that entry only) and the step counts in ``horizons`` (empty: all); an
  unknown name, label or horizon, or an empty result, is a ValueError. Cached runs are
  shared, so subsets run in pieces add up to the whole."""
  names = {e.name for e in suite.tasks} | {e.label for e in suite.tasks}
  steps = {e.steps for e in suite.tasks}
  bad = [t for t in tasks if t not in names]
  if bad:
    raise ValueError(f"suite {suite.name!r} has no task {bad[0]!r}; its tasks: "
                     f"{', '.join(sorted(names))}.")
  bad_h = [h for h in horizons if h not in steps]
  if bad_h:
    raise ValueError(f"suite {suite.name!r} has no horizon {bad_h[0]}; its horizons: "
                     f"{', '.join(str(h) for h in sorted(steps))}.")
  kept = tuple(e for e in suite.tasks if (not tasks or e.name in tasks or e.label in tasks)
               and (not horizons or e.steps in horizons))
  return dataclasses.replace(suite, tasks=kept)


def suite_key(seed: int = 0) -> jax.Array:
  """The root key of suite runs (distinct from any meta-training key chain)."""
  return jax.random.fold_in(jax.random.key(seed), 0x5017E)
