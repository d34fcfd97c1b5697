#!/usr/bin/env bash
# The prepared GPU check (docs/performance.md §5): one script, run on a lent GPU machine from the repo root.
#
# The machine has torch + CUDA but none of megatron-core / omegaconf / datasets / mistral-common: they travel
# as wheels in .whl/ (see docs/performance.md, "GPU check"), the packed benchmark datasets in .gpu/.
# Every stage has its own time limit and log, so one hang or failure does not cost the others.
#   bash bench/gpu_check.sh            (OUT=folder for the logs; default /tmp/gpu_check)
#   STAGES="gpu_tests suite" bash bench/gpu_check.sh    (only those stages; GPU_TESTS_K=expr picks GPU tests)
set -u
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1

stage() {  # stage NAME LIMIT_S CMD...: run CMD with a limit, log to $OUT/NAME.log, print its tail
    local name=$1 limit=$2 start rc
    shift 2
    [[ -z ${STAGES:-} || " $STAGES " == *" $name "* ]] || return 0
    start=$(date +%s)
    echo "== $name (limit ${limit}s)"
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    echo "== $name: rc=$rc in $(($(date +%s) - start)) s"
    grep -v -i -E "warn|deprecat|^\s*$" "$OUT/$name.log" | tail -n "${TAIL:-30}"
}

# the environment: the chip, torch, the carried wheels
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, sys; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
} >"$OUT/env.log" 2>&1 || { cat "$OUT/env.log"; exit 1; }
cat "$OUT/env.log"
export PYTHONPATH=/tmp/site:$PWD

# 1. the GPU tests (tests/test_gpu.py): GPU vs CPU reference log-probs, fp32 + bf16 learning, shared-prompt parity
stage gpu_tests 150 python3 -m pytest tests/test_gpu.py -m gpu -q -rA -p no:cacheprovider -n 4 \
    -k "${GPU_TESTS_K:-gpu}"

# 2. whole training steps with real Mixtral-8x7B / Mistral-7B layer shapes (cut to 1 / 2 layers), bf16,
#    padded vs packed vs shared-prompt, on AlpacaEval lists (K=4 of 8, responses cut at 1024 tokens; session 2 ran
#    these with megatron's dense local attention, where longer packed rows did not fit), made here with:
#    nemo-lpo pack --input $NEMO_LPO_DATA/alpacaeval2/*.jsonl --format listwise --tokenizer mistral \
#      --output-prefix .gpu/ae_k4 --max-length 1024 --overflow truncate_response --max-k 4
TAIL=6 stage train_mixtral 120 python3 bench/bench_train_step.py --prefix .gpu/ae_k4 --preset mixtral-8x7b \
    --num-layers 1 --global-batch 8 --micro-batch 1 --steps 6 --warmup 2
TAIL=6 stage train_mistral 90 python3 bench/bench_train_step.py --prefix .gpu/ae_k4 --preset mistral-7b \
    --num-layers 2 --global-batch 8 --micro-batch 1 --steps 6 --warmup 2

# 2b. K=8 lists of responses up to 2048 tokens (rows up to ~16k tokens), where megatron's dense local attention ran
#     out of memory for packed and shared rows; the local spec's GatheredDotProductAttention does not build S² scores.
#     .gpu/ae_k8: the same pack command with --max-length 2048 and no --max-k.
TAIL=6 stage train_k8 150 python3 bench/bench_train_step.py --prefix .gpu/ae_k8 --preset mistral-7b \
    --num-layers 2 --global-batch 8 --micro-batch 1 --steps 6 --warmup 2
# 2c. gathered vs dense core attention alone (time, peak memory, log-prob agreement)
TAIL=40 stage attention 120 python3 bench/bench_attention.py --reps 3

# 3. the loss module on the GPU (listwise vs pairwise cost)
TAIL=12 stage losses 30 python3 bench/bench_losses.py --device cuda

# 4. the single-process part of the CPU suite on this machine (tests/conftest.py hides the GPU from it)
TAIL=15 stage suite 150 python3 -m pytest -m "not distributed and not slurm and not gpu" -q -p no:cacheprovider \
    -n 8 -x --timeout 140
