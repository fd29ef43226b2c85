"""The device benchmarks still run against today's training core and spectra code (tiny sizes, CPU).

A GPU session gets minutes of device time: the scripts in bench/ must not be what breaks there.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def run_bench(script: str, *args: str) -> subprocess.CompletedProcess:
    """``python3 bench/<script> ARGS`` to its end (10 minutes at most); it must exit 0."""
    done = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.parametrize("preset", ["digits"])  # cait-deit: test_swapped_teacher_attention_computes_timms_block
def test_train_step_bench_runs_both_loops_and_reports_a_ratio(preset, tmp_path):
    out = tmp_path / "train_step.json"
    run_bench(
        "bench_train_step.py",
        *("--presets", preset, "--steps", "2", "--repeats", "1", "--warmup", "1", "--threads", "1"),
        *("--batch-size", "4", "--json", str(out)),
    )
    row = json.loads(out.read_text())["results"][0]
    assert row["preset"] == preset and row["encmm_img_s"] > 0 and row["bare_img_s"] > 0 and row["ratio"] > 0


def test_spectra_bench_checks_ranks_against_the_reference(tmp_path):
    out = tmp_path / "spectra.json"
    done = run_bench("bench_spectra.py", "--images", "40", "--repeats", "1", "--json", str(out))
    assert "encmm-svd_rank" in done.stdout


def test_train_step_profile_writes_where_the_step_time_goes(tmp_path):
    run_bench(
        "bench_train_step.py",
        *("--presets", "digits", "--steps", "2", "--warmup", "1", "--threads", "1"),
        *("--profile", str(tmp_path / "profile.txt")),
    )
    text = (tmp_path / "profile-digits-eager.txt").read_text()
    assert "== encmm, compile=off" in text and "== bare, compile=off" in text
    assert "aten::addmm" in text and "teacher forward alone, autocast:" in text


@pytest.mark.parametrize("attention", ["fused", "folded"])
def test_swapped_teacher_attention_computes_timms_block(attention, tmp_path):
    """The cait-deit preset (CaiT-S24 -> DeiT-Tiny at 224 px) with encmm's teacher attention swapped: both
    loops run and are compared, and the swapped blocks compute timm's."""
    out = tmp_path / "train_step.json"
    run_bench(
        "bench_train_step.py",
        *("--presets", "cait-deit", "--steps", "1", "--repeats", "1", "--warmup", "1", "--threads", "1"),
        *("--batch-size", "2", "--teacher-attention", attention, "--json", str(out)),
    )
    row = json.loads(out.read_text())["results"][0]
    assert row["preset"] == "cait-deit" and row["encmm_img_s"] > 0 and row["bare_img_s"] > 0 and row["ratio"] > 0
    assert row["swapped_attention_blocks"] == 24  # every talking-heads block of CaiT-S24
    assert row["swapped_block_relative_error"] < 1e-5  # fp32 on the CPU: the same function


def test_teacher_forward_bench_times_every_attention_variant(tmp_path):
    out = tmp_path / "teacher_forward.json"
    run_bench(
        "bench_teacher_forward.py",
        *("--img-size", "32", "--batch-size", "2", "--steps", "1", "--warmup", "1", "--repeats", "1"),
        *("--json", str(out)),
    )
    rows = {r["variant"]: r for r in json.loads(out.read_text())["results"]}
    assert rows.keys() == {"timm", "fused", "fused-expanded", "folded"} and all(r["img_s"] > 0 for r in rows.values())
    assert all(r["block_rel_error_fp32"] < 1e-5 for name, r in rows.items() if name != "timm")


def test_trial_throughput_bench_measures_both_sides_of_each_pipeline(tmp_path):
    """bench_trial_throughput.py on the CPU at a toy size: the real loader and on-device batches, one row per
    pipeline, each with both img/s and their ratio."""
    out = tmp_path / "trial.json"
    run_bench(
        "bench_trial_throughput.py",
        *("--images", "64", "--epochs", "2", "--batch-size", "16", "--threads", "1"),  # 6 JPEGs of each of 10 classes
        *("--folder", str(tmp_path / "jpegs"), "--json", str(out)),
    )
    rows = json.loads(out.read_text())["results"]
    assert [r["pipeline"] for r in rows] == ["standard", "fast"]
    for row in rows:
        assert row["steps_per_epoch"] == 60 // 16 and row["jpeg_img_s"] > 0 and row["synthetic_img_s"] > 0


GPU_CHECK_STAGES = (
    "teacher_forward train_step_compiled train_step_eager spectra spectra_test trial_throughput "
    "kd_bf16_teacher kd_cudagraphs kd_autotune"
).split()


def test_gpu_check_stages_import_and_parse_on_a_bare_checkout_without_ray_or_mlflow(tmp_path):
    """The lent GPU machine has torch and timm but neither encmm installed nor Ray nor MLflow. Here the same:
    ``python3 -S`` (no .pth files, so not the editable install) with this interpreter's site-packages on the
    path and ``ray`` / ``mlflow`` shadowed by packages that refuse to import. ``DRY_RUN=1`` then runs every
    stage's command with ``--help`` (pytest: ``--collect-only``): each script imports and parses its flags."""
    import sysconfig

    blocked = tmp_path / "blocked"
    for name in ("ray", "mlflow"):
        (blocked / name).mkdir(parents=True)
        (blocked / name / "__init__.py").write_text(f"raise ImportError('no {name} on the device machine')\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(f'#!/bin/sh\nexec {sys.executable} -S "$@"\n')
    (bin_dir / "python3").chmod(0o755)
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "PYTHONPATH": f"{blocked}:{sysconfig.get_paths()['purelib']}",
        "HOME": str(tmp_path),
        "OUT": str(tmp_path / "out"),
    }
    root = BENCH.parent
    bare = subprocess.run(["python3", "-c", "import encmm"], env=env, cwd=root, capture_output=True, text=True)
    assert "No module named 'encmm'" in bare.stderr  # what every stage met before the script linked the checkout
    assert subprocess.run(["python3", "-c", "import ray"], env=env, capture_output=True).returncode != 0

    done = subprocess.run(
        ["bash", str(BENCH / "gpu_check.sh")],
        env={**env, "DRY_RUN": "1", "STAGES": " ".join(GPU_CHECK_STAGES)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "!!" not in done.stdout
    for name in GPU_CHECK_STAGES:
        assert f"== {name}: " in done.stdout
        log = (tmp_path / "out" / f"{name}.log").read_text()
        assert ("1/" in log and "collected" in log) if name == "spectra_test" else "usage:" in log, log[-2000:]
