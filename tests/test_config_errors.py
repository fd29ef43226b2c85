"""Bad input to ``encmm train``: exit code 2, one line naming the file and the field, no traceback,
and nothing created (no MLflow store, no run, no output folder) -- issue 2, "Configuration".

Each case runs the real Typer app in-process, in a fresh temporary folder as the working directory,
with ``--tracking-uri sqlite:///<tmp>/mlflow.db``. One case also runs the installed console script.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from encmm.orchestrator.cli import app
from encmm.trainables.config import ConfigError, TrainConfig
from encmm.trainables.preflight import check_train_config
from encmm.trainables.teacher import build_teacher

# A valid tiny run: digits at 16 px, patch 4 -> 4x4 grid, a 32-wide student with 2 heads.
BASE = """\
name: bad-input
data: {name: digits, img_size: 16, batch_size: 16}
student: {model: vit_tiny_patch16_224, width: 32, depth: 2, head_dim: 16, patch_size: 4}
schedule: {epochs: 1, warmup_epochs: 0}
"""
TIMM_TEACHER = "teacher: {source: timm, model: vit_tiny_patch16_224, pretrained: false}\nkd: {beta: 0.5}\n"
# Same grid for student and teacher: 64 px, patch 16 -> 4x4; teacher 192 wide.
GRID_MATCHED = """\
name: bad-input
data: {name: digits, img_size: 64}
student: {model: vit_tiny_patch16_224, width: 32, depth: 2, head_dim: 16, patch_size: 16}
teacher: {source: timm, model: vit_tiny_patch16_224, pretrained: false}
kd: {beta: 0.5}
"""

CONFIG = "config"  # rejected while loading the YAML/overrides, before the tracking store is touched
PREFLIGHT = "preflight"  # rejected by the teacher/preflight checks (after the tracking-store check)


@dataclass(frozen=True)
class Case:
    id: str
    yaml: str | None  # None: no config file at all
    sets: tuple[str, ...] = ()
    expect: tuple[str, ...] = ()  # substrings of the error line: the file and the field
    stage: str = CONFIG
    files: dict = field(default_factory=dict)  # extra files/folders to create (name -> bytes | None=folder)


CASES = [
    Case("unknown-top-level-key", BASE + "bogus: 1\n", expect=("bad.yaml", "bogus", "not permitted")),
    Case("unknown-nested-key", BASE + "kd: {alpah: 0.5}\n", expect=("bad.yaml", "kd.alpah", "not permitted")),
    Case("wrong-type", BASE, ("data.batch_size=big",), expect=("bad.yaml", "data.batch_size", "'big'")),
    Case("out-of-range", BASE, ("kd.alpha=1.5",), expect=("bad.yaml", "kd.alpha", "1.5")),
    Case(
        "bucket-output-dir",
        BASE,
        ("tracking.output_dir=s3://bucket/runs",),
        expect=("bad.yaml", "tracking.output_dir", "s3://bucket/runs", "set tracking.storage: s3://bucket/runs"),
    ),
    Case(
        "storage-unknown-scheme",
        BASE,
        ("tracking.storage=ftp://host/ckpts",),
        expect=("bad.yaml", "tracking.storage", "unknown storage scheme 'ftp'"),
    ),
    Case(
        "width-not-divisible-by-head-dim",
        BASE,
        ("student.width=100", "student.head_dim=64"),
        expect=("bad.yaml", "student.width", "100", "64"),
    ),
    Case("kd-beta-without-teacher", BASE, ("kd.beta=0.2",), expect=("bad.yaml", "kd.beta", "teacher")),
    Case("bad-set-syntax", BASE, ("kd.alpha",), expect=("--set", "kd.alpha", "KEY.PATH=VALUE")),
    Case("missing-config-file", None, expect=("bad.yaml", "not found")),
    Case("yaml-syntax-error", "data: [1, 2\nstudent: {}\n", expect=("bad.yaml", "YAML", "line")),
    Case(
        "unknown-timm-student",
        BASE,
        ("student.model=not_a_vit",),
        expect=("bad.yaml", "student.model", "not_a_vit"),
        stage=PREFLIGHT,
    ),
    Case(
        "unknown-timm-teacher",
        BASE + TIMM_TEACHER,
        ("teacher.model=not_a_teacher",),
        expect=("bad.yaml", "teacher.model", "not_a_teacher"),
        stage=PREFLIGHT,
    ),
    Case(
        "imagefolder-missing-root",
        BASE,
        ("data.name=imagefolder", "data.root=nowhere"),
        expect=("bad.yaml", "data.root", "nowhere"),
        stage=PREFLIGHT,
    ),
    Case(
        "imagefolder-root-without-train-val",
        BASE,
        ("data.name=imagefolder", "data.root=images"),
        expect=("bad.yaml", "data.root", "train/"),
        stage=PREFLIGHT,
        files={"images": None},
    ),
    Case(
        "imagefolder-without-images",
        BASE,
        ("data.name=imagefolder", "data.root=images"),
        expect=("bad.yaml", "data.root", "no image files", "empty dataset"),
        stage=PREFLIGHT,
        files={
            "images/train/a": None,
            "images/val/a": None,
            "images/train/a/notes.txt": b"x",
            "images/val/a/notes.txt": b"x",
        },
    ),
    Case(
        "teacher-grid-mismatch",
        BASE + TIMM_TEACHER,  # teacher 16 px / patch 16 = 1x1, student 4x4
        expect=("bad.yaml", "teacher", "(1, 1)", "(4, 4)"),
        stage=PREFLIGHT,
    ),
    Case(
        "avgpool-student-wider-than-teacher",
        GRID_MATCHED,
        ("student.projector=avgpool", "student.width=256"),
        expect=("bad.yaml", "student.projector", "192", "256"),
        stage=PREFLIGHT,
    ),
    Case(
        "missing-teacher-checkpoint",
        BASE + "teacher: {source: checkpoint, checkpoint: gone.pt}\nkd: {beta: 0.5}\n",
        expect=("bad.yaml", "teacher.checkpoint", "gone.pt"),
        stage=PREFLIGHT,
    ),
    Case(
        "teacher-checkpoint-not-encmm",
        BASE + "teacher: {source: checkpoint, checkpoint: junk.pt}\nkd: {alpha: 0.5}\n",
        expect=("bad.yaml", "teacher.checkpoint", "junk.pt"),
        stage=PREFLIGHT,
        files={"junk.pt": b"not a checkpoint"},
    ),
]


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@dataclass
class Outcome:
    """What one bad-input invocation did (also used by test_bad_input, whose cases may start from a store)."""

    exit_code: int
    stdout: str
    stderr: str
    exception: BaseException | None
    created: set[str]
    expect: tuple[str, ...] = ()
    store_created: bool = False
    runs_before: dict[str, str] | None = None
    runs_after: dict[str, str] | None = None


def invoke(case: Case, workdir: Path) -> Outcome:
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(workdir)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("RAY_ADDRESS", raising=False)
        if case.yaml is not None:
            Path("bad.yaml").write_text(case.yaml)
        for name, content in case.files.items():
            if content is None:
                Path(name).mkdir(parents=True)
            else:
                Path(name).write_bytes(content)
        before = tree(workdir)
        args = ["train", "bad.yaml", "--tracking-uri", f"sqlite:///{workdir / 'mlflow.db'}"]
        for text in case.sets:
            args += ["--set", text]
        result = CliRunner().invoke(app, args)
        created = tree(workdir) - before
    return Outcome(result.exit_code, result.stdout, result.stderr, result.exception, created)


@pytest.fixture(scope="module")
def run_case(tmp_path_factory):
    """Each case runs once, in its own fresh folder; both tests below read the same outcome."""
    cache: dict[str, Outcome] = {}

    def run(case: Case) -> Outcome:
        if case.id not in cache:
            cache[case.id] = invoke(case, tmp_path_factory.mktemp(case.id))
        return cache[case.id]

    return run


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_exits_2_with_one_error_line_naming_file_and_field(run_case, case):
    out = run_case(case)
    assert out.exit_code == 2, out.stderr
    assert out.exception is None or isinstance(out.exception, SystemExit)
    assert "Traceback" not in out.stdout + out.stderr
    assert out.stdout == ""
    errors = [line for line in out.stderr.splitlines() if line.startswith("encmm: error:")]
    assert len(errors) == 1, out.stderr
    assert out.stderr.endswith(errors[0] + "\n")  # the last thing printed
    for text in case.expect:
        assert text in errors[0], (text, errors[0])


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_bad_input_creates_nothing_and_prints_only_the_error(run_case, case):
    out = run_case(case)
    assert out.created == set(), f"validation created {sorted(out.created)}"
    assert len(out.stderr.splitlines()) == 1 and out.stderr.startswith("encmm: error:"), out.stderr


def test_console_script_exits_2_with_one_stderr_line_and_no_traceback(tmp_path):
    (tmp_path / "bad.yaml").write_text(BASE + "kd: {alpha: 1.5}\n")
    before = tree(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    exe = Path(sys.executable).with_name("encmm")
    command = [
        str(exe) if exe.exists() else "encmm",
        "train",
        "bad.yaml",
        "--tracking-uri",
        f"sqlite:///{tmp_path / 'mlflow.db'}",
    ]
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("encmm: error: bad.yaml: kd.alpha:")
    assert "Traceback" not in proc.stderr
    assert tree(tmp_path) == before


def test_preflight_accepts_only_teachers_that_can_take_the_student_batch():
    cfg = TrainConfig.model_validate(
        {
            "data": {"name": "digits", "img_size": 16},
            "student": {"model": "vit_tiny_patch16_224", "width": 32, "depth": 2, "head_dim": 16, "patch_size": 4},
            "teacher": {"source": "timm", "model": "vit_tiny_patch16_224", "pretrained": False, "img_size": 64},
            "kd": {"beta": 0.5},
        }
    )
    try:
        check_train_config(cfg, "cfg.yaml")
    except ConfigError:
        return  # rejected up front: fine
    teacher = build_teacher(
        cfg.teacher, student_mean=(0.5,) * 3, student_std=(0.5,) * 3, img_size=cfg.data.img_size, load_weights=False
    )
    logits, tokens = teacher(torch.zeros(1, 3, cfg.data.img_size, cfg.data.img_size))  # what training feeds it
    assert tokens.shape[1] == (cfg.data.img_size // cfg.student.patch_size) ** 2


@pytest.mark.parametrize("written,expected", [("on", "on"), ("off", "off"), ("auto", "auto"), ("'on'", "on")])
def test_bare_on_and_off_mean_the_switch_not_a_boolean(written, expected):
    """YAML 1.1 reads ``on``/``off`` as booleans; ``--set resources.compile=on`` must still mean "on"."""
    from encmm.trainables.config import load_train_config

    cfg = load_train_config(
        None, [f"resources.compile={written}", f"resources.local_mode={written}", f"teacher.fused_attention={written}"]
    )
    assert (cfg.resources.compile, cfg.resources.local_mode, cfg.teacher.fused_attention) == (expected,) * 3


def test_a_switch_still_rejects_other_values_in_one_line():
    from encmm.trainables.config import load_train_config

    with pytest.raises(ConfigError, match=r"^<defaults>: resources.compile: Input should be 'auto', 'on' or 'off'"):
        load_train_config(None, ["resources.compile=1"])
