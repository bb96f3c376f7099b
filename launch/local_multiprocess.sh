#!/usr/bin/env bash
# Run spmd_lopt on N local CPU processes (a multi-host run on one machine).
#
# Usage:
#   launch/local_multiprocess.sh N [DEVICES_PER_PROCESS] [-- launcher flags...]
# Example (4 processes x 2 CPU devices = an 8-device "tasks" mesh):
#   launch/local_multiprocess.sh 4 2 -- --config=configs/my.py --workdir=runs/mp \
#       --config.num_tasks=16
#
# What it does: picks a free TCP port on 127.0.0.1 for the coordinator (process 0 hosts
# it), starts N copies of `python -m spmd_lopt.launch` with --coordinator_address,
# --num_processes and --process_id, each seeing DEVICES_PER_PROCESS virtual CPU devices
# (cross-process collectives: gloo). Process 0 writes logs, metrics and plots; every
# process writes its shards of the checkpoints into the shared --workdir. Output of
# process i goes to <workdir>/process_i.log (--workdir=DIR or --workdir DIR; default
# runs/<config name> is not known here, so without --workdir: ./process_i.log); the
# script waits for all of them, exits non-zero if any failed, and on success prints
# process 0's summary. Ctrl-C / SIGTERM are forwarded: every process finishes
# its step, one checkpoint is written, and rerunning the same command resumes.
set -euo pipefail

N="${1:?usage: $0 N [DEVICES_PER_PROCESS] [-- launcher flags]}"; shift
DEVICES=2
if [[ $# -gt 0 && "$1" != "--" ]]; then DEVICES="$1"; shift; fi
if [[ $# -gt 0 && "$1" == "--" ]]; then shift; fi

PORT="$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
LOGDIR="."
args=("$@")
for ((j = 0; j < ${#args[@]}; j++)); do
  case "${args[$j]}" in
    --workdir=*) LOGDIR="${args[$j]#--workdir=}" ;;
    --workdir) if ((j + 1 < ${#args[@]})); then LOGDIR="${args[$((j + 1))]}"; fi ;;
  esac
done
mkdir -p "$LOGDIR"
REPO="$(cd "$(dirname "$0")/.." && pwd)"

pids=()
for ((i = 0; i < N; i++)); do
  XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES}" JAX_PLATFORMS=cpu \
  JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo PYTHONPATH="${REPO}:${PYTHONPATH:-}" \
    python -m spmd_lopt.launch --coordinator_address="127.0.0.1:${PORT}" \
      --num_processes="${N}" --process_id="${i}" "$@" >"${LOGDIR}/process_${i}.log" 2>&1 &
  pids+=($!)
done
# Forward Ctrl-C / SIGTERM to every process; they checkpoint together and exit.
trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' INT TERM

set +e
status=0
for i in "${!pids[@]}"; do
  while true; do
    wait "${pids[$i]}"; rc=$?
    # A trapped signal interrupts `wait` (rc > 128): wait again while it still runs.
    kill -0 "${pids[$i]}" 2>/dev/null || break
  done
  if [[ $rc -ne 0 ]]; then
    echo "process ${i} exited with ${rc}; see ${LOGDIR}/process_${i}.log" >&2; status=$rc
  fi
done
# Process 0's summary: from its first line to the end of the log (or its last words,
# e.g. "nothing to train", when it printed none).
if [[ $status -eq 0 ]]; then
  if grep -q '^Meta-trained ' "${LOGDIR}/process_0.log"; then
    sed -n '/^Meta-trained /,$p' "${LOGDIR}/process_0.log"
  else
    tail -n 3 "${LOGDIR}/process_0.log"
  fi
fi
exit $status
