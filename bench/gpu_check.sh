#!/usr/bin/env bash
# One prepared device check for a lent GPU machine (torch + timm installed; no Ray, no MLflow, no internet):
# the GPU path of the training core (CaiT-S24 -> DeiT-Tiny KD step vs the bare loop, eager then compiled)
# and of the diagnostics math (1,000 images x 24 layers of 196x384). About 6-8 minutes on an H100/H200.
#
#   bash bench/gpu_check.sh            # results in ${OUT:-bench/results}
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/results}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, torch.cuda.get_device_name())" \
    | tee -a "$out/gpu.txt"
status=0
timeout 330 python3 bench/bench_train_step.py --device cuda --compile both --steps 30 --repeats 3 \
    --json "$out/train_step_cuda.json" 2>&1 | tee "$out/train_step_cuda.log" || status=1
timeout 200 python3 bench/bench_spectra.py --full --device cuda --repeats 1 \
    --methods encmm-svd_rank,svdvals-gesvda-f32,svdvals-gesvda-f64 \
    --json "$out/spectra_cuda.json" 2>&1 | tee "$out/spectra_cuda.log" || status=1
exit $status
