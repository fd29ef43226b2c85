"""Bad input to ``encmm sweep``, ``encmm diagnose`` and ``encmm report``: exit code 2, one line naming the
problem, no traceback, and nothing left behind (no MLflow store or run, no output folder, no RUNNING run).
``encmm train`` has its own table in tests/test_config_errors.py.

Each case runs the real Typer app in-process, in a fresh temporary folder as the working directory, with
``--tracking-uri sqlite:///<tmp>/mlflow.db``. Cases that need a store beforehand get a copy of one made
with real MLflow calls (a FINISHED training run and a FINISHED sweep parent run without trials). No case
reaches Ray: each must be rejected before anything starts. One case per command also runs
``python -m orchestrator.cli`` in a subprocess.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from encmm.orchestrator import tracking
from encmm.orchestrator.cli import app
from tests.test_config_errors import Outcome, tree

REPO = Path(__file__).resolve().parents[1]
UNKNOWN_RUN = "0123456789abcdef0123456789abcdef"

# A valid tiny sweep: digits at 16 px, patch 4, a 32-wide student with 2 heads, no teacher, two seeds.
SWEEP_BASE = """\
base:
  data: {name: digits, img_size: 16, batch_size: 16}
  student: {model: vit_tiny_patch16_224, width: 32, depth: 2, head_dim: 16, patch_size: 4}
  schedule: {epochs: 1, warmup_epochs: 0}
"""
TIMM_TEACHER = """\
  teacher: {source: timm, model: vit_tiny_patch16_224, pretrained: false}
  kd: {beta: 0.5}
