#!/usr/bin/env bash
# On the lent GPU machine, from the repository root, with .whl/ (bench/gpu_bundle.sh) carried: installs the bundle
# beside the image's torch/transformers, then the GPU checks in one go, each log copied to $OUT:
#   1. the gpu-marked tests (but the Ray actor one) and the CUDA-aware unit tests (document mask on SDPA /
#      FlashAttention-2 kernels, features, tokenizer, model, gradient checkpointing on the image's transformers);
#   2. bench/linear_ce.py: the interleaved head (896 x 152,168) on 16,384 tokens (slam_interleaved's micro-batch at
#      8 x 2048), the model's own head + loss against the fused linear cross-entropy (train.loss_chunk_tokens);
#   3. bench/slam_gpu.py: the full-size `slam` model trained through `slam-ray train`'s stage (Ray Train, bf16,
#      document masks) at the recipe's 8 x 10, beside the bare step in the same run, and DPO in bf16; then the same
#      with compile (no DPO), last because the 600-s call may cut it. Other shapes: --batch 16x5, 32x3.
# Sized for ~9.5 of the 15 device minutes (a machine's start, ~1 min, is extra); each part prints its figures as it
# ends, so a part cut by its timeout loses only itself. Measured 2026-12-04 on an H200: install + tests + linear_ce
# ~130 s; 60 train steps took 126 s through the stage and the bare step ~60 s more, so DPO and compile ran out of
# time at 60 steps: hence 30.
#
#     run(command="bash bench/gpu_device.sh", carry=[".whl"], timeout_s=600)
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "gpu_device: installing .whl/ failed (run bench/gpu_bundle.sh here first)"; exit 1; }
tar -xJf .whl/ray-*-stripped.tar.xz -C /tmp/site || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, ray, mlflow; print('torch', torch.__version__, 'transformers', transformers.__version__, 'ray', ray.__version__, 'mlflow', mlflow.__version__)" | tee -a "$OUT/gpu.txt"

timeout 80 python3 -m pytest -q -p no:cacheprovider --tb=short -rf -m "not ray and not slow" -k "not lomo" \
  tests/stages/test_train.py tests/lm/test_model.py tests/speech/test_features.py tests/speech/test_tokenizer.py \
  2>&1 | tail -300 > "$OUT/gpu_tests.log"
tail -3 "$OUT/gpu_tests.log"
timeout 30 python3 -m pytest -q -p no:cacheprovider -m gpu tests/parallel/test_trainer.py 2>&1 | tail -3 \
  | tee -a "$OUT/gpu_tests.log"

timeout 120 python3 bench/linear_ce.py --device cuda --bf16 --tokens 16384 --chunks 2048,4096,8192 --repeats 3 2>&1 \
  | tee "$OUT/linear_ce.log" | tail -5

timeout 250 python3 bench/slam_gpu.py --steps 30 --dpo-steps 8 2>&1 | tee "$OUT/slam_gpu.log" | grep "^\[slam_gpu\]\|^{"
timeout 190 python3 bench/slam_gpu.py --steps 30 --dpo-steps 0 --compile 2>&1 | tee "$OUT/slam_gpu_compile.log" \
  | grep "^\[slam_gpu\]\|^{"
