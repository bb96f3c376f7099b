"""What the benchmark runs: task families by workload name, and the learners built on them.

A workload is a list of family names, one estimator each, all in one learner (one fused
meta step). A name resolves, in order, through

- ``TASK_FAMILIES`` here: ``quadratic`` (``FixedDimQuadraticFamily(10)``), ``image_mlp``
  (``ImageMLP_Digits8_Relu32``, the reference tutorial's 8x8-digits MLP) and
  ``synthetic8`` (the task registry's synthetic 8x8 image MLP: random images, labels from
  a fixed teacher; the Celo2 recipe's task shape without data files) and ``mnist_size``
  (random data of MNIST's size, for program-size measurements);
- the task registry (``spmd_lopt.tasks.registry.get_task_family``), so any registered
  family or fixed task is a workload by its own name.

A name that resolves nowhere (a task or learned optimizer not in this install, a data set
whose files are missing, a library option this version lacks) raises
``WorkloadUnavailable``: the point is recorded as ``skipped`` with that one-line reason,
not as an error, so configs can name what a later version adds.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Sequence

# The synthetic 8x8 source is added to the task registry by the tasks work; the first of
# these names that the registry knows is used (HOOK: add the final name here if it differs).
SYNTHETIC8_NAMES = ("ImageMLP_Synthetic8_Relu32_B64", "ImageMLP_Synthetic8_Relu32")


class WorkloadUnavailable(Exception):
  """A workload names something this install does not have (the point is skipped)."""


def _registry_family(name: str, batch_size: int = 0):
  from spmd_lopt import datasets  # pylint: disable=import-outside-toplevel
  from spmd_lopt.tasks import registry  # pylint: disable=import-outside-toplevel
  kwargs = {"batch_size": int(batch_size)} if batch_size > 0 else {}
  try:
    return registry.get_task_family(name, **kwargs), name
  except TypeError:
    if not kwargs:
      raise
    # A family whose batch is fixed by its name (``..._B64``): keep its own batch.
    return registry.get_task_family(name), f"{name} (own batch; batch_size not settable)"
  except datasets.DatasetNotFoundError as e:
    raise WorkloadUnavailable(f"task {name!r}: its data set is missing "
                              f"({str(e).splitlines()[0][:160]})") from None
  except ValueError as e:
    raise WorkloadUnavailable(f"task family {name!r} is not in this install's task "
                              f"registry ({str(e)[:120]}...)") from None


def _quadratic_family(batch_size: int = 0):
  del batch_size
  from spmd_lopt.tasks import quadratics  # pylint: disable=import-outside-toplevel
  return quadratics.FixedDimQuadraticFamily(10), "FixedDimQuadraticFamily(10)"


def _image_mlp_family(batch_size: int = 0):
  return _registry_family("ImageMLP_Digits8_Relu32", batch_size)


def _synthetic8_family(batch_size: int = 0):
  from spmd_lopt.tasks import registry  # pylint: disable=import-outside-toplevel
  known = registry.task_family_names()
  for name in SYNTHETIC8_NAMES:
    if name in known:
      return _registry_family(name, batch_size)
  raise WorkloadUnavailable(f"synthetic8: none of {list(SYNTHETIC8_NAMES)} is in the task "
                            "registry (the synthetic 8x8 data source is not in this "
                            "install)")


def _mnist_size_family(batch_size: int = 0):
  """A 784 -> 32 -> 10 ReLU MLP on random uint8 28x28x1 images with MNIST's split sizes
  (48k / 6k / 6k / 10k: 55 MB). Random pixels and labels: for program-size and compile
  measurements of an MNIST-size data set without its files, not for learning."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from spmd_lopt import datasets  # pylint: disable=import-outside-toplevel
  from spmd_lopt.tasks import base  # pylint: disable=import-outside-toplevel
  from spmd_lopt.tasks.fixed import classification, image_mlp  # pylint: disable=C0415
  rng = np.random.default_rng(0)
  sizes = {"train": 48000, "inner_valid": 6000, "outer_valid": 6000, "test": 10000}
  images = {k: jnp.asarray(rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8))
            for k, n in sizes.items()}
  labels = {k: jnp.asarray(rng.integers(0, 10, (n,), dtype=np.int32))
            for k, n in sizes.items()}
  ds = datasets.ImageDataset(images=images, labels=labels, name="mnist_size_random",
                             batch_size=batch_size or 128, num_classes=10,
                             image_scale=1.0 / 255.0)
  task = classification.ImageClassificationTask(image_mlp.MLP((32,), 10), ds,
                                                name="ImageMLP_MnistSizeRandom_Relu32")
  return base.single_task_to_family(task), "ImageMLP_MnistSizeRandom_Relu32 (random data)"


