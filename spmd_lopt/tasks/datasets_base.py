"""The reference library's data model: four host iterators of batches per task.

In ``learned_optimization`` a task's ``datasets`` is a ``Datasets`` with the iterators
``train``, ``inner_valid``, ``outer_valid`` and ``test`` (each ``next()`` gives one batch,
a pytree of numpy arrays), ``extra_info`` (e.g. ``{"num_classes": 10}``) and
``abstract_batch`` (the batch's shapes and dtypes, or ``None``). Its trainers pull
batches on the host and feed them to the compiled step.

Here the fast default is different: image tasks hold an on-device ``ImageDataset`` and
draw batches inside the meta step (``spmd_lopt.datasets``). Tasks written against the
reference's iterators still work: their batches go through the trainers' host-fed
``datas`` path. This module gives them the same container and helpers:

- ``Datasets(train, inner_valid, outer_valid, test, extra_info=None, abstract_batch=None)``
  and ``Datasets.split(name)``;
- ``ThreadSafeIterator`` (a lock around ``next``), ``LazyIterator`` (builds its iterator on
  first ``next``), ``LazyDataset`` (builds the ``Datasets`` on first access);
- ``datasets_map(fn, datasets)`` and ``dataset_lru_cache`` / ``dataset_lru_cache_clear``;
- ``host_datasets(image_dataset, seed)``: an on-device ``ImageDataset`` as host iterators
  (per-epoch shuffles without replacement, as the reference's image loaders).
"""

from __future__ import annotations

import functools
import threading
from typing import Any, Callable, Iterator, Mapping, Optional

import jax
import numpy as np

Batch = Any
SPLITS = ("train", "inner_valid", "outer_valid", "test")


class Datasets:
  """Four iterators of batches, plus ``extra_info`` and ``abstract_batch``."""

  def __init__(self, train: Iterator[Batch], inner_valid: Iterator[Batch],
               outer_valid: Iterator[Batch], test: Iterator[Batch],
               extra_info: Optional[Mapping[str, Any]] = None,
               abstract_batch: Optional[Any] = None):
    self.train = train
    self.inner_valid = inner_valid
    self.outer_valid = outer_valid
    self.test = test
    self.extra_info = dict(extra_info or {})
    self.abstract_batch = abstract_batch

  def split(self, name: str) -> Iterator[Batch]:
    """The iterator of split ``name`` (one of ``SPLITS``)."""
    if name not in SPLITS:
      raise ValueError(f"Unknown data split {name!r}; known: {SPLITS}.")
    return getattr(self, name)


class ThreadSafeIterator:
  """``iterator`` with ``next`` under a lock (several threads may pull batches)."""

  def __init__(self, iterator: Iterator[Any]):
    self._iterator = iterator
    self._lock = threading.Lock()

  def __iter__(self):
    return self

  def __next__(self):
    with self._lock:
      return next(self._iterator)


class LazyIterator:
  """Calls ``fn()`` to build the real iterator on the first ``next``."""

  def __init__(self, fn: Callable[[], Iterator[Any]]):
    self._fn = fn
    self._iterator = None

  def __iter__(self):
    return self

  def __next__(self):
    if self._iterator is None:
      self._iterator = self._fn()
    return next(self._iterator)


class LazyDataset(Datasets):
  """A ``Datasets`` built by ``dataset_fn()`` the first time any attribute is read."""

  def __init__(self, dataset_fn: Callable[[], Datasets]):  # pylint: disable=super-init-not-called
    self._fn = functools.lru_cache(None)(dataset_fn)

  train = property(lambda self: self._fn().train)
  inner_valid = property(lambda self: self._fn().inner_valid)
  outer_valid = property(lambda self: self._fn().outer_valid)
  test = property(lambda self: self._fn().test)
  extra_info = property(lambda self: self._fn().extra_info)
  abstract_batch = property(lambda self: self._fn().abstract_batch)


_CACHED: list = []


def dataset_lru_cache(fn: Callable[..., Datasets]) -> Callable[..., Datasets]:
  """Cache a ``Datasets`` builder by its arguments (iterators are costly to set up)."""
  cached = functools.lru_cache(maxsize=None)(fn)
  _CACHED.append(cached)
  return cached


def dataset_lru_cache_clear() -> None:
  for fn in _CACHED:
    fn.cache_clear()


def datasets_map(fn: Callable[[Batch], Batch], datasets: Datasets) -> Datasets:
  """``fn`` applied to every batch of every split (lazily, as ``map``)."""
  return Datasets(*(map(fn, datasets.split(s)) for s in SPLITS),
                  extra_info=datasets.extra_info, abstract_batch=datasets.abstract_batch)


def host_datasets(image_dataset, seed: int = 0) -> Datasets:
  """An ``spmd_lopt.datasets.ImageDataset`` as host iterators of numpy batches.

  Each split is shuffled once per epoch (``numpy`` generator seeded by ``seed`` and the
  split) and cut into ``batch_size`` batches, the remainder dropped, as the reference's
  image loaders; batches are ``{"image": f32[B, H, W, C], "label": i32[B]}``.
  """
  b = image_dataset.batch_size

  def make(split, split_seed):
    images = np.asarray(jax.device_get(image_dataset.images[split]))
    labels = np.asarray(jax.device_get(image_dataset.labels[split]))
    if labels.shape[0] < b:
      raise ValueError(f"{image_dataset.name}: split {split!r} has {labels.shape[0]} "
                       f"examples, fewer than one batch of {b}.")
    rng = np.random.default_rng([seed, split_seed])
    while True:
      order = rng.permutation(labels.shape[0])
      for i in range(labels.shape[0] // b):
        idx = order[i * b:(i + 1) * b]
        image = images[idx].astype(np.float32) * np.float32(image_dataset.image_scale)
        yield {"image": image, "label": labels[idx].astype(np.int32)}

  iters = [ThreadSafeIterator(LazyIterator(functools.partial(make, s, i)))
           for i, s in enumerate(SPLITS)]
  return Datasets(*iters, extra_info={"num_classes": image_dataset.num_classes},
                  abstract_batch=image_dataset.abstract_batch)
