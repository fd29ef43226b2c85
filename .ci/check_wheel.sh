#!/usr/bin/env bash
# The built package as a new user gets it: build the wheel, install it into a fresh venv, and run encmm
# from an empty folder that holds a user's own analysis.py / orchestrator.py / trainables.py (which must
# change nothing: encmm installs one import name, `encmm`). Ends with the embedded default sweep.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d /tmp/encmm-wheel.XXXXXX)"
trap 'rm -rf "$work"' EXIT
python3 -m pip wheel --no-deps --quiet -w "$work/dist" "$repo"
python3 -m venv "$work/venv"
"$work/venv/bin/python" -m pip install --quiet "$work"/dist/encmm-*.whl
mkdir "$work/empty" && cd "$work/empty"
for name in analysis orchestrator trainables; do
  echo "raise ImportError('the user\'s own $name.py was imported instead of encmm\'s')" > "$name.py"
done
encmm="$work/venv/bin/encmm"
"$encmm" sweep --list
"$encmm" sweep --dry-run
"$encmm" sweep digits-claims --dry-run | head -3
"$work/venv/bin/python" -c "import numpy as np; np.save('feats.npy', np.random.default_rng(0).standard_normal((2, 8, 16, 12)).astype('float32'))"
"$encmm" diagnose --features feats.npy --out diag
test -s diag/diagnostics.json
"$work/venv/bin/python" -c "import encmm, encmm.orchestrator.cli; print('import encmm from', encmm.__file__)" | grep -q site-packages
"$work/venv/bin/python" -c "from encmm.orchestrator.experiments import resolve_model_list as r; print(r('diagnose-sep-models'))"
start=$SECONDS
"$encmm" sweep
echo "wheel check passed: encmm sweep finished the embedded default from an empty folder in $((SECONDS - start)) s"