TASK_FAMILIES: dict[str, Callable[..., tuple[Any, str]]] = {
    "quadratic": _quadratic_family,
    "image_mlp": _image_mlp_family,
    "synthetic8": _synthetic8_family,
    "mnist_size": _mnist_size_family,
}


def make_family(name: str, batch_size: int = 0):
  """``(TaskFamily, description)`` for a workload name (see the module docstring)."""
  if name in TASK_FAMILIES:
    return TASK_FAMILIES[name](batch_size)
  return _registry_family(name, batch_size)


def make_lopt(name: str):
  """A learned optimizer with its default hyper-parameters, from the registry."""
  from spmd_lopt.learned_optimizers import registry  # pylint: disable=import-outside-toplevel
  if name not in registry.names():
    raise WorkloadUnavailable(f"learned optimizer {name!r} is not registered in this "
                              f"install (known: {', '.join(registry.names())})")
  return registry.get(name)()


def library_config(bcfg, num_tasks: int):
  """The library config (``spmd_lopt.config``) a bench point's estimators are built from."""
  from spmd_lopt import config as config_lib  # pylint: disable=import-outside-toplevel
  c = config_lib.base_config()
  c.num_tasks = int(num_tasks)
  for k in ("trunc_length", "min_length", "max_length", "random_initial_iteration_offset",
            "std", "outer_lr"):
    c[k] = bcfg[k]
  return c


def has_reset_mode() -> bool:
  """Whether ``VectorizedLOptTruncatedStep`` takes a ``reset_mode`` option."""
  from spmd_lopt.outer_trainers import lopt_truncated_step  # pylint: disable=C0415
  step_cls = lopt_truncated_step.VectorizedLOptTruncatedStep
  return "reset_mode" in inspect.signature(step_cls.__init__).parameters


def _set_reset_mode(est, mode: str) -> None:
  step = est.truncated_step
  if not has_reset_mode() or not hasattr(step, "reset_mode"):
    raise WorkloadUnavailable(f"reset_mode={mode!r}: VectorizedLOptTruncatedStep has no "
                              "reset_mode option in this install")
  step.reset_mode = mode


def build_estimators(bcfg, families: Sequence[str], estimator: str, num_tasks: int, lopt,
                     reset_mode: str = ""):
  """One estimator per family name; returns ``(estimators, {name: description})``."""
  from spmd_lopt import config as config_lib  # pylint: disable=import-outside-toplevel
  c = library_config(bcfg, num_tasks)
  c.estimator = estimator
  ests, impls = [], {}
  for name in families:
    fam, impl = make_family(name, int(bcfg.get("batch_size", 0)))
    impls[name] = impl
    est = config_lib.make_estimator(fam, lopt, c)
    if hasattr(est, "stack_antithetic_samples"):
      est.stack_antithetic_samples = bool(bcfg.stack_antithetic)
    if reset_mode:
      _set_reset_mode(est, reset_mode)
    ests.append(est)
  return ests, impls


def build_learner(bcfg, families, estimator, num_tasks, mesh, reset_mode: str = ""):
  """The fused ``SpmdGradientLearner`` of one point; returns ``(learner, impls)``."""
  from spmd_lopt import config as config_lib  # pylint: disable=import-outside-toplevel
  from spmd_lopt.outer_trainers import gradient_learner  # pylint: disable=import-outside-toplevel
  c = library_config(bcfg, num_tasks)
  lopt = make_lopt(bcfg.lopt)
  ests, impls = build_estimators(bcfg, families, estimator, num_tasks, lopt, reset_mode)
  lrn = gradient_learner.SpmdGradientLearner(lopt, ests, config_lib.make_theta_opt(c),
                                             mesh=mesh)
  return lrn, impls
