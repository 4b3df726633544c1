#!/usr/bin/env bash
# The GPU figures of docs/performance.md in one go, on one NVIDIA GPU:
#   bash launch/gpu_check.sh OUT_DIR [SECONDS] [--no-digits]
# 1. bench at the TinyLlama-1.1B shape (configs/bench_1b.py): both train steps, the 250-step
#    guided sampler at batch 32, KV-cached decoding at batch 1 and 32 (falls back to XLA
#    attention if cuDNN's is refused);
# 2. unless --no-digits, the default main job (configs/digits.py) timed, with its evaluation;
# 3. while time is left, the steps again under other remat policies, batches, GEMM emitters
#    and layer loops.
# Each part has its own time limit inside SECONDS (default 420) and writes into OUT_DIR:
# env.txt, log.txt (everything printed), bench_1b.json, variants.jsonl, digits_eval.json,
# digits_metrics.jsonl. Wheels in .whl/ (packages the machine lacks: grain, ml-collections)
# are installed first; without TensorFlow the TensorBoard writer is skipped with a warning.
set -u
out=${1:?usage: launch/gpu_check.sh OUT_DIR [SECONDS]}
budget=${2:-420}
digits=${3:-}
mkdir -p "$out"
log="$out/log.txt"
deadline=$((SECONDS + budget))
export PYTHONUNBUFFERED=1
if compgen -G '.whl/*.whl' > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi

# part NAME SECONDS COMMAND...: runs COMMAND within min(SECONDS, time left), output to log.txt.
part() {
  local name=$1 limit=$2; shift 2
  local left=$((deadline - SECONDS - 5))
  ((left < limit)) && limit=$left
  if ((limit < 20)); then echo "== $name: skipped, ${left}s left" | tee -a "$log"; return 99; fi
  echo "== $name (limit ${limit}s): $*" | tee -a "$log"
  local start=$SECONDS
  timeout "$limit" "$@" < /dev/null >> "$log" 2>&1
  local rc=$?
  echo "== $name: rc=$rc in $((SECONDS - start))s" | tee -a "$log"
  return $rc
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 - <<'EOF'
import sys, jax, jaxlib, flax, optax, orbax.checkpoint as ocp
from jax._src.lib import cuda_versions
print('python', sys.version.split()[0], '| jax', jax.__version__, '| jaxlib', jaxlib.__version__,
      '| flax', flax.__version__, '| optax', optax.__version__, '| orbax', ocp.__version__)
print('cuDNN', cuda_versions.cudnn_get_version() if cuda_versions else None, '|', jax.devices())
EOF
} > "$out/env.txt" 2>&1
cat "$out/env.txt"

bench=(python3 -m monoformer_jax bench --config=configs/bench_1b.py)
if ! part bench_1b 240 "${bench[@]}" --bench_out="$out/bench_1b.json"; then
  part bench_1b_xla_attention 200 "${bench[@]}" --config.model.attention=xla \
    --bench_out="$out/bench_1b.json"
fi

rm -rf /tmp/digits
if [[ $digits != --no-digits ]] && part digits 200 python3 -m monoformer_jax train --config=configs/digits.py --workdir=/tmp/digits
then
  cp /tmp/digits/eval.json "$out/digits_eval.json"
  cp /tmp/digits/metrics.jsonl "$out/digits_metrics.jsonl"
fi

: > "$out/variants.jsonl"
while read -r name xla_flags overrides; do  # xla_flags '-': none
  [[ $xla_flags == - ]] && xla_flags=''
  # shellcheck disable=SC2086  # the overrides are separate flags
  part "$name" 120 env XLA_FLAGS="$xla_flags" "${bench[@]}" $overrides \
    --bench_out="/tmp/$name.json" || continue
  python3 -c "import json,sys; r=json.load(open(sys.argv[1])); r['variant']=sys.argv[2:]; \
print(json.dumps(r))" "/tmp/$name.json" "$name" "$xla_flags" $overrides >> "$out/variants.jsonl"
done <<'EOF'
remat_none - --config.model.remat=none --config.bench.parts=('diffusion','ar')
batch64 - --config.data.image_batch_size=64 --config.bench.parts=('diffusion',)
remat_full - --config.model.remat=full --config.bench.parts=('diffusion','ar')
loss_chunk_2048 - --config.train.loss_chunk=2048 --config.bench.parts=('ar',)
cublas_gemm --xla_gpu_enable_triton_gemm=false --config.bench.parts=('diffusion',)
unrolled - --config.model.layer_loop=unrolled --config.bench.parts=('diffusion',)
EOF
echo "== done in ${SECONDS}s" | tee -a "$log"
grep -E '^(machine|matmul|step |ar |diffusion |sampling|decoding|peak|== )' "$log"
