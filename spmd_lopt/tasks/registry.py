"""Tasks and task families by name, so a config can say ``task = "ImageMLP_Digits8_Relu32"``.

``get_task(name, **kwargs)``: every fixed task in ``tasks.fixed`` (kwargs such as
``data_dir`` or ``batch_size`` go to its constructor).

``get_task_family(name, **kwargs)``:
- ``"quadratic"`` -> ``FixedDimQuadraticFamily(10)``; ``"FixedDimQuadraticFamily_<d>"``;
- ``"noisy_quadratic"`` -> ``NoisyQuadraticFamily(10)``; ``"NoisyQuadraticFamily_<d>"``;
- ``"ParametricImageMLP_Digits8"`` -> ``ParametricImageMLP`` on the embedded digits;
- any fixed task name -> that task wrapped by ``base.single_task_to_family``.

Unknown names raise ``ValueError`` listing the known ones. Data sets are loaded when a
task is built, so a real-data task whose files are missing raises
``datasets.DatasetNotFoundError`` there.
"""

from __future__ import annotations

import re

from spmd_lopt.tasks import base, quadratics
from spmd_lopt.tasks.fixed import conv, image_mlp

_TASKS = {**image_mlp.TASKS, **conv.TASKS}


def _parametric_digits8(**kwargs):
  from spmd_lopt.tasks.parametric import ParametricImageMLP  # keeps import light
  return ParametricImageMLP(**kwargs)


_FAMILIES = {
    "quadratic": lambda **kw: quadratics.FixedDimQuadraticFamily(**kw),
    "noisy_quadratic": lambda **kw: quadratics.NoisyQuadraticFamily(**kw),
    "ParametricImageMLP_Digits8": _parametric_digits8,
}
_PATTERNS = {
    r"FixedDimQuadraticFamily_(\d+)": quadratics.FixedDimQuadraticFamily,
    r"NoisyQuadraticFamily_(\d+)": quadratics.NoisyQuadraticFamily,
}


def task_names() -> tuple[str, ...]:
  return tuple(sorted(_TASKS))


def task_family_names() -> tuple[str, ...]:
  return (tuple(_FAMILIES) + ("FixedDimQuadraticFamily_<dim>", "NoisyQuadraticFamily_<dim>")
          + task_names())


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
