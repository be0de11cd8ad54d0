#!/bin/bash
# Every GPU figure of the README's Benchmarks section in one short run (about 5 minutes on one
# H100/H200), each benchmark under its own time limit so one failure costs only its slot.
#
#   bash benchmarks/gpu_session.sh            # logs to $OUT (or /tmp/gemma_jax_gpu)
#   bash benchmarks/gpu_session.sh flash      # only the flash_gpu attention figures (~9 minutes)
#
# Packages the image lacks (ml_collections, grain, ...) can come as wheels in .whl/ (see
# the README's Benchmarks section); they are installed to /tmp/site first.
set -u
OUT=${OUT:-/tmp/gemma_jax_gpu}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
# JAX and torch share the card in the side-by-side runs: no up-front 75% grab by JAX.
export XLA_PYTHON_CLIENT_PREALLOCATE=false

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import jax, flax, optax, orbax.checkpoint, torch, transformers as t; \
print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'optax', optax.__version__, \
'torch', torch.__version__, 'transformers', t.__version__)"
} 2>&1 | tee "$OUT/env.txt"

run() {  # run NAME SECONDS COMMAND...: full log in $OUT/NAME.log, its end on stdout
  local name=$1 limit=$2
  shift 2
  echo "== $name ($*)"
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  grep -v -e "Writing model shards" -e "^\s*$" "$OUT/$name.log" | tail -n 12
  echo "-- $name: rc $rc, $((SECONDS - t0)) s"
}

if [ "${1:-all}" = flash ]; then
  # Issue 19: the Triton kernel compiled and checked against xla at the 2b head shape, one
  # layer's attention timed at two tile settings; then the full 2b recipe at 2,048 and 8,192
  # tokens (8,192 tokens a step either way), xla against flash_gpu over 20 steps (step time,
  # MFU, peak memory, the loss curves); then the 4-layer 2b width against transformers.
  run flash_check 100 python3 benchmarks/flash_check.py --blocks default,64:64:32:32
  run flash_2b_2048 170 python3 benchmarks/throughput.py --sizes 2b --batch-per-device 4 --seq 2048 --steps 20 \
    --attention xla,flash_gpu
  run flash_2b_8192 190 python3 benchmarks/throughput.py --sizes 2b --batch-per-device 1 --seq 8192 --steps 20 \
    --attention xla,flash_gpu
  run flash_train_2b_4l 100 python3 benchmarks/train_step.py --preset gemma2_2b --layers 4 --batch 4 --seq 2048 \
    --dtype bfloat16 --steps 5
  exit 0
fi

# Issue 3 on a GPU: the benchmark shape, each side's mixed precision.
run train_bench 100 python3 benchmarks/train_step.py --dtype bfloat16 --steps 10
# Issue 4 on a GPU: decode batch 1 and 8, full float32, token identity checked.
run decode_bench 100 python3 benchmarks/decode.py --repeats 2
# Issue 7: MFU of the full 2b recipe (9b/27b need more than one card's 141 GB: skipped).
run throughput_2b 130 python3 benchmarks/throughput.py --sizes 2b --batch-per-device 4 --steps 5
# A real width: gemma2_2b cut to 4 layers, full 256k vocabulary, both sides bf16 mixed.
run train_2b_4l 100 python3 benchmarks/train_step.py --preset gemma2_2b --layers 4 --batch 4 --seq 2048 \
  --dtype bfloat16 --steps 5
# The Quickstart job end to end on the GPU (data, trainer, checkpoints, eval, export).
run quickstart 75 python3 -m gemma_jax.train --config=configs/legal.py:tiny --workdir=/tmp/wd \
  --config.train.steps=100