"""
TINY_VIT = ("--model", "vit_tiny_patch16_224", "--model-arg", "img_size=32", "--model-arg", "depth=2")


def sweep_yaml(grid: str = "{seed: [0, 1]}", base_extra: str = "", top: str = "") -> str:
    return f"name: bad-sweep\n{top}{SWEEP_BASE}{base_extra}search: {{grid: {grid}}}\n"


# ------------------------------------------------------------------------------ files the cases read
def text(name: str, content: str) -> Callable[[Path], None]:
    return lambda folder: (folder / name).write_text(content)


def array(name: str, value: np.ndarray) -> Callable[[Path], None]:
    return lambda folder: np.save(folder / name, value)


def features(shape=(2, 3, 4, 5), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape)


def nan_npz(folder: Path) -> None:
    values = features()
    values[1, 2, 0, 0] = np.nan
    np.savez(folder / "f.npz", features=values)


def three_d_pt(folder: Path) -> None:
    torch.save(torch.ones(3, 4, 5), folder / "f.pt")


def mismatched_folder(folder: Path) -> None:
    (folder / "d").mkdir()
    np.save(folder / "d" / "a.npy", features((2, 4, 5)))
    np.save(folder / "d" / "b.npy", features((2, 4, 6)))


def empty_folder(folder: Path) -> None:
    (folder / "d").mkdir()


def image_folder_without_images(folder: Path) -> None:
    for cls in ("cat", "dog"):
        (folder / "imgs" / cls).mkdir(parents=True)
        (folder / "imgs" / cls / "notes.txt").write_text("not an image")


def sweep_plan_outside_the_sweeps_folder(folder: Path) -> None:
    """A saved plan at encmm-runs/x/sweep.json, where `--resume ../x` would lead if names were paths."""
    (folder / "encmm-runs" / "x").mkdir(parents=True)
    (folder / "encmm-runs" / "x" / "sweep.json").write_text('{"uri": "sqlite:///elsewhere.db"}')


def sweep_plan_missing_its_fields(folder: Path) -> None:
    """A saved plan that a crash truncated or another tool wrote: read back, it is refused, not half-used."""
    (folder / "encmm-runs" / "sweeps" / "half").mkdir(parents=True)
    (folder / "encmm-runs" / "sweeps" / "half" / "sweep.json").write_text('{"name": "half", "total_trials": "x"}')


def random_bytes(name: str) -> Callable[[Path], None]:
    return lambda folder: (folder / name).write_bytes(np.random.default_rng(0).bytes(256))


@dataclass(frozen=True)
class Case:
    id: str
    command: str  # sweep | diagnose | report
    args: tuple[str, ...]  # `{train_run}` / `{sweep_run}` / `{tmp}` are filled in
    expect: tuple[str, ...]  # substrings of the error line: what is wrong, and where
    files: tuple[Callable[[Path], None], ...] = ()
    store: bool = False  # a store with runs exists beforehand


CASES = [
    # ---------------------------------------------------------------------------------------- sweep
    Case(
        "sweep-unknown-top-level-key",
        "sweep",
        ("bad.yaml",),
        ("bad.yaml", "bogus", "not permitted"),
        (text("bad.yaml", sweep_yaml(top="bogus: 1\n")),),
    ),
    Case(
        "sweep-unknown-key-in-base",
        "sweep",
        ("bad.yaml",),
        ("bad.yaml", "kd.alpah", "not permitted"),
        (text("bad.yaml", sweep_yaml(base_extra="  kd: {alpah: 0.5}\n")),),
    ),
    Case(
        "sweep-bucket-output-dir-in-base",
        "sweep",
        ("bad.yaml",),
        ("bad.yaml", "tracking.output_dir", "s3://bucket/runs", "set tracking.storage: s3://bucket/runs"),
        (text("bad.yaml", sweep_yaml(base_extra="  tracking: {output_dir: 's3://bucket/runs'}\n")),),
    ),
    Case(
        "sweep-grid-axis-unknown-key",
        "sweep",
        ("bad.yaml",),
        ("bad.yaml", "optim.lrr", "not permitted"),
        (text("bad.yaml", sweep_yaml("{optim.lrr: [0.1, 0.2]}")),),
    ),
    Case(
        "sweep-trial-larger-than-this-machine",
        "sweep",
        ("bad.yaml", "--set", "resources.cpus_per_worker=4096"),
        ("bad.yaml", "resources", "one trial needs 4096"),
        (text("bad.yaml", sweep_yaml()),),
    ),
    Case(
        "sweep-grid-axis-through-a-value",
        "sweep",
        ("bad.yaml",),
        ("bad.yaml", "student.width.value", "not a section"),
        (text("bad.yaml", sweep_yaml("{student.width.value: [1]}")),),
    ),
    Case(
        "sweep-grid-axis-empty-list",
        "sweep",
        ("bad.yaml",),
        ("bad.yaml", "kd.alpha", "no values"),
        (text("bad.yaml", sweep_yaml("{kd.alpha: []}")),),
    ),
    Case(
        "sweep-grid-axis-not-a-list",
        "sweep",
        ("bad.yaml",),
        ("bad.yaml", "search.grid.kd.alpha", "valid list"),
        (text("bad.yaml", sweep_yaml("{kd.alpha: 0.5}")),),
    ),
    Case(
        "sweep-grid-value-out-of-range",
        "sweep",
        ("bad.yaml",),
        ("bad.yaml", "kd.alpha=2.0", "less than or equal to 1"),
        (text("bad.yaml", sweep_yaml("{kd.alpha: [0.0, 2.0]}", TIMM_TEACHER)),),
    ),
    Case(
        "sweep-grid-width-not-divisible-by-head-dim",
        "sweep",
        ("bad.yaml",),
        ("bad.yaml", "student.width=40", "not divisible by student.head_dim 16"),
        (text("bad.yaml", sweep_yaml("{student.width: [32, 40]}")),),
    ),
    Case(
        "sweep-sampled-axis-low-above-high",
        "sweep",
        ("bad.yaml",),
        ("bad.yaml", "kd.temperature", "low < high"),
        (
            text(
                "bad.yaml",
                "name: s\n"
                + SWEEP_BASE
                + "search: {sample: {kd.temperature: {distribution: uniform, low: 4, high: 1}}}\n",
            ),
        ),
    ),
    Case(
        "sweep-bad-set-syntax",
        "sweep",
        ("bad.yaml", "--set", "sweep.max_concurrent_trials"),
        ("--set", "'sweep.max_concurrent_trials'", "KEY.PATH=VALUE"),
        (text("bad.yaml", sweep_yaml()),),
    ),
    Case(
        "sweep-set-into-a-base-that-is-not-a-mapping",
        "sweep",
        ("bad.yaml", "--set", "kd.alpha=0.5"),
        ("bad.yaml", "base", "mapping"),
        (text("bad.yaml", "name: s\nbase: 5\n"),),
    ),
    Case(
        "sweep-unknown-timm-student",
        "sweep",
        ("bad.yaml", "--set", "student.model=not_a_vit"),
        ("bad.yaml", "student.model", "not_a_vit"),
        (text("bad.yaml", sweep_yaml()),),
    ),
    Case(
        "sweep-teacher-student-token-grids-differ",
        "sweep",
        ("bad.yaml",),
        ("bad.yaml", "teacher", "(1, 1)", "(4, 4)"),
        (text("bad.yaml", sweep_yaml(base_extra=TIMM_TEACHER)),),
    ),
    Case(
        "sweep-teacher-training-file-missing",
        "sweep",
        ("bad.yaml",),
        ("gone-teacher.yaml", "not found"),
        (text("bad.yaml", sweep_yaml(top="teacher_training: gone-teacher.yaml\n")),),
    ),
    Case(
        "sweep-teacher-training-file-invalid",
        "sweep",
        ("bad.yaml",),
        ("teacher.yaml", "schedule.epochs", "-1"),
        (
            text("bad.yaml", sweep_yaml(top="teacher_training: teacher.yaml\n")),
            text("teacher.yaml", "schedule: {epochs: -1}\n"),
        ),
    ),
    Case("sweep-file-missing", "sweep", ("nope.yaml",), ("nope.yaml", "not found")),
    Case(
        "sweep-yaml-syntax-error",
        "sweep",
        ("bad.yaml",),
        ("bad.yaml", "YAML", "line"),
        (text("bad.yaml", "name: s\nbase: {data: [1, 2\n"),),
    ),
    Case(
        "sweep-resume-unknown-name",
        "sweep",
        ("ok.yaml", "--resume", "no-such-sweep"),
        ("--resume", "'no-such-sweep'"),
        (text("ok.yaml", sweep_yaml()),),
        store=True,
    ),
    Case(
        "sweep-resume-path-outside-the-sweeps-folder",
        "sweep",
        ("ok.yaml", "--resume", "../x"),
        ("--resume", "'../x'"),
        (text("ok.yaml", sweep_yaml()), sweep_plan_outside_the_sweeps_folder),
    ),
    Case(
        "sweep-resume-plan-that-is-not-one",
        "sweep",
        ("ok.yaml", "--resume", "half"),
        ("sweep.json", "not a sweep plan", "Field required"),
        (text("ok.yaml", sweep_yaml()), sweep_plan_missing_its_fields),
        store=True,
    ),
    # ------------------------------------------------------------------------------------- diagnose
    Case(
        "diagnose-unknown-timm-model",
        "diagnose",
        ("--model", "vit_tinyy_patch16_224"),
        ("--model", "unknown timm model", "'vit_tinyy_patch16_224'"),
    ),
    Case(
        "diagnose-model-arg-without-equals",
        "diagnose",
        (*TINY_VIT, "--model-arg", "img_size"),
        ("--model-arg", "'img_size'", "KEY=VALUE"),
    ),
    Case(
        "diagnose-model-arg-timm-does-not-take",
        "diagnose",
        (*TINY_VIT, "--model-arg", "bogus_arg=1"),
        ("--model vit_tiny_patch16_224", "cannot be created", "bogus_arg"),
    ),
    Case(
        "diagnose-checkpoint-missing",
        "diagnose",
        ("--checkpoint", "gone.pt"),
        ("--checkpoint", "gone.pt", "no such file"),
    ),
    Case(
        "diagnose-checkpoint-is-random-bytes",
        "diagnose",
        ("--checkpoint", "junk.pt"),
        ("--checkpoint junk.pt", "not an encmm checkpoint", "torch.load"),
        (random_bytes("junk.pt"),),
    ),
    Case(
        "diagnose-features-missing", "diagnose", ("--features", "nope.npy"), ("--features", "nope.npy", "no such file")
    ),
    Case(
        "diagnose-features-wrong-ndim",
        "diagnose",
        ("--features", "f.pt"),
        ("--features", "f.pt", "4-D", "(3, 4, 5)"),
        (three_d_pt,),
    ),
    Case(
        "diagnose-features-zero-size",
        "diagnose",
        ("--features", "f.npy"),
        ("--features", "f.npy", "empty array"),
        (array("f.npy", np.zeros((2, 0, 4, 5))),),
    ),
    Case("diagnose-features-with-nan", "diagnose", ("--features", "f.npz"), ("--features", "f.npz", "NaN"), (nan_npz,)),
    Case(
        "diagnose-features-not-numbers",
        "diagnose",
        ("--features", "f.npy"),
        ("--features", "f.npy", "dtype", "not a real number"),
        (array("f.npy", np.full((2, 3, 4, 5), "abc")),),
    ),
    Case(
        "diagnose-features-folder-with-mismatched-shapes",
        "diagnose",
        ("--features", "d"),
        ("--features", "b.npy", "(2, 4, 6)", "differs"),
        (mismatched_folder,),
    ),
    Case(
        "diagnose-features-empty-folder",
        "diagnose",
        ("--features", "d"),
        ("--features", "empty folder"),
        (empty_folder,),
    ),
    Case(
        "diagnose-layers-out-of-range",
        "diagnose",
        ("--features", "f.npy", "--layers", "0,2"),
        ("--layers", "2 is out of range for 2 layers"),
        (array("f.npy", features()),),
    ),
    Case(
        "diagnose-layers-not-numbers",
        "diagnose",
        ("--features", "f.npy", "--layers", "last"),
        ("--layers", "'last'"),
        (array("f.npy", features()),),
    ),
    Case(
        "diagnose-threshold-out-of-range",
        "diagnose",
        ("--features", "f.npy", "--thresholds", "0.9,1.0"),
        ("--thresholds", "(0, 1)", "1.0"),
        (array("f.npy", features()),),
    ),
    Case(
        "diagnose-threshold-not-a-number",
        "diagnose",
        ("--features", "f.npy", "--thresholds", "0.9,most"),
        ("encmm: error: --thresholds: '0.9,most'",),
        (array("f.npy", features()),),
    ),
    Case(
        "diagnose-zero-images-per-class",
        "diagnose",
        (*TINY_VIT, "--images-per-class", "0"),
        ("--images-per-class", "0"),
    ),
    Case(
        "diagnose-image-folder-without-images",
        "diagnose",
        (*TINY_VIT, "--data", "imgs"),
        ("--data", "imgs", "no image files"),
        (image_folder_without_images,),
    ),
    Case(
        "diagnose-out-inside-a-file",
        "diagnose",
        ("--features", "f.npy", "--out", "f.npy/sub"),
        ("--out", "f.npy", "not a folder"),
        (array("f.npy", features()),),
    ),
    Case(
        "diagnose-unknown-run", "diagnose", ("--run", UNKNOWN_RUN), ("--run", UNKNOWN_RUN, "no MLflow run"), store=True
    ),
    Case(
        "diagnose-run-without-checkpoint",
        "diagnose",
        ("--run", "{train_run}"),
        ("--run", "{train_run}", "checkpoints/best.pt"),
        store=True,
    ),
    # --------------------------------------------------------------------------------------- report
    Case(
        "report-unknown-sweep-and-no-store",
        "report",
        ("no-such-sweep",),
        ("no sweep 'no-such-sweep'", "does not exist"),
    ),
    Case("report-unknown-sweep-name", "report", ("no-such-sweep",), ("no sweep named 'no-such-sweep'",), store=True),
    Case(
        "report-unknown-run-id", "report", (UNKNOWN_RUN,), (f"'{UNKNOWN_RUN}'", "no sweep run with that id"), store=True
    ),
    Case(
        "report-run-that-is-not-a-sweep",
        "report",
        ("{train_run}",),
        ("{train_run}", "not an encmm sweep", "'train'"),
        store=True,
    ),
    Case(
        "report-store-folder-missing",
        "report",
        ("old-sweep", "--tracking-uri", "sqlite:///{tmp}/nowhere/mlflow.db"),
        ("nowhere", "does not exist"),
    ),
    Case(
        "report-store-is-not-a-database",
        "report",
        ("old-sweep",),
        ("mlflow.db", "not reachable"),
        (random_bytes("mlflow.db"),),
    ),
    Case(
        "report-out-is-a-file",
        "report",
        ("{sweep_run}", "--out", "taken.txt"),
        ("--out", "taken.txt", "not a folder"),
        (text("taken.txt", "a file"),),
        store=True,
    ),
]


# ------------------------------------------------------------------------------------------- running
@pytest.fixture(scope="module")
def store_template(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A SQLite store made once with real MLflow calls: a FINISHED training run (no checkpoint) and a FINISHED
    sweep parent run `old-sweep` without trials. Each case gets its own copy."""
    folder = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    train_run = tracking.start_run(uri, "encmm", "teacher", params={"kd.alpha": 0.0}, tags={"encmm.kind": "train"})
    tracking.end_run(uri, train_run, "FINISHED")
    sweep_run = tracking.start_run(
        uri, "encmm", "old-sweep", tags={"encmm.kind": "sweep", "encmm.sweep_name": "old-sweep"}
    )
    tracking.end_run(uri, sweep_run, "FINISHED")
    return folder / "mlflow.db", {"train_run": train_run, "sweep_run": sweep_run}


