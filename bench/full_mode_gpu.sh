#!/usr/bin/env bash
# Full-mode training (backbone fine-tuned, mixed precision, DataLoader workers) on one GPU,
# on a bigger generated set: SpCL + AAS answers, then SpCL alone under the same schedule.
# Writes OUT/gpu.txt, OUT/<sampler>.log and OUT/<sampler>-reports.json (reports.json of
# `python -m reidal.training`: every epoch, train_images_per_s, final retrieval metrics).
#
#   bench/full_mode_gpu.sh OUT                      # 400 individuals, 5 cycles x 5 epochs
#   IDS=40 EPOCHS=2 PER_CYCLE=1 ITERS=3 DEVICE=cpu bench/full_mode_gpu.sh /tmp/x   # dry run
#
# The schedule is SpCL's learning rate (3.5e-4, Adam) at 100 iterations an epoch with the
# benchmark's small-collection DBSCAN (k1 10, k2 3, min_samples 2); budget 0.5 % of all
# pairs a cycle. Results of a run are in docs/benchmarks.md.
set -euo pipefail
out=${1:?usage: bench/full_mode_gpu.sh OUT}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
fi
"$py" -c "import torch, numpy; print('torch', torch.__version__, 'numpy', numpy.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$out/gpu.txt"
common=(--dataset "synthetic:${IDS:-400}" --mode full --device "${DEVICE:-cuda}"
        --image-size "${SIZE:-128}" --epochs "${EPOCHS:-25}"
        --epochs-per-cycle "${PER_CYCLE:-5}" --iters-per-epoch "${ITERS:-100}"
        --lr "${LR:-3.5e-4}" --step-size 20 --k1 10 --k2 3 --min-samples 2
        --num-workers "${WORKERS:-12}" --budget 0.005 --evaluate --seed 0)
for sampler in ${SAMPLERS:-aas none}; do
  run="$(mktemp -d)"
  timeout "${RUN_TIMEOUT:-300}" "$py" -m reidal.training "${common[@]}" --sampler "$sampler" \
    --out "$run" 2>&1 | tee "$out/$sampler.log"
  cp "$run/reports.json" "$out/$sampler-reports.json"
done
