#!/usr/bin/env bash
# Multi-host without a cluster: N processes on this machine, joined through jax.distributed on
# 127.0.0.1 with gloo collectives, each with DEVICES_PER_PROCESS CPU devices (default 1).
#
#   launch/local_multiprocess.sh 2 train --config=configs/digits.py --workdir=workdirs/digits-2proc
#
# Every process runs the same command; process 0 writes the logs and metrics, all of them write
# their shards of each checkpoint into the shared workdir. PORT picks the coordinator's port.
# SIGTERM to any process stops all of them at the same step, after a checkpoint, with exit code
# 75; RESTARTS=N runs the command again (resuming) up to N times after such a stop.
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 NUM_PROCESSES COMMAND [FLAGS...]" >&2
  exit 2
fi
num=$1
shift
per_process=${DEVICES_PER_PROCESS:-1}
restarts=${RESTARTS:-0}
while true; do
  port=${PORT:-$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
  pids=()
  for ((i = 0; i < num; i++)); do
    JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=${per_process} ${XLA_FLAGS:-}" \
      python -m monoformer_jax "$@" --coordinator_address="127.0.0.1:${port}" \
      --num_processes="${num}" --process_id="${i}" &
    pids+=($!)
  done
  status=0
  for pid in "${pids[@]}"; do
    wait "${pid}" || status=$?
  done
  # 75: preempted after saving a checkpoint; the same command resumes from it.
  if [[ ${status} -ne 75 || ${restarts} -le 0 ]]; then
    exit "${status}"
  fi
  restarts=$((restarts - 1))
  echo "preempted; restarting (${restarts} restarts left)" >&2
done