def all_runs(db: Path) -> dict[str, str]:
    """run id -> status of every run (any experiment, deleted ones too) in a SQLite store."""
    client = MlflowClient(f"sqlite:///{db}")
    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    return {r.info.run_id: r.info.status for r in client.search_runs(experiments, run_view_type=ViewType.ALL)}


def invoke(case: Case, workdir: Path, store_template: tuple[Path, dict[str, str]]) -> Outcome:
    db = workdir / "mlflow.db"
    values = {"tmp": str(workdir), **store_template[1]}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(workdir)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("RAY_ADDRESS", raising=False)
        if case.store:
            shutil.copy(store_template[0], db)
        for make in case.files:
            make(workdir)
        store_existed = db.exists()
        runs_before = all_runs(db) if case.store else None
        before = tree(workdir)
        args = [case.command, *(a.format(**values) for a in case.args)]
        if "--tracking-uri" not in args:
            args += ["--tracking-uri", f"sqlite:///{db}"]
        result = CliRunner().invoke(app, args)
        created = tree(workdir) - before
    return Outcome(
        result.exit_code,
        result.stdout,
        result.stderr,
        result.exception,
        created,
        expect=tuple(e.format(**values) for e in case.expect),
        store_created=not store_existed and db.exists(),
        runs_before=runs_before,
        runs_after=all_runs(db) if case.store else None,
    )


