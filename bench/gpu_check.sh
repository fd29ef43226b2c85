#!/usr/bin/env bash
# One prepared device check for a lent GPU machine (torch + timm installed; no Ray, no MLflow, no internet):
# - teacher_forward: the CaiT-S24 teacher's forward with timm's and encmm's fused talking-heads attention,
#   eager and compiled (bench/bench_teacher_forward.py; its CPU default also times the bench's folded one);
# - train_step_compiled / train_step_eager: the CaiT-S24 -> DeiT-Tiny KD step, encmm against the bare timm
#   loop (bench/bench_train_step.py), encmm's teacher running whichever attention was faster compiled;
# - spectra: the diagnostics math on 1,000 images x 24 layers of 196x384: encmm's certified gesvda path
#   (what `svd_rank` runs on CUDA) and its re-check counts, the float64 Gram + eigvalsh reference it must
#   equal (37 s on an H100), and cuSOLVER's gesvda alone, without and with singular vectors;
# - spectra_test: the `gpu`-marked test of tests/test_spectra.py (skipped where pytest or hypothesis is missing);
# - trial_throughput: the compiled CaiT-S24 -> DeiT-Tiny trial on generated JPEGs (DeiT recipe, 8 loader workers,
#   data.pipeline standard and fast) against the same trial on on-device batches (bench/bench_trial_throughput.py).
# Not in the default list, the KD step's routes toward 5,000 img/s (issue 17), each the train_step_compiled stage
# with one change, both sides: kd_bf16_teacher (teacher.dtype bfloat16), kd_cudagraphs (compile mode
# reduce-overhead), kd_autotune (max-autotune-no-cudagraphs; long compilation):
#   STAGES="kd_bf16_teacher kd_cudagraphs" bash bench/gpu_check.sh
# Each stage has its own time limit, so a slow or failing stage still leaves the others' results; the
# limits add up to ~16.5 minutes, more than one 10-minute device call: pick stages with STAGES (the first four
# took ~6-7 minutes on an H100, BENCHMARKS.md section 5).
#
#   bash bench/gpu_check.sh                                         # results in ${OUT:-bench/results}
#   STAGES="teacher_forward train_step_compiled" bash bench/gpu_check.sh   # some stages only
#   DRY_RUN=1 bash bench/gpu_check.sh   # any machine, no GPU: each stage imports its code and parses its
#                                       # arguments (--help; pytest --collect-only), as tests/test_bench.py does
#
# The checkout is not installed there: its root is the package folder `encmm`, so a link named encmm in a
# temporary folder makes `import encmm` work (bench scripts and tests import encmm.*).
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
dry=${DRY_RUN:-0}
if [ "$dry" != 1 ] && compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
package_link=$(mktemp -d)
ln -s "$PWD" "$package_link/encmm"
trap 'rm -rf "$package_link"' EXIT
export PYTHONPATH="$package_link:$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ "$dry" = 1 ]; then
    python3 -c "import encmm.trainables.engine, encmm.analysis.spectra" || exit 1
else
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.sm,power.limit --format=csv | tee "$out/gpu.txt"
    python3 -c "import torch, timm, pydantic; print('torch', torch.__version__, 'timm', timm.__version__, \
'pydantic', pydantic.__version__, torch.cuda.get_device_name())" | tee -a "$out/gpu.txt" || exit 1
fi
status=0
stage() {  # stage NAME SECONDS COMMAND...
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    if [ "$dry" = 1 ]; then  # imports and arguments only
        if [ "$1" = python3 ] && [ "$2" = -m ]; then set -- "$@" --collect-only; else set -- "$@" --help; fi
    fi
    timeout "$limit" "$@" >"$out/$name.log" 2>&1 || { echo "!! $name failed or ran past ${limit}s (rc $?)"; status=1; }
    tail -n 12 "$out/$name.log"
    echo "== $name: $((SECONDS - t0)) s"
}
teacher_attention() {  # the faster compiled teacher forward of the teacher_forward stage: fused, else timm
    python3 -c "import json, sys; r = {(x['variant'], x['compile']): x['img_s'] for x in \
json.load(open(sys.argv[1]))['results']}; print('fused' if r[('fused', True)] >= r[('timm', True)] else 'timm')" \
        "$out/teacher_forward.json" 2>/dev/null || echo auto
}
for name in ${STAGES:-teacher_forward train_step_compiled train_step_eager spectra spectra_test trial_throughput}; do
    case $name in
    teacher_forward) stage teacher_forward 200 python3 bench/bench_teacher_forward.py --device cuda --compile both \
        --variants timm,fused --steps 20 --repeats 3 --json "$out/teacher_forward.json" ;;
    train_step_compiled) stage train_step_compiled 240 python3 bench/bench_train_step.py --device cuda --compile on \
        --steps 30 --repeats 3 --teacher-attention "$(teacher_attention)" --json "$out/train_step_compiled.json" ;;
    train_step_eager) stage train_step_eager 110 python3 bench/bench_train_step.py --device cuda --compile off \
        --steps 30 --repeats 3 --teacher-attention "$(teacher_attention)" --json "$out/train_step_eager.json" ;;
    spectra) stage spectra 130 python3 bench/bench_spectra.py --full --device cuda --repeats 1 \
        --methods encmm-svd_rank,encmm-certified-gesvda,encmm-reference,svdvals-gesvda-f64,svd-gesvda-f64 \
        --json "$out/spectra_cuda.json" ;;
    spectra_test) if python3 -c "import pytest, hypothesis" 2>/dev/null; then
        stage spectra_test 60 python3 -m pytest -q -p no:cacheprovider tests/test_spectra.py -m gpu
    else echo "== spectra_test: skipped (no pytest or hypothesis here)"; fi ;;
    trial_throughput) stage trial_throughput 240 python3 bench/bench_trial_throughput.py --device cuda --workers 8 \
        --compile on --epochs 3 --json "$out/trial_throughput.json" ;;
    kd_bf16_teacher) stage kd_bf16_teacher 240 python3 bench/bench_train_step.py --device cuda --compile on \
        --teacher-dtype bfloat16 --steps 30 --repeats 3 --teacher-attention "$(teacher_attention)" \
        --json "$out/kd_bf16_teacher.json" ;;
    kd_cudagraphs) stage kd_cudagraphs 300 python3 bench/bench_train_step.py --device cuda --compile on \
        --compile-mode reduce-overhead --steps 30 --repeats 3 --teacher-attention "$(teacher_attention)" \
        --json "$out/kd_cudagraphs.json" ;;
    kd_autotune) stage kd_autotune 540 python3 bench/bench_train_step.py --device cuda --compile on \
        --compile-mode max-autotune-no-cudagraphs --steps 30 --repeats 3 --teacher-attention "$(teacher_attention)" \
        --json "$out/kd_autotune.json" ;;
    *) echo "!! unknown stage $name"; status=1 ;;
    esac
done
exit $status
