"""Ship a meta-trained learned optimizer as package data: ``pretrained:<name>``.

Reads a launcher workdir (``theta.lopt``, ``config.json``, ``summary.json``) and,
optionally, an evaluation-suite result (``suite.json`` of ``python -m spmd_lopt.evaluate
--suite ...``), and writes ``spmd_lopt/pretrained/<name>.lopt``: the same
``ParameterCheckpoint`` with its ``extra`` metadata holding the training config, the
outer-step count, the training time, the config file that reproduces it and the suite's
aggregates. ``resolve("pretrained:<name>")``, ``as_optax("pretrained:<name>")``,
``evaluate --lopt pretrained:<name>`` and ``--config.lopt.init_from=pretrained:<name>``
then find it. A run that continued a shipped theta also records that parent and the
total outer steps and wall time of the chain.

  python scripts/ship_pretrained.py --workdir runs/celo2_digits_short \\
      --name celo2_digits_short --reproduce configs/celo2_digits_short.py \\
      [--suite eval_quick/suite.json]
  python scripts/ship_pretrained.py --name celo2_digits --suite eval_full/suite.json \\
      --add_suite_as suite_full_300   # a later evaluation's aggregates, theta unchanged
"""

import argparse
import json
import os
import platform

from spmd_lopt.learned_optimizers import checkpoint as ckpt_lib
from spmd_lopt.learned_optimizers import specs


def _read_json(path):
  with open(path) as f:
    return json.load(f)


def suite_aggregates(suite: dict, label: str) -> dict:
  """The aggregate rows of ``label`` in a suite result (IQMs and intervals), and of its
  tuned rows ``label+lr`` and ``label+lr+wd`` when the suite has them."""
  agg = suite.get("aggregates", {})
  out = {"suite": suite.get("suite"), "label": label, "aggregates": agg.get(label, agg),
         "tasks": sorted(suite.get("tasks", {}))}
  if label + "+lr" in agg:
    out["aggregates_lr_tuned"] = agg[label + "+lr"]
  if label + "+lr+wd" in agg:
    out["aggregates_lr_wd_tuned"] = agg[label + "+lr+wd"]
  return out


def lineage(config: dict, outer_steps: int, train_time_s: float) -> dict:
  """For a run that started from a shipped theta (``lopt.init_from = pretrained:NAME``):
  that parent and the totals over the chain (outer steps and wall time, the parent's
  own totals included); empty for a run from a fresh init."""
  init_from = config.get("lopt", {}).get("init_from", "")
  if not init_from.startswith("pretrained:"):
    return {}
  name = init_from[len("pretrained:"):]
  parent = ckpt_lib.load_parameter_checkpoint(
      os.path.join(specs.PRETRAINED_DIR, name + ".lopt")).extra
  return {"init_from": init_from,
          "outer_steps_total": outer_steps + int(parent.get("outer_steps_total",
                                                            parent["outer_steps"])),
          "train_time_s_total": train_time_s + float(parent.get("train_time_s_total",
                                                                parent["train_time_s"]))}


def add_suite(name: str, suite_path: str, key: str, label: str, out: str):
  """Attach a later evaluation's aggregates to an already shipped ``<out>/<name>.lopt``
  as ``extra[key]`` (theta and the rest of the metadata unchanged)."""
  path = os.path.join(out, name + ".lopt")
  ckpt = ckpt_lib.load_parameter_checkpoint(path)
  extra = dict(ckpt.extra)
  extra[key] = suite_aggregates(_read_json(suite_path), label or name)
  digest = ckpt_lib.save_parameter_checkpoint(path, ckpt.lopt, ckpt.theta, extra=extra)
  print(f"added {key} to {path} (sha256 {digest[:12]}...)")


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--workdir", default="")
  ap.add_argument("--name", required=True)
  ap.add_argument("--reproduce", default="", help="the config file that reproduces it")
  ap.add_argument("--suite", default="", help="suite.json of an evaluation")
  ap.add_argument("--suite_label", default="", help="the shipped optimizer's label there")
  ap.add_argument("--add_suite_as", default="",
                  help="only attach --suite's aggregates to the shipped NAME under this key")
  ap.add_argument("--out", default=specs.PRETRAINED_DIR)
  args = ap.parse_args()
  if args.add_suite_as:
    if not args.suite:
      ap.error("--add_suite_as needs --suite")
    add_suite(args.name, args.suite, args.add_suite_as, args.suite_label, args.out)
    return
  if not (args.workdir and args.reproduce):
    ap.error("--workdir and --reproduce are required to ship a run")
  ckpt = ckpt_lib.load_parameter_checkpoint(os.path.join(args.workdir, "theta.lopt"))
  summary = _read_json(os.path.join(args.workdir, "summary.json"))
  with open(os.path.join(args.workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f if line.strip()]
  extra = {
      "name": args.name,
      "reproduce": f"python -m spmd_lopt.launch --config {args.reproduce}",
      "config": _read_json(os.path.join(args.workdir, "config.json")),
      "outer_steps": int(summary["outer_steps"]),
      # wall seconds from the launch to the last logged step (compile included)
      "train_time_s": float(records[-1]["time"]),
      "machine": (f"{platform.machine()}, {os.cpu_count()} CPUs, {summary['devices']} "
                  f"{summary['device_kind']} device(s)"),
      "meta_loss": {"start": summary["meta_loss_start"], "end": summary["meta_loss_end"],
                    "per_task": summary["per_family"]},
  }
  extra.update(lineage(extra["config"], extra["outer_steps"], extra["train_time_s"]))
  if args.suite:
    extra["suite"] = suite_aggregates(_read_json(args.suite), args.suite_label or args.name)
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, args.name + ".lopt")
  digest = ckpt_lib.save_parameter_checkpoint(path, ckpt.lopt, ckpt.theta, extra=extra)
  print(f"wrote {path} (sha256 {digest[:12]}...)")


if __name__ == "__main__":
  main()
