#!/usr/bin/env bash
# What a lent GPU session runs (the device tool's image: python3 with jax 0.11.2, flax,
# optax, orbax). Wheels for the packages the image lacks travel in .whl/ (git-ignored), fetched
# beforehand on a machine with pip access:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     -d .whl gin-config==0.5.0 grain==0.2.18 array_record==0.8.6 tensorboardX==2.6.5 portpicker
#   (and tokamax with its pure-Python dependencies for the attention step: `pip download tokamax`)
# Logs go to $OUT (or ./gpu_logs). Usage: bash bench/gpu_session.sh STEP...
#   env      versions and the GPU
#   tests    the fp8 kernel tests compiled for the GPU (-m gpu)
#   bench    bench/fp8_matmul.py at DeepSeek's shapes
#   sweep    both Mosaic kernels' tuning sweep at 4096x7168x16384
#   train N  bench/fp8_training.py, small preset, N steps
#   attention  bench/attention_tflops.py: tokamax / cuDNN / blockwise TFLOP/s at V3's head dims (ATTN_ARGS)
#   decode   bench/decode.py without HF (tokens/s, MTP speedup) and bench/decode_profile.py's op table
set -u
OUT=${OUT:-gpu_logs}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
while [ $# -gt 0 ]; do
  step=$1; shift
  echo "=== $step $(date -u +%FT%TZ)"
  case $step in
    env)
      nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.total --format=csv
      python3 -c "import jax, flax, optax, orbax.checkpoint; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
      python3 -c "import gin, grain, tensorboardX, tokenizers, safetensors; print('train deps ok')" ;;
    tests)
      JAX_PLATFORMS=cuda XLA_FLAGS= timeout 150 python3 -m pytest -q -p no:cacheprovider \
        -m gpu tests/test_fp8_kernels.py 2>&1 | tee "$OUT/tests.log" | tail -40 ;;
    bench)
      timeout 240 python3 bench/fp8_matmul.py ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" ;;
    sweep)
      timeout 120 python3 bench/fp8_matmul.py --sweep 2>&1 | tee "$OUT/sweep.log" ;;
    train)
      n=$1; shift
      timeout 480 python3 bench/fp8_training.py --preset small --steps "$n" --batch 16 --seq 256 --fp8-kernels "${FP8_KERNELS:-auto}" --bf16-runs "${BF16_RUNS:-1}" \
        --plot "$OUT/fp8_training_small.png" 2>&1 | tee "$OUT/train.log" | grep -v "^I0000" | tail -30 ;;
    attention)
      timeout 300 python3 bench/attention_tflops.py ${ATTN_ARGS:---impls tokamax cudnn blockwise --seq 4096 8192 --heads 128} \
        2>&1 | tee "$OUT/attention.log" ;;
    decode)
      timeout 300 python3 bench/decode.py --no_hf --moe_impl "${MOE_IMPL:-ragged}" 2>&1 | tee "$OUT/decode.log"
      for d in 0 1; do
        timeout 120 python3 bench/decode_profile.py --draft $d --top 12 2>&1 | tee -a "$OUT/decode_profile.log"
      done ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
done