@pytest.fixture(scope="module")
def run_case(tmp_path_factory, store_template):
    """Each case runs once, in its own fresh folder; the tests below read the same outcome."""
    cache: dict[str, Outcome] = {}

    def run(case: Case) -> Outcome:
        if case.id not in cache:
            cache[case.id] = invoke(case, tmp_path_factory.mktemp(case.id), store_template)
        return cache[case.id]

    return run


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_exits_2_with_one_error_line_naming_the_problem(run_case, case):
    out = run_case(case)
    assert out.exit_code == 2, (out.stderr, out.exception)
    assert out.exception is None or isinstance(out.exception, SystemExit)
    assert "Traceback" not in out.stdout + out.stderr
    assert out.stdout == ""
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("encmm: error: ") and lines[0].strip() != "encmm: error:", out.stderr
    for part in out.expect:
        assert part in lines[0], (part, lines[0])


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_leaves_no_store_run_or_output_folder_behind(run_case, case):
    out = run_case(case)
    assert out.created == set(), f"rejected input created {sorted(out.created)}"  # encmm-runs/, reports/, ...
    assert not out.store_created
    if out.runs_before is not None:
        assert out.runs_after == out.runs_before  # no new run, no status changed
        assert "RUNNING" not in out.runs_after.values()


SUBPROCESS_CASES = [
    pytest.param(
        ["sweep", "bad.yaml"],
        "encmm: error: bad.yaml [trial kd.alpha=2.0]: kd.alpha:",
        {"bad.yaml": sweep_yaml("{kd.alpha: [0.0, 2.0]}", TIMM_TEACHER)},
        id="sweep",
    ),
    pytest.param(
        ["diagnose", "--features", "f.npy"],
        "encmm: error: --features: f.npy: dtype",
        {"f.npy": np.full((2, 3, 4, 5), "abc")},
        id="diagnose",
    ),
    pytest.param(["report", "no-such-sweep"], "encmm: error: no sweep 'no-such-sweep'", {}, id="report"),
]


@pytest.mark.parametrize("args,first_words,files", SUBPROCESS_CASES)
def test_module_entry_point_exits_2_with_one_stderr_line_and_no_traceback(tmp_path, args, first_words, files):
    for name, content in files.items():
        if isinstance(content, np.ndarray):
            np.save(tmp_path / name, content)
        else:
            (tmp_path / name).write_text(content)
    before = tree(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))  # this checkout's code
    command = [
        sys.executable,
        "-m",
        "encmm.orchestrator.cli",
        *args,
        "--tracking-uri",
        f"sqlite:///{tmp_path / 'mlflow.db'}",
    ]
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(first_words), proc.stderr
    assert "Traceback" not in proc.stderr
    assert tree(tmp_path) == before
