#!/usr/bin/env bash
# Run one monoformer_jax command on every worker of a Cloud TPU VM pod slice.
#
#   launch/tpu_pod.sh TPU_NAME ZONE [PROJECT] -- train --config=configs/FILE.py --workdir=gs://BUCKET/run
#
# The first use sets up each worker (this repository is copied to ~/monoformer-jax, then
# `pip install -r requirements.txt` and jax[tpu]); later uses only run the command. JAX finds
# the other workers by itself (--multihost), process 0 writes logs and metrics, and every worker
# writes its shards of each checkpoint, so the workdir must be shared: a gs:// bucket.
# SETUP=0 skips the set-up step.
set -euo pipefail
if [[ $# -lt 4 ]]; then
  echo "usage: $0 TPU_NAME ZONE [PROJECT] -- COMMAND [FLAGS...]" >&2
  exit 2
fi
tpu=$1
zone=$2
shift 2
project_flag=()
if [[ $1 != "--" ]]; then
  project_flag=(--project "$1")
  shift
fi
[[ $1 == "--" ]] && shift
repo=$(cd "$(dirname "$0")/.." && pwd)
ssh_all() {
  gcloud compute tpus tpu-vm ssh "${tpu}" --zone "${zone}" "${project_flag[@]}" --worker=all \
    --command "$1"
}
if [[ ${SETUP:-1} == 1 ]]; then
  gcloud compute tpus tpu-vm scp --recurse "${repo}" "${tpu}:~/monoformer-jax" --zone "${zone}" \
    "${project_flag[@]}" --worker=all
  ssh_all "cd ~/monoformer-jax && pip install -q -r requirements.txt 'jax[tpu]'"
fi
args=$(printf ' %q' "$@")
# 75: every worker stopped at a preemption notice (TPU maintenance sends SIGTERM) after saving a
# checkpoint; running the same command again resumes from it.
until ssh_all "cd ~/monoformer-jax && python -m monoformer_jax${args} --multihost"; do
  status=$?
  [[ ${status} -eq 75 ]] || exit "${status}"
  echo "preempted; restarting" >&2
done
