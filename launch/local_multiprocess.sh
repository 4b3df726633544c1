#!/usr/bin/env bash
# Multi-host without a cluster: N processes on this machine, joined through jax.distributed on
# 127.0.0.1 with gloo collectives, each with DEVICES_PER_PROCESS CPU devices (default 1).
#
#   launch/local_multiprocess.sh 2 train --config=configs/digits.py --workdir=workdirs/digits-2proc
#
# Every process runs the same command; process 0 writes the logs and metrics, all of them write
# their shards of each checkpoint into the shared workdir. PORT picks the coordinator's port.
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 NUM_PROCESSES COMMAND [FLAGS...]" >&2
  exit 2
fi
num=$1
shift
port=${PORT:-$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
per_process=${DEVICES_PER_PROCESS:-1}
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
exit "${status}"
