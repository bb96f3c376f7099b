"""Suite reports: the markdown table, per-task curve plots and the summary plot."""

from __future__ import annotations

import os
import re

import numpy as np


def _fmt(x, digits=3) -> str:
  return "n/a" if x is None or not np.isfinite(x) else f"{x:.{digits}g}"


def _agg(a: dict) -> str:
  return f"{_fmt(a['iqm'])} [{_fmt(a['ci_low'])}, {_fmt(a['ci_high'])}]"


def markdown_table(result: dict) -> str:
  """Aggregates (IQM [95% CI]) per optimizer and horizon, then the per-task medians."""
  aggs = result["aggregates"]
  horizons = list(next(iter(aggs.values()))) if aggs else []
  lines = [f"Suite `{result['suite']}`: {len(result['tasks'])} task entries, "
           f"{result['seeds']} seeds. Loss ratio = final test loss / tuned Adam's "
           "(< 1 is better); speedup = tuned Adam's steps to its final loss / the "
           "optimizer's (> 1 is better). IQM over tasks x seeds [95% stratified bootstrap "
           "interval].", "",
           "| optimizer | horizon | loss ratio IQM | speedup IQM | reached Adam's loss |",
           "|---|---|---|---|---|"]
  for label, per in aggs.items():
    for h in horizons:
      a = per[h]
      lines.append(f"| {label} | {h} | {_agg(a['loss_ratio'])} | {_agg(a['speedup'])} | "
                   f"{100 * a['reached_fraction']:.0f}% |")
  labels = list(aggs)
  lines += ["", "Per task: median over seeds of loss ratio / speedup (a `+lr` row: with "
            "its chosen step multiplier); tuned Adam's final test loss and learning rate "
            "(† = at the edge of its grid).", "",
            "| task | tuned Adam (lr) | " + " | ".join(labels) + " |",
            "|---|---|" + "---|" * len(labels)]
  for tl, t in result["tasks"].items():
    adam = t["baselines"]["Adam"]
    best = adam["runs"][adam["best"]]
    cells = []
    for l in labels:
      m = t["metrics"][l]
      chosen = t["optimizers"].get(l, {}).get("best")  # a tuned learned row's multiplier
      if chosen and chosen in (list(t["optimizers"][l]["runs"])[0],
                               list(t["optimizers"][l]["runs"])[-1]):
        chosen += " †"
      cells.append(f"{_fmt(np.median(np.asarray(m['loss_ratio'], float)))} / "
                   f"{_fmt(np.median(np.asarray(m['speedup'], float)))}"
                   + (f" ({chosen})" if chosen else ""))
    keys = list(adam["runs"])
    edge = " †" if adam["best"] in (keys[0], keys[-1]) else ""
    lines.append(f"| {tl} | {_fmt(best['final_test_mean'], 4)} ({adam['best']}{edge}) | "
                 + " | ".join(cells) + " |")
  return "\n".join(lines)


def _plt():
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


def _arr(rows):
  return np.asarray([[np.nan if x is None else x for x in r] for r in rows], np.float64)


def safe_name(label: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", label)


def plot_task(result: dict, task_label: str, path: str) -> None:
  """Test loss vs step: each learned optimizer and each tuned baseline, mean over seeds
  with a min-max band (log scale)."""
  plt = _plt()
  t = result["tasks"][task_label]
  x = np.asarray(t["eval_step"])
  fig, ax = plt.subplots(figsize=(5.5, 3.8))
  curves = {l: r for l, r in t["optimizers"].items()}
  for n, b in t["baselines"].items():
    curves[f"{n} ({b['best']})"] = b["runs"][b["best"]]
  vals = []
  for i, (l, r) in enumerate(curves.items()):
    y = _arr(r["test_loss"])
    ls = "-" if l in t["optimizers"] else "--"
    ax.plot(x, np.nanmean(y, 0), ls, color=f"C{i % 10}", lw=1.5, label=l)
    ax.fill_between(x, np.nanmin(y, 0), np.nanmax(y, 0), color=f"C{i % 10}", alpha=0.15,
                    lw=0)
    vals.append(y[np.isfinite(y) & (y > 0)])
  v = np.concatenate(vals) if vals else np.array([])
  if v.size:
    ax.set_yscale("log")
    ax.set_ylim(v.min() * 0.8, v.max() * 1.25)
  ax.set_xlabel("inner step")
  ax.set_ylabel("test loss")
  ax.set_title(f"{task_label} ({t['kind']}), {result['seeds']} seeds", fontsize=9)
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


def plot_summary(result: dict, path: str) -> None:
  """Two panels: loss-ratio IQM and speedup IQM per optimizer and horizon, with the 95%
  intervals as error bars; the dashed line at 1 is tuned Adam."""
  plt = _plt()
  from matplotlib import ticker  # pylint: disable=import-outside-toplevel
  aggs = result["aggregates"]
  labels = list(aggs)
  horizons = list(next(iter(aggs.values()))) if aggs else []
  fig, axes = plt.subplots(1, 2, figsize=(10, 0.5 + 0.45 * max(1, len(labels)) *
                                          max(1, len(horizons))))
  for ax, m, title in ((axes[0], "loss_ratio", "final test loss / tuned Adam (lower is "
                        "better)"), (axes[1], "speedup", "speedup over tuned Adam (higher "
                                     "is better)")):
    y = 0
    ticks, names = [], []
    for hi, h in enumerate(horizons):
      for i, l in enumerate(labels):
        a = aggs[l][h][m]
        c, lo, hi_ = a["iqm"], a["ci_low"], a["ci_high"]
        if all(v is not None and np.isfinite(v) for v in (c, lo, hi_)):
          ax.errorbar([c], [y], xerr=[[c - lo], [hi_ - c]], fmt="o", color=f"C{i % 10}",
                      capsize=3)
        ticks.append(y)
        names.append(f"{l} {h}")
        y += 1
      y += 0.5
    ax.axvline(1.0, color="k", ls="--", lw=0.8)
    ax.set_yticks(ticks)
    ax.set_yticklabels(names, fontsize=7)
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())  # minor labels overlap
    ax.invert_yaxis()
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which="both", axis="x")
  fig.suptitle(f"suite {result['suite']}: IQM over tasks x seeds, 95% bootstrap "
               "intervals", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


def write_all(result: dict, out_dir: str) -> list[str]:
  """``suite.md``, ``curves/<task>.png`` and ``summary.png`` under ``out_dir``."""
  os.makedirs(os.path.join(out_dir, "curves"), exist_ok=True)
  files = [os.path.join(out_dir, "suite.md"), os.path.join(out_dir, "summary.png")]
  with open(files[0], "w") as f:
    f.write(markdown_table(result) + "\n")
  plot_summary(result, files[1])
  for tl in result["tasks"]:
    p = os.path.join(out_dir, "curves", safe_name(tl) + ".png")
    plot_task(result, tl, p)
    files.append(p)
  return files
