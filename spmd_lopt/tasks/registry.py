"""Tasks and task families by name, so a config can say ``task = "ImageMLP_Digits8_Relu32"``.

``get_task(name, **kwargs)``: every fixed task in ``tasks.fixed`` (kwargs such as
``data_dir`` or ``batch_size`` go to its constructor), including the Celo2 paper's set
``ImageMLP_*_Relu32_B64`` (``fixed/celo2_set.py``).

``get_task_set(name)``: the task names of ``"celo2"`` (the paper's four data sets),
``"celo2_digits"`` (four offline tasks from the embedded digits) and ``"celo2_synthetic"``
(four synthetic teacher tasks).

``get_task_family(name, **kwargs)``:
- ``"quadratic"`` -> ``FixedDimQuadraticFamily(10)``; ``"FixedDimQuadraticFamily_<d>"``;
- ``"FixedDimQuadraticFamilyData_<d>"`` (host-fed noise batches, as the reference);
- ``"noisy_quadratic"`` -> ``RotatedNoisyQuadraticFamily(10)``;
  ``"RotatedNoisyQuadraticFamily_<d>"``;
- ``"NoisyQuadraticFamily_<d>"`` -> the reference's ``NoisyQuadraticFamily(d, cov)`` with
  ``cov = 0.1`` unless given;
- ``"ParametricImageMLP_Digits8"`` -> ``ParametricImageMLP`` on the embedded digits;
- any fixed task name -> that task wrapped by ``base.single_task_to_family``.

Unknown names raise ``ValueError`` listing the known ones. Data sets are loaded when a
task is built, so a real-data task whose files are missing raises
``datasets.DatasetNotFoundError`` there.
"""

from __future__ import annotations

import inspect
import re

from spmd_lopt.tasks import base, quadratics
from spmd_lopt.tasks.fixed import celo2_set, conv, image_mlp

_TASKS = {**image_mlp.TASKS, **conv.TASKS, **celo2_set.TASKS}
TASK_SETS = dict(celo2_set.TASK_SETS)


def _parametric_digits8(**kwargs):
  from spmd_lopt.tasks.parametric import ParametricImageMLP  # keeps import light
  return ParametricImageMLP(**kwargs)


_FAMILIES = {
    "quadratic": lambda **kw: quadratics.FixedDimQuadraticFamily(**kw),
    "noisy_quadratic": lambda **kw: quadratics.RotatedNoisyQuadraticFamily(**kw),
    "ParametricImageMLP_Digits8": _parametric_digits8,
}
_PATTERNS = {
    r"FixedDimQuadraticFamily_(\d+)": quadratics.FixedDimQuadraticFamily,
    r"FixedDimQuadraticFamilyData_(\d+)": quadratics.FixedDimQuadraticFamilyData,
    r"RotatedNoisyQuadraticFamily_(\d+)": quadratics.RotatedNoisyQuadraticFamily,
    r"NoisyQuadraticFamily_(\d+)": lambda dim, cov=0.1: quadratics.NoisyQuadraticFamily(
        dim, cov),
}


def task_names() -> tuple[str, ...]:
  return tuple(sorted(_TASKS))


def task_family_names() -> tuple[str, ...]:
  return (tuple(_FAMILIES) + tuple(p.replace(r"(\d+)", "<dim>") for p in _PATTERNS)
          + task_names())


def task_set_names() -> tuple[str, ...]:
  return tuple(sorted(TASK_SETS))


def get_task_set(name: str) -> tuple[str, ...]:
  """The task names of a named set (``"celo2"``, ``"celo2_digits"``, ``"celo2_synthetic"``):
  one estimator per task, as the paper meta-trains."""
  if name not in TASK_SETS:
    raise ValueError(f"Unknown task set {name!r}. Known task sets: "
                     f"{', '.join(task_set_names())}.")
  return TASK_SETS[name]


def constructor(name: str):
  """The callable a name's keyword arguments go to (a fixed task's builder or a family's
  class), so a config can check them against its signature; None for the ``*_<dim>``
  patterns (their one argument is in the name)."""
  if name in _TASKS:
    return _TASKS[name]
  if name == "quadratic":
    return quadratics.FixedDimQuadraticFamily
  if name == "noisy_quadratic":
    return quadratics.RotatedNoisyQuadraticFamily
  if name == "ParametricImageMLP_Digits8":
    from spmd_lopt.tasks.parametric import ParametricImageMLP  # keeps import light
    return ParametricImageMLP
  return None


def task_parameters(name: str) -> tuple[str, ...]:
  """The keyword arguments task ``name``'s builder takes (e.g. ``("data_dir",
  "batch_size")``), so a config can pass only what a task accepts."""
  if name not in _TASKS:
    raise ValueError(f"Unknown task {name!r}. Known tasks: {', '.join(task_names())}.")
  return tuple(inspect.signature(_TASKS[name]).parameters)


def get_task(name: str, **kwargs) -> base.Task:
  if name not in _TASKS:
    raise ValueError(f"Unknown task {name!r}. Known tasks: {', '.join(task_names())}.")
  return _TASKS[name](**kwargs)


def get_task_family(name: str, **kwargs) -> base.TaskFamily:
  if name in _FAMILIES:
    return _FAMILIES[name](**kwargs)
  for pattern, cls in _PATTERNS.items():
    m = re.fullmatch(pattern, name)
    if m:
      return cls(int(m.group(1)), **kwargs)
  if name in _TASKS:
    return base.single_task_to_family(_TASKS[name](**kwargs), name=name)
  raise ValueError(f"Unknown task family {name!r}. Known: "
                   f"{', '.join(task_family_names())}.")
