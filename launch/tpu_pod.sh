#!/usr/bin/env bash
# Meta-train on a Cloud TPU pod slice (one process per TPU VM host).
#
# Usage:
#   TPU_NAME=my-v5e-32 ZONE=us-west4-a PROJECT=my-proj \
#   WORKDIR=gs://my-bucket/runs/pes-v5e launch/tpu_pod.sh [launcher flags...]
# e.g.
#   launch/tpu_pod.sh --config=configs/my.py --config.num_tasks=1024
#
# Before: the repository is checked out at ~/spmd_lopt on every worker and installed
# (`pip install -e ~/spmd_lopt 'jax[tpu]'`), e.g. with
#   gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=all \
#     --command="git clone ... ~/spmd_lopt && pip install -e ~/spmd_lopt 'jax[tpu]'"
#
# Notes:
# - --coordinator_address=auto: on TPU VMs jax.distributed.initialize() with no
#   arguments finds the coordinator, process count and index itself (from the TPU
#   metadata); spmd_lopt.multihost.initialize makes exactly that call. Alternatively pass
#   --coordinator_address=<worker 0 internal IP>:8476 --num_processes --process_id.
# - WORKDIR must be shared by all hosts (a gs:// bucket): every host writes its shards
#   of each checkpoint there; only process 0 writes logs/metrics/plots.
# - Every worker must get identical flags: a mismatched config is refused at start-up.
# - Preemption: SIGTERM makes every host finish its step, write one checkpoint and exit;
#   rerun this script with the same WORKDIR to resume.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${WORKDIR:?set WORKDIR (shared, e.g. gs://...)}"
PROJECT_FLAG=()
[[ -n "${PROJECT:-}" ]] && PROJECT_FLAG=(--project="${PROJECT}")

ARGS="$(printf '%q ' "$@")"
gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone="${ZONE}" "${PROJECT_FLAG[@]}" \
  --worker=all \
  --command="cd ~/spmd_lopt && python -m spmd_lopt.launch --coordinator_address=auto --workdir=${WORKDIR} ${ARGS}"
