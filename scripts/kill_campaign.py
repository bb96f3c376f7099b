"""Kill campaign: SIGKILL meta-training runs at random moments, resume them, and check
that nothing is lost but the steps since the last checkpoint.

For each of ``--runs`` runs (a tiny quadratic config, ``log_every=1`` so the last step
reached is on disk): start the launcher in a fresh workdir, SIGKILL it (with
``--processes 2``: one randomly chosen process; the survivor is given a few seconds to
die of the broken collective and is then killed too, as a cluster manager would), launch
the same command again until it finishes, and compare with one uninterrupted run:

- the final theta must be bit-identical;
- steps lost (last step logged before the kill minus the step resumed from) must be at
  most ``--checkpoint_every``.

Half of the kills pick one of the run's checkpoint steps at random, wait for its write to
be in flight (an orbax ``<step>.orbax-checkpoint-tmp*`` directory exists) and kill inside
it; the others land at a uniformly random moment of the uninterrupted run's wall time
(start-up included). The last step reached is read once every process of the killed
launch has exited (a survivor could still record a step).

Usage:
  python scripts/kill_campaign.py --runs 20 --processes 1 --out kill_1proc.json
  python scripts/kill_campaign.py --runs 20 --processes 2 --out kill_2proc.json

Exit status 0 when every run passed; the report (JSON) lists every run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = dict(tasks="quadratic", num_tasks=8, trunc_length=5, min_length=10, max_length=20,
            random_initial_iteration_offset=20, quadratic_dim=4, lopt_hidden_size=8,
            log_every=1, checkpoint_every_secs=0.0, keep_checkpoints=2, std=0.1)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(workdir: str, args, processes: int) -> list[subprocess.Popen]:
  """The launcher on ``processes`` processes x 2 CPU devices, writing into ``workdir``."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu",
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env.pop("JAX_COMPILATION_CACHE_DIR", None)  # none inherited: only the one chosen here
  if args.compilation_cache:  # every launch after the first skips compilation
    env.update(JAX_COMPILATION_CACHE_DIR=args.compilation_cache,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  flags = [f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in
                                      dict(TINY, outer_steps=args.outer_steps,
                                           checkpoint_every=args.checkpoint_every).items()]
  if processes == 1:
    cmds = [flags]
  else:
    port = _free_port()
    cmds = [flags + [f"--coordinator_address=127.0.0.1:{port}",
                     f"--num_processes={processes}", f"--process_id={i}",
                     "--init_timeout_s=120"] for i in range(processes)]
  os.makedirs(workdir, exist_ok=True)
  procs = []
  for i, cmd in enumerate(cmds):
    log = open(os.path.join(workdir, f"launch_{len(os.listdir(workdir))}_{i}.log"), "w")
    procs.append(subprocess.Popen([sys.executable, "-m", "spmd_lopt.launch", *cmd],
                                  cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
  return procs


def _wait(procs, timeout: float) -> list[int]:
  deadline = time.time() + timeout
  for p in procs:
    try:
      p.wait(timeout=max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
      p.kill()
      p.wait()
  return [p.returncode for p in procs]


def _theta(workdir: str):
  from spmd_lopt.learned_optimizers import checkpoint  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  return jax.tree.leaves(checkpoint.load_parameter_checkpoint(
      os.path.join(workdir, "theta.lopt")).theta)


def _last_logged_step(workdir: str) -> int:
  path = os.path.join(workdir, "metrics.jsonl")
  step = 0
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        try:
          step = max(step, int(json.loads(line)["step"]))
        except (ValueError, KeyError):
          pass  # a torn last line
  return step


def _writes_in_flight(workdir: str) -> list[int]:
  """Steps whose checkpoint is being written (an orbax tmp directory exists)."""
  ckdir = os.path.join(workdir, "checkpoints")
  try:
    names = os.listdir(ckdir)
  except FileNotFoundError:
    return []
  return sorted(int(d.split(".")[0]) for d in names
                if "orbax-checkpoint-tmp" in d and d.split(".")[0].isdigit())


def _checkpoint_steps(args) -> list[int]:
  """The steps a run checkpoints at: every ``checkpoint_every`` and the last."""
  return sorted(set(range(args.checkpoint_every, args.outer_steps + 1,
                          args.checkpoint_every)) | {args.outer_steps})


def _one_run(i: int, args, rng: random.Random, base_wall: float, root: str) -> dict:
  workdir = os.path.join(root, f"run_{i:03d}")
  procs = _start(workdir, args, args.processes)
  aim_at_write = i % 2 == 1
  target = rng.choice(_checkpoint_steps(args)) if aim_at_write else None
  t0, deadline = time.time(), time.time() + rng.uniform(0.0, base_wall)
  if aim_at_write:  # kill as soon as the target step's write is seen in flight
    deadline = time.time() + 4 * base_wall
    while time.time() < deadline and target not in _writes_in_flight(workdir) and \
        all(p.poll() is None for p in procs):
      time.sleep(0.002)
  else:
    while time.time() < deadline and all(p.poll() is None for p in procs):
      time.sleep(0.01)
  victim = rng.randrange(len(procs))
  finished_first = procs[victim].poll() is not None
  writing = _writes_in_flight(workdir)
  if not finished_first:
    procs[victim].send_signal(signal.SIGKILL)
  killed_at = time.time() - t0
  survivors_exited = None
  if len(procs) > 1:  # the others: broken collective, or killed after a grace period
    rcs = _wait([p for j, p in enumerate(procs) if j != victim], args.grace_s)
    survivors_exited = all(rc is not None and rc != -signal.SIGKILL for rc in rcs)
  _wait(procs, 30)
  reached = _last_logged_step(workdir)
  # summary.json is the launcher's last write: with it the run had completed (checked
  # after every process exited: a survivor may finish the run after the victim died).
  completed = os.path.exists(os.path.join(workdir, "summary.json"))
  rcs = _wait(_start(workdir, args, args.processes), args.timeout_s)
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  resumed = reached if completed else (summary.get("resumed_from_step") or 0)
  identical = all(np.array_equal(a, b) and a.dtype == b.dtype
                  for a, b in zip(_theta(workdir), args.base_theta))
  rec = dict(run=i, aimed_at_checkpoint_write=target, killed_process=victim,
             killed_after_s=round(killed_at, 3), finished_before_kill=finished_first,
             completed_before_kill=completed,
             inside_checkpoint_write=bool(writing), checkpoint_writes_in_flight=writing,
             last_logged_step=reached,
             resumed_from_step=resumed, steps_lost=max(0, reached - resumed),
             resume_rcs=rcs, survivors_exited_by_themselves=survivors_exited,
             theta_bit_identical=identical)
  rec["ok"] = (identical and all(rc == 0 for rc in rcs)
               and rec["steps_lost"] <= args.checkpoint_every)
  if rec["ok"] and not args.keep:
    shutil.rmtree(workdir, ignore_errors=True)
  return rec


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--runs", type=int, default=20)
  parser.add_argument("--processes", type=int, default=1, choices=(1, 2))
  parser.add_argument("--outer_steps", type=int, default=30)
  parser.add_argument("--checkpoint_every", type=int, default=3)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--grace_s", type=float, default=5.0,
                      help="seconds the other processes get to exit after one is killed")
  parser.add_argument("--timeout_s", type=float, default=600.0)
  parser.add_argument("--workdir", default=None, help="default: a temporary directory")
  parser.add_argument("--keep", action="store_true", help="keep the runs' workdirs")
  parser.add_argument("--out", default=None, help="write the JSON report here")
  parser.add_argument("--no_compilation_cache", action="store_true",
                      help="compile in every launch (default with --processes 1: a "
                      "persistent cache shared by the campaign's launches; never used "
                      "with more processes)")
  args = parser.parse_args(argv)
  if args.runs < 1 or args.outer_steps < 1 or args.checkpoint_every < 1:
    parser.error("--runs, --outer_steps and --checkpoint_every must be positive")
  root = args.workdir or tempfile.mkdtemp(prefix="kill_campaign_")
  rng = random.Random(args.seed)
  # JAX writes persistent-cache entries only from process 0, and process 1's cache keys
  # differ (measured: every program misses there), so with a cache process 0 loads while
  # process 1 compiles; on a loaded machine the gap exceeds gloo's fixed 30 s connect
  # timeout and the launch fails. Multi-process launches therefore compile every time.
  args.compilation_cache = (None if args.no_compilation_cache or args.processes > 1 else
                            os.path.join(root, "compilation_cache"))

  base = os.path.join(root, "uninterrupted")
  warmup_failures = 0
  if args.compilation_cache:
    # Fill the cache first: the timed uninterrupted run then sets the time scale of the
    # kills, as every later launch runs that fast. On a loaded machine the processes of a
    # cold 2-process launch can reach a collective > 30 s apart (one still compiling),
    # which gloo's fixed connect timeout turns into a failed launch; each try caches the
    # programs compiled so far, so a retry gets further.
    for _ in range(3):
      shutil.rmtree(base, ignore_errors=True)
      if not any(_wait(_start(base, args, args.processes), args.timeout_s)):
        break
      warmup_failures += 1
  shutil.rmtree(base, ignore_errors=True)
  t = time.time()
  rcs = _wait(_start(base, args, args.processes), args.timeout_s)
  base_wall = time.time() - t
  if any(rcs):
    print(f"kill_campaign: the uninterrupted run failed ({rcs}); see {base}",
          file=sys.stderr)
    return 1
  args.base_theta = _theta(base)

  runs, t_campaign = [], time.time()
  for i in range(args.runs):
    rec = _one_run(i, args, rng, base_wall, root)
    runs.append(rec)
    print(json.dumps(rec), flush=True)
  killed = [r for r in runs if not r["completed_before_kill"]]
  report = dict(
      processes=args.processes, outer_steps=args.outer_steps,
      cache_warmup_failures=warmup_failures,
      checkpoint_every=args.checkpoint_every, uninterrupted_wall_s=round(base_wall, 2),
      runs=len(runs), killed=len(killed),
      killed_inside_checkpoint_write=sum(r["inside_checkpoint_write"] for r in killed),
      checkpoint_writes_killed=sorted(s for r in killed
                                      for s in r["checkpoint_writes_in_flight"]),
      killed_before_first_checkpoint=sum(r["resumed_from_step"] == 0 for r in killed),
      theta_bit_identical=sum(r["theta_bit_identical"] for r in runs),
      max_steps_lost=max((r["steps_lost"] for r in runs), default=0),
      mean_steps_lost=float(np.mean([r["steps_lost"] for r in runs])),
      mean_steps_lost_per_kill=(float(np.mean([r["steps_lost"] for r in killed]))
                                if killed else 0.0),
      failed=[r["run"] for r in runs if not r["ok"]],
      campaign_wall_s=round(time.time() - t_campaign, 1), details=runs)
  summary = {k: v for k, v in report.items() if k != "details"}
  print(json.dumps(summary, indent=1))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(report, f, indent=1, allow_nan=False)
  if not args.workdir and not report["failed"] and not args.keep:
    shutil.rmtree(root, ignore_errors=True)
  return 1 if report["failed"] else 0


if __name__ == "__main__":
  sys.exit(main())
