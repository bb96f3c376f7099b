"""The run configuration: config files, their two forms, checks, and the builders that
turn a config into a learner.

Config files in ``configs/`` are Python files whose ``get_config()`` returns a ConfigDict,
either the short form (``base_config()``: one flat level) or the full form (sections
``lopt``, ``outer_opt``, ``frozen`` and a list of ``estimators``; see ``schema``). Every
key is checked against the schema or the constructor it feeds, so a typo is a one-line
error naming the key and the known ones, not a silently ignored setting.

Modules: ``schema`` (forms and defaults), ``checks`` (one-line errors), ``loading`` (files
and ``--config.KEY=VALUE``), ``outer_opt`` (optax outer optimizer, ``frozen`` mask),
``lopt_section`` (the learned optimizer and its starting theta), ``builders`` (tasks,
estimators, the learner).
"""

from __future__ import annotations

from typing import Optional

import ml_collections

from spmd_lopt.config import builders
from spmd_lopt.config import checks
from spmd_lopt.config import loading
from spmd_lopt.config import outer_opt
from spmd_lopt.config import schema
from spmd_lopt.config.builders import (ESTIMATORS, abstract_learner_state, make_learner,
                                       resolve, task_names)
from spmd_lopt.config.loading import format_config, load, split_args
from spmd_lopt.config.schema import base_config, is_nested, nested_config, to_nested

__all__ = ["ESTIMATORS", "abstract_learner_state", "base_config", "builders", "check_values",
           "checks", "format_config", "is_nested", "load", "load_config", "loading",
           "make_estimator", "make_learner", "make_lopt", "make_task_family",
           "make_theta_opt", "make_trunc_sched", "nested_config", "outer_opt", "resolve",
           "schema", "split_args", "task_names", "to_nested", "validate"]


def validate(overrides, base: Optional[ml_collections.ConfigDict] = None):
  """Short form: ``overrides`` merged into ``base_config()``; unknown keys raise a
  ValueError naming them. A full-form config is checked and returned as a ConfigDict."""
  if is_nested(schema.to_plain(overrides)):
    return loading.finish(schema.to_plain(overrides))
  return schema.validate_flat(overrides, base)


def load_config(path: Optional[str] = None) -> ml_collections.ConfigDict:
  """The config of ``path`` (default: ``base_config()``), checked and locked."""
  if path is None:
    cfg = base_config()
    cfg.lock()
    return cfg
  return load(path)


def check_values(cfg) -> None:
  """Reject settings that would otherwise fail deep inside tracing (either form)."""
  resolve(cfg)


def _entry(cfg, index: int = 0):
  return resolve(cfg)["estimators"][index]


def make_task_family(name: str, cfg):
  """The family ``name`` as ``cfg`` would build it for training (short form:
  ``quadratic`` takes ``quadratic_dim``; full form: the first estimator on ``name`` gives
  its ``task_kwargs``; real-data tasks take ``data_dir``)."""
  full = resolve(cfg)
  entry = next((e for e in full["estimators"] if e["task"] == name), None)
  if entry is None:
    entry = dict(schema.estimator_defaults(), task=name)
    if name == "quadratic" and "quadratic_dim" in cfg:
      entry["task_kwargs"] = {"dim": cfg["quadratic_dim"]}
  entry = dict(entry, augmentation={"name": "none"})
  return builders.make_task_family_from_entry(f"task {name!r}", entry, full["data_dir"])


def make_lopt(cfg):
  return builders.make_lopt_from_section(resolve(cfg)["lopt"])


def make_trunc_sched(cfg):
  return builders.make_truncation("config.estimators.0.truncation",
                                  _entry(cfg)["truncation"])


def make_theta_opt(cfg):
  full = resolve(cfg)
  return outer_opt.make_outer_optimizer(full["outer_opt"], full["outer_steps"],
                                        full["frozen"])


def make_estimator(family, lopt, cfg, index: int = 0):
  """Estimator ``index`` of ``cfg`` (short form: the one all tasks share) on ``family``."""
  return builders.make_estimator_from_entry(f"config.estimators.{index}",
                                            _entry(cfg, index), family, lopt)
