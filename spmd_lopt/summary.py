"""Summary writers with the reference library's interface, and metric aggregation.

A writer has ``scalar(name, value, step)``, ``histogram(name, values, step)``,
``flush()`` and ``close()``. Available: ``PrintWriter`` (stdout), ``JSONLWriter`` (one
strict-JSON object per line; non-finite numbers are written as ``null``),
``TensorboardWriter`` (event files, needs the optional ``tensorboardX`` package: without
it the constructor raises ``ImportError`` saying so; ``JaxboardWriter`` is the reference's
name for it) and ``MultiWriter`` (fan out to several).

Metric names follow the reference: ``"<aggregation>||<name>"`` with aggregation ``mean``
(average over workers / estimators), ``sample`` (any one value), ``collect`` (all values)
or ``none`` (one value, no aggregation expected). ``aggregate_metric_list`` merges the
metric dicts of several estimators or workers by those rules.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Optional, Sequence

import numpy as np


def _finite_or_none(x: float) -> Optional[float]:
  return x if math.isfinite(x) else None


class SummaryWriterBase:
  """Interface: every method is a no-op here."""

  def scalar(self, name: str, value: Any, step: int):
    pass

  def histogram(self, name: str, values: Any, step: int):
    pass

  def text(self, name: str, value: str, step: int):
    pass

  def flush(self):
    pass

  def close(self):
    self.flush()

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    """Convenience: one ``scalar`` call per entry."""
    for name, value in scalars.items():
      self.scalar(name, value, step)


class PrintWriter(SummaryWriterBase):
  """Print ``step name value`` lines (``precision`` digits if given)."""

  def __init__(self, precision: Optional[int] = None):
    self.precision = precision

  def scalar(self, name, value, step):
    value = float(np.asarray(value))
    shown = value if self.precision is None else round(value, self.precision)
    print(f"{int(step)} {name} {shown}")

  def histogram(self, name, values, step):
    v = np.asarray(values, np.float64).ravel()
    print(f"{int(step)} {name} histogram n={v.size} mean={v.mean() if v.size else 0.0}")

  def text(self, name, value, step):
    print(f"{int(step)} {name} {value}")


class JSONLWriter(SummaryWriterBase):
  """Append one JSON object per call to ``path``:
  ``{"step", "name", "value"}`` for scalars, ``{"step", "name", "histogram": {count, min,
  max, mean, std}}`` for histograms (over the finite values). Strict JSON: NaN and
  infinities become ``null``."""

  def __init__(self, path: str):
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    self.path = path
    self._file = open(path, "a", encoding="utf-8")

  def _write(self, record):
    self._file.write(json.dumps(record, allow_nan=False) + "\n")

  def scalar(self, name, value, step):
    self._write({"step": int(step), "name": name,
                 "value": _finite_or_none(float(np.asarray(value)))})

  def histogram(self, name, values, step):
    v = np.asarray(values, np.float64).ravel()
    v = v[np.isfinite(v)]
    stats = {"count": int(v.size)}
    if v.size:
      stats.update(min=float(v.min()), max=float(v.max()), mean=float(v.mean()),
                   std=float(v.std()))
    self._write({"step": int(step), "name": name, "histogram": stats})

  def text(self, name, value, step):
    self._write({"step": int(step), "name": name, "text": str(value)})

  def flush(self):
    self._file.flush()

  def close(self):
    if not self._file.closed:
      self._file.close()


class TensorboardWriter(SummaryWriterBase):
  """TensorBoard event files in ``log_dir`` (through ``tensorboardX``, optional)."""

  def __init__(self, log_dir: str):
    try:
      import tensorboardX  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise ImportError("TensorboardWriter needs the optional package tensorboardX, which is "
                        "not installed (pip install tensorboardX); use JSONLWriter or "
                        "PrintWriter instead.") from e
    self.log_dir = log_dir
    self._writer = tensorboardX.SummaryWriter(log_dir)

  def scalar(self, name, value, step):
    self._writer.add_scalar(name, float(np.asarray(value)), int(step))

  def histogram(self, name, values, step):
    self._writer.add_histogram(name, np.asarray(values, np.float64).ravel(), int(step))

  def text(self, name, value, step):
    self._writer.add_text(name, str(value), int(step))

  def flush(self):
    self._writer.flush()

  def close(self):
    self._writer.close()


JaxboardWriter = TensorboardWriter


class MultiWriter(SummaryWriterBase):
  """Send every call to each of ``writers``."""

  def __init__(self, *writers: SummaryWriterBase):
    self.writers = writers

  def scalar(self, name, value, step):
    for w in self.writers:
      w.scalar(name, value, step)

  def histogram(self, name, values, step):
    for w in self.writers:
      w.histogram(name, values, step)

  def text(self, name, value, step):
    for w in self.writers:
      w.text(name, value, step)

  def flush(self):
    for w in self.writers:
      w.flush()

  def close(self):
    for w in self.writers:
      w.close()


def summary(name: str, value: Any, aggregation: str = "mean") -> Any:
  """The reference's in-graph summary call: returns ``value`` unchanged and records nothing.

  (The reference records these only when oryx is installed, through its sow/harvest; this
  package returns metrics explicitly instead, so learned optimizers ported with such calls
  run unchanged.) ``aggregation`` must be one of the reference's.
  """
  if aggregation not in ("mean", "sample", "collect", "none"):
    raise ValueError(f"summary {name!r}: unknown aggregation {aggregation!r}.")
  return value


def aggregate_metric_list(metrics_list: Sequence[Mapping[str, Any]]) -> dict:
  """Merge metric dicts by each name's aggregation prefix.

  ``mean||x``: the mean of the values; ``sample||x`` and ``none||x``: the first value;
  ``collect||x``: all values concatenated (1-D numpy). A name without ``||`` is a
  ``ValueError`` (the reference's format is required). Values come back as numpy/float.
  """
  grouped: dict[str, list] = {}
  for metrics in metrics_list:
    for name, value in metrics.items():
      if "||" not in name:
        raise ValueError(f"metric {name!r} has no aggregation prefix ('mean||', 'sample||', "
                         "'collect||' or 'none||').")
      grouped.setdefault(name, []).append(np.asarray(value))
  out = {}
  for name, values in grouped.items():
    agg = name.split("||", 1)[0]
    if agg == "mean":
      out[name] = np.mean(np.stack([v.astype(np.float64) for v in values]), axis=0)
    elif agg == "collect":
      out[name] = np.concatenate([np.ravel(v) for v in values])
    elif agg in ("sample", "none"):
      out[name] = values[0]
    else:
      raise ValueError(f"metric {name!r}: unknown aggregation {agg!r}.")
  return out
