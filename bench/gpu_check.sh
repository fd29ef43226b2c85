#!/usr/bin/env bash
# One prepared device check for a lent GPU machine (torch + timm installed; no Ray, no MLflow, no internet):
# the GPU path of the training core (CaiT-S24 -> DeiT-Tiny KD step vs the bare loop: eager, compiled, and
# compiled with the teacher's talking-heads attention folded, the experiment in bench/folded_attention.py)
# and of the diagnostics math (1,000 images x 24 layers of 196x384). About 4 minutes on an H100 (session 3)
# without the folded stage, which was added afterwards (~2 more minutes expected; not run yet).
# Each stage has its own time limit, so a slow or failing stage still leaves the others' results.
#
#   bash bench/gpu_check.sh            # results in ${OUT:-bench/results}
#
# Python packages missing there (pydantic; timm pinned to the version tested here) travel as wheels in
# .whl/ (git-ignored), made on this machine with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_17_x86_64 -d .whl pydantic==2.13.4 pydantic_core==2.46.4 annotated_types \
#       typing_inspection typing_extensions timm==1.0.31
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/results}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.sm,power.limit --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, timm, pydantic; print('torch', torch.__version__, 'timm', timm.__version__, \
'pydantic', pydantic.__version__, torch.cuda.get_device_name())" | tee -a "$out/gpu.txt" || exit 1
status=0
stage() {  # stage NAME SECONDS COMMAND...
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" >"$out/$name.log" 2>&1 || { echo "!! $name failed or ran past ${limit}s (rc $?)"; status=1; }
    tail -n 12 "$out/$name.log"
    echo "== $name: $((SECONDS - t0)) s"
}
stage train_step_eager 120 python3 bench/bench_train_step.py --device cuda --compile off --steps 30 --repeats 3 \
    --json "$out/train_step_eager.json"
stage train_step_compiled 230 python3 bench/bench_train_step.py --device cuda --compile on --steps 30 --repeats 3 \
    --json "$out/train_step_compiled.json"
stage train_step_compiled_folded 200 python3 bench/bench_train_step.py --device cuda --compile on --steps 30 \
    --repeats 3 --teacher-attention folded --json "$out/train_step_compiled_folded.json"
stage spectra 130 python3 bench/bench_spectra.py --full --device cuda --repeats 1 \
    --methods encmm-svd_rank,svdvals-gesvda-f32,svdvals-gesvda-f64 --json "$out/spectra_cuda.json"
exit $status
