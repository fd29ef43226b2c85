"""Security defaults (issue "Security defaults"), each proved with the real parts (no mocks of Ray, MLflow
or torch):

- ``encmm ui`` serves MLflow on 127.0.0.1 unless ``--host`` says otherwise; a local Ray cluster started
  by ``init_ray`` listens on 127.0.0.1 only (its dashboard and every other server it opens);
- user checkpoints and saved features load with ``torch.load(weights_only=True)`` / ``allow_pickle=False``:
  a planted pickle payload never runs, and the CLI exits 2 with one ``encmm: error:`` line;
- YAML goes through ``yaml.safe_load``: a ``!!python/...`` tag in a config file, a ``--set`` value or a
  ``--model-arg`` runs nothing and exits 2 with one line;
- names cannot escape their folders: run and sweep names are plain names, ``--resume NAME`` is a folder
  directly under ``<output_dir>/sweeps``, and the default output folders of ``diagnose`` and ``report``
  stay under ``./diagnostics`` and ``./reports`` whatever the model or sweep name says.

Listening sockets are read from ``/proc/net/tcp{,6}`` and ``/proc/<pid>/fd`` (Linux).
"""

from __future__ import annotations

import ast
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from encmm.orchestrator import tracking
from encmm.orchestrator.cli import app
from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[1]
THIS_FILE = Path(__file__).resolve()
LINUX_PROC = Path("/proc/net/tcp").exists()
needs_proc = pytest.mark.skipif(not LINUX_PROC, reason="reads listening sockets from /proc (Linux)")

TINY_TRAIN = """\
name: tiny
data: {name: digits, img_size: 16, batch_size: 16}
student: {model: vit_tiny_patch16_224, width: 32, depth: 2, head_dim: 16, patch_size: 4}
schedule: {epochs: 1, warmup_epochs: 0}
"""
TINY_SWEEP = """\
name: tiny-sweep
base:
  data: {name: digits, img_size: 16, batch_size: 16}
  student: {model: vit_tiny_patch16_224, width: 32, depth: 2, head_dim: 16, patch_size: 4}
  schedule: {epochs: 1, warmup_epochs: 0}
search:
  grid:
    student.remedy: [none]
"""


# ------------------------------------------------------------------------------------------ helpers
def tree(root: Path) -> set[Path]:
    return {p.relative_to(root) for p in root.rglob("*")}


def invoke(workdir: Path, args: list[str]):
    """The real Typer app, in-process, with ``workdir`` as the working directory and no ambient
    MLflow/Ray addresses."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(workdir)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("RAY_ADDRESS", raising=False)
        return CliRunner().invoke(app, args)


def store_uri(folder: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}"


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory) -> str:
    """One SQLite MLflow store (created here) for the tests that need one: a fresh store costs seconds."""
    uri = store_uri(tmp_path_factory.mktemp("shared-store"))
    tracking.ensure_experiment(uri, tracking.DEFAULT_EXPERIMENT)
    return uri


def error_line(result, *expect: str) -> str:
    """Exit 2, no traceback, nothing on stdout, exactly one ``encmm: error:`` line holding ``expect``."""
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.stdout + result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("encmm: error: "), result.stderr
    for text in expect:
        assert text in lines[0], (text, lines[0])
    return lines[0]


# /proc/net/tcp{,6}: "sl local_address rem_address st ... inode"; addresses are 32-bit words in host order.
def _address(hex_address: str):
    raw = bytes.fromhex(hex_address)
    if sys.byteorder == "little":
        raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return ipaddress.ip_address(raw)


def listening_sockets() -> list[tuple]:
    """Every listening TCP socket of this network namespace: (address, port, inode)."""
    found = []
    for table in ("tcp", "tcp6"):
        path = Path("/proc/net") / table
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A":  # TCP_LISTEN
                continue
            address, port = fields[1].split(":")
            found.append((_address(address), int(port, 16), int(fields[9])))
    return found


def is_loopback(address) -> bool:
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1 in an IPv6 socket
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def _parent_map() -> dict[int, int]:
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(text.rsplit(")", 1)[1].split()[1])  # comm may hold spaces
    return parents


def process_tree(root: int) -> set[int]:
    parents = _parent_map()
    tree_, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        children = [child for child, parent in parents.items() if parent == pid and child not in tree_]
        tree_.update(children)
        frontier.extend(children)
    return tree_


def socket_inodes(pid: int) -> set[int]:
    inodes = set()
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return inodes
    for fd in fds:
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def listeners_of(pids) -> dict[int, list[tuple]]:
    """pid -> [(address, port)] of the sockets each process listens on."""
    table = {inode: (address, port) for address, port, inode in listening_sockets()}
    return {pid: [table[i] for i in socket_inodes(pid) if i in table] for pid in pids}


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def subprocess_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    return env


def kill_groups(pids) -> None:
    for pid in pids:
        try:
            os.killpg(os.getpgid(pid), signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


# ------------------------------------------------------------------------------ 1. encmm ui on 127.0.0.1
@needs_proc
@pytest.mark.server
@pytest.mark.parametrize("stop_with, exit_code", [(signal.SIGINT, 0), (signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_encmm_ui_serves_mlflow_on_127_0_0_1_only_by_default_and_ctrl_c_stops_it(
    shared_store, tmp_path, stop_with, exit_code
):
    """``encmm ui`` as a user runs it (no ``--host``), in its own process: the server it starts answers
    ``/health`` on 127.0.0.1, and every socket encmm and its server processes listen on is loopback.
    Ctrl-C, and SIGTERM / SIGHUP as systemd, docker or a closed terminal send them, stop the server and
    every worker of it, and free the port."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "encmm.orchestrator.cli",
        "ui",
        "--port",
        str(port),  # the `encmm` entry point
        "--tracking-uri",
        shared_store,
    ]
    ui = subprocess.Popen(
        command,
        cwd=tmp_path,
        env={**subprocess_env(), "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(ui.stdout), daemon=True)
    reader.start()
    seen: set[int] = {ui.pid}
    try:
        deadline = time.monotonic() + 180
        while not any("Ctrl-C to stop" in line for line in list(output)):  # encmm saw /health answer
            assert ui.poll() is None, "".join(output)
            assert time.monotonic() < deadline, "encmm ui never reported the server up:\n" + "".join(output)
            seen |= process_tree(ui.pid)
            time.sleep(0.5)
        seen |= process_tree(ui.pid)
        assert any(f"http://127.0.0.1:{port}/" in line for line in output), "".join(output)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as response:
            assert response.status == 200
        server_pids = {pid for pid in seen if "mlflow" in cmdline(pid) and pid != ui.pid}
        assert server_pids, "no mlflow server process under encmm ui"

        on_port = [address for address, p, _ in listening_sockets() if p == port]
        assert {str(a) for a in on_port} == {"127.0.0.1"}, on_port
        opened = [(pid, str(a), p) for pid, socks in listeners_of(seen).items() for a, p in socks]
        assert any(p == port for _, _, p in opened), opened
        beyond = [entry for entry in opened if not is_loopback(ipaddress.ip_address(entry[1]))]
        assert beyond == [], f"listening beyond loopback: {beyond}"

        seen |= process_tree(ui.pid)  # the server's own workers (uvicorn, huey) by now
        ui.send_signal(stop_with)
        assert ui.wait(timeout=60) == exit_code, "".join(output)
        reader.join(timeout=20)
        assert not [p for _, p, _ in listening_sockets() if p == port], f"the server outlived {stop_with.name}"
        left = [pid for pid in seen if pid != ui.pid and cmdline(pid)]
        assert not left, f"processes outlived {stop_with.name}: {[cmdline(pid) for pid in left]}"
    finally:
        if ui.poll() is None:
            ui.kill()
            ui.wait()
        kill_groups(pid for pid in seen if "mlflow" in cmdline(pid))


def test_encmm_ui_on_a_port_already_in_use_exits_2_in_one_line_and_starts_nothing(tmp_path):
    """Another server holds the port: encmm must not print that server's URL as its own."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = CliRunner().invoke(
            app, ["ui", "--port", str(port), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
        )
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and f"--port {port}" in lines[0] and "in use" in lines[0], result.stderr
    assert result.stdout == ""


# --------------------------------------------------------------------------- 2. local Ray on 127.0.0.1
def _ray_context(ray):
    return ray.init(ignore_reinit_error=True)  # the running session's context (address_info, dashboard)


@pytest.mark.ray
@needs_proc
def test_local_ray_dashboard_listens_on_127_0_0_1_only(ray_cluster):
    url = _ray_context(ray_cluster).dashboard_url
    host, _, port = url.removeprefix("http://").rpartition(":")
    assert host == "127.0.0.1", url
    on_port = [address for address, p, _ in listening_sockets() if p == int(port)]
    assert on_port and all(is_loopback(a) for a in on_port), on_port
    with socket.create_connection(("127.0.0.1", int(port)), timeout=5):
        pass  # and it is really there


@pytest.mark.ray
@needs_proc
def test_local_ray_cluster_opens_no_port_beyond_loopback(ray_cluster):
    """GCS, raylet, workers, agents, metrics exporters: with Ray's default node IP (the routable one) these
    listen on every interface; ``init_ray`` starts a local cluster with node IP 127.0.0.1."""
    context = _ray_context(ray_cluster)
    if os.environ.get("RAY_ADDRESS"):
        pytest.skip("RAY_ADDRESS names a cluster: not one init_ray started")
    ray_pids = {pid for pid in process_tree(os.getpid()) if pid != os.getpid() and "ray" in cmdline(pid)}
    if not any("gcs_server" in cmdline(pid) for pid in ray_pids):
        pytest.skip("this session joined a running cluster: its servers are not this process's to check")
    assert context.address_info["node_ip_address"] == "127.0.0.1"
    opened = [
        (pid, process_name(pid), str(a), p)
        for pid, socks in listeners_of(ray_pids | {os.getpid()}).items()
        for a, p in socks
    ]
    assert any(name == "gcs_server" for _, name, _, _ in opened), opened
    beyond = [entry for entry in opened if not is_loopback(ipaddress.ip_address(entry[2]))]
    assert beyond == [], f"Ray listens beyond loopback: {beyond}"


# ------------------------------------------------------------- 3. checkpoints: weights_only=True
class Payload:
    """Unpickled without restriction, this opens ``marker`` for writing: the file appears."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture()
def planted(tmp_path):
    """A work folder with evil.pt (torch.save of an encmm-like dict holding the payload) and evil.npy
    (an object array holding it); ``marker`` must never appear."""
    work = tmp_path / "work"
    work.mkdir()
    marker = tmp_path / "PWNED"
    torch.save({"spec": Payload(marker), "model": {}, "features": Payload(marker)}, work / "evil.pt")
    np.save(work / "evil.npy", np.array([Payload(marker)], dtype=object), allow_pickle=True)
    return work, marker


def test_planted_checkpoint_payload_runs_when_loaded_without_weights_only(planted):
    """The control: the payload is live, so the tests below would see it run."""
    work, marker = planted
    torch.load(work / "evil.pt", weights_only=False)  # the one unrestricted load in this repo, on purpose
    assert marker.exists()


def test_load_checkpoint_file_refuses_the_payload_without_running_it(planted):
    from encmm.trainables.teacher import load_checkpoint_file

    work, marker = planted
    with pytest.raises(Exception) as caught:
        load_checkpoint_file(work / "evil.pt")
    assert "weights" in str(caught.value).lower()  # torch's weights-only unpickler said no
    assert not marker.exists()


def test_report_student_loader_refuses_the_payload_without_running_it(planted):
    from encmm.orchestrator.report_models import load_student

    work, marker = planted
    with pytest.raises(Exception):
        load_student(work / "evil.pt")
    assert not marker.exists()


def test_timm_teacher_pretrained_file_refuses_the_payload_without_running_it(planted):
    from encmm.trainables.config import TeacherConfig
    from encmm.trainables.teacher import create_timm_teacher

    work, marker = planted
    cfg = TeacherConfig(source="timm", model="vit_tiny_patch16_224", pretrained_file=str(work / "evil.pt"))
    with pytest.raises(Exception):
        create_timm_teacher(cfg, load_weights=True, img_size=16)
    assert not marker.exists()


@pytest.mark.parametrize(
    "source, file", [("--checkpoint", "evil.pt"), ("--features", "evil.pt"), ("--features", "evil.npy")]
)
def test_diagnose_refuses_planted_checkpoint_or_features_with_one_error_line(planted, tmp_path, source, file):
    work, marker = planted
    before = tree(tmp_path)
    result = invoke(work, ["diagnose", source, file, "--tracking-uri", store_uri(tmp_path / "store")])
    error_line(result, file)
    assert not marker.exists()
    assert tree(tmp_path) - before <= {Path("store")}


def test_train_refuses_a_planted_teacher_checkpoint_with_one_error_line(planted, tmp_path):
    work, marker = planted
    (work / "bad.yaml").write_text(TINY_TRAIN + "teacher: {source: checkpoint, checkpoint: evil.pt}\nkd: {beta: 0.5}\n")
    before = tree(tmp_path)
    result = invoke(work, ["train", "bad.yaml", "--tracking-uri", store_uri(tmp_path / "store")])
    error_line(result, "bad.yaml", "teacher.checkpoint", "evil.pt")
    assert not marker.exists()
    assert tree(tmp_path) - before <= {Path("store")}


@pytest.fixture()
def planted_run(planted, shared_store, tmp_path):
    """A FINISHED MLflow run whose ``checkpoints/best.pt`` artifact is the planted file."""
    work, marker = planted
    upload = tmp_path / "upload"
    upload.mkdir()
    torch.save({"spec": Payload(marker), "model": {}}, upload / "best.pt")
    run_id = tracking.start_run(shared_store, "encmm", "planted", tags={"encmm.kind": "train"})
    tracking.log_artifact(shared_store, run_id, upload / "best.pt", "checkpoints")
    tracking.end_run(shared_store, run_id, "FINISHED")
    return work, marker, shared_store, run_id


def test_diagnose_run_refuses_a_planted_checkpoint_artifact_with_one_error_line(planted_run):
    work, marker, uri, run_id = planted_run
    result = invoke(work, ["diagnose", "--run", run_id, "--tracking-uri", uri])
    error_line(result, run_id, "not an encmm checkpoint")
    assert not marker.exists()


def test_train_refuses_a_planted_teacher_run_artifact_with_one_error_line(planted_run):
    work, marker, uri, run_id = planted_run
    (work / "bad.yaml").write_text(TINY_TRAIN + f"teacher: {{source: run, run_id: {run_id}}}\nkd: {{beta: 0.5}}\n")
    result = invoke(work, ["train", "bad.yaml", "--tracking-uri", uri])
    error_line(result, "bad.yaml", "teacher.checkpoint", "best.pt")
    assert not marker.exists()


# ------------------------------------------------------------------------ 4. YAML: safe_load only
def yaml_payload(marker: Path) -> str:
    return f"!!python/object/apply:os.system [{json.dumps(f'touch {marker}')}]"


@pytest.mark.parametrize(
    "where", ["train-file", "train-set", "sweep-file", "sweep-base-file", "sweep-set-base", "sweep-set-sweep"]
)
def test_python_yaml_tags_run_nothing_and_exit_2_naming_the_source(tmp_path, where):
    work = tmp_path / "work"
    work.mkdir()
    marker = tmp_path / "PWNED"
    payload = yaml_payload(marker)
    args, expect = [], ()
    if where == "train-file":
        (work / "cfg.yaml").write_text(TINY_TRAIN + f"seed: {payload}\n")
        args, expect = ["train", "cfg.yaml"], ("cfg.yaml", "YAML", "line 5")
    elif where == "train-set":
        (work / "cfg.yaml").write_text(TINY_TRAIN)
        args, expect = ["train", "cfg.yaml", "--set", f"seed={payload}"], ("--set", "seed=", "YAML")
    elif where == "sweep-file":
        (work / "sweep.yaml").write_text(f"max_concurrent_trials: {payload}\n" + TINY_SWEEP)
        args, expect = ["sweep", "sweep.yaml"], ("sweep.yaml", "YAML", "line 1")
    elif where == "sweep-base-file":
        (work / "base.yaml").write_text(TINY_TRAIN + f"seed: {payload}\n")
        (work / "sweep.yaml").write_text("name: s\nbase: base.yaml\nsearch: {grid: {seed: [0]}}\n")
        args, expect = ["sweep", "sweep.yaml"], ("base.yaml", "YAML")
    elif where == "sweep-set-base":
        (work / "sweep.yaml").write_text(TINY_SWEEP)
        args, expect = ["sweep", "sweep.yaml", "--set", f"seed={payload}"], ("--set", "seed=", "YAML")
    else:
        (work / "sweep.yaml").write_text(TINY_SWEEP)
        args, expect = ["sweep", "sweep.yaml", "--set", f"sweep.name={payload}"], ("--set", "name=", "YAML")
    before = tree(tmp_path)
    result = invoke(work, [*args, "--tracking-uri", store_uri(tmp_path / "store")])
    error_line(result, *expect)
    assert not marker.exists()
    assert tree(tmp_path) - before <= {Path("store")}


def test_diagnose_model_arg_python_tag_runs_nothing_and_exits_2(tmp_path):
    marker = tmp_path / "PWNED"
    result = invoke(
        tmp_path,
        [
            "diagnose",
            "--model",
            "test_vit",
            "--model-arg",
            f"img_size={yaml_payload(marker)}",
            "--tracking-uri",
            store_uri(tmp_path / "store"),
        ],
    )
    error_line(result, "--model", "test_vit")
    assert not marker.exists()


# --------------------------------------------------------------------- static checks over the repo
def repo_python_files() -> list[Path]:
    files = []
    for path in sorted(REPO.rglob("*.py")):
        rel = path.relative_to(REPO)
        if any(part.startswith(".") or part.endswith(".egg-info") or part in ("build", "dist") for part in rel.parts):
            continue
        if path.resolve() != THIS_FILE:  # this file unpickles the payload once, on purpose (the control)
            files.append(path)
    return files


def calls(path: Path):
    """(call, owner, name): ``torch.load(...)`` -> ("torch", "load"); ``eval(...)`` -> (None, "eval");
    ``model.eval()`` -> ("model", "eval"); ``f()[0].eval()`` -> ("", "eval")."""
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name):
                yield node, None, func.id
            elif isinstance(func, ast.Attribute):
                yield node, func.value.id if isinstance(func.value, ast.Name) else "", func.attr


def keyword(node: ast.Call, name: str):
    return next((k.value for k in node.keywords if k.arg == name), None)


def test_repo_scan_finds_python_files_to_check():
    names = {p.relative_to(REPO).as_posix() for p in repo_python_files()}
    assert {"trainables/teacher.py", "trainables/ray_worker.py", "analysis/saved_features.py"} <= names


def test_every_torch_load_in_the_repo_passes_weights_only_true():
    bad, seen = [], 0
    for path in repo_python_files():
        for node, owner, name in calls(path):
            if owner == "torch" and name == "load":
                seen += 1
                flag = keyword(node, "weights_only")
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    bad.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert seen >= 4 and bad == [], bad


def test_yaml_is_only_read_with_safe_load_and_numpy_never_unpickles():
    unsafe_yaml = {"load", "load_all", "unsafe_load", "unsafe_load_all", "full_load", "full_load_all"}
    bad = []
    for path in repo_python_files():
        for node, owner, name in calls(path):
            where = f"{path.relative_to(REPO)}:{node.lineno}"
            if owner == "yaml" and (name in unsafe_yaml or keyword(node, "Loader") is not None):
                bad.append(f"{where} yaml.{name}")
            if owner in ("np", "numpy") and name == "load":
                flag = keyword(node, "allow_pickle")
                if flag is not None and not (isinstance(flag, ast.Constant) and flag.value is False):
                    bad.append(f"{where} np.load(allow_pickle=...)")
    assert bad == [], bad


def test_product_code_has_no_eval_exec_or_raw_unpickling():
    bad = []
    for path in repo_python_files():
        if path.relative_to(REPO).parts[0] not in ("orchestrator", "trainables", "analysis"):
            continue
        for node, owner, name in calls(path):
            if (
                (owner is None and name in ("eval", "exec", "__import__"))
                or (owner in ("pickle", "cloudpickle", "dill", "marshal") and name in ("load", "loads"))
                or (owner == "importlib" and name == "import_module")
            ):
                bad.append(f"{path.relative_to(REPO)}:{node.lineno} {owner or ''}.{name}")
    assert bad == [], bad


def test_mlflow_artifact_paths_are_fixed_strings():
    """Where encmm logs an artifact (a run's ``checkpoints/``, ``figures/``, ``report/``), the folder is a
    literal, never built from user input (the module that wraps MLflow forwards its own parameter)."""
    bad, seen = [], 0
    for path in repo_python_files():
        rel = path.relative_to(REPO)
        if rel.parts[0] not in ("orchestrator", "trainables") or rel.as_posix() == "orchestrator/tracking.py":
            continue
        for node, owner, name in calls(path):
            if name not in ("log_artifact", "log_artifacts"):
                continue
            seen += 1
            position = 3 if owner == "tracking" else 1  # tracking.log_artifact(uri, run, path, folder)
            value = keyword(node, "artifact_path")
            if value is None and len(node.args) > position:
                value = node.args[position]
            if value is not None and not (isinstance(value, ast.Constant) and isinstance(value.value, str)):
                bad.append(f"{rel}:{node.lineno}")
    assert seen >= 5 and bad == [], bad


# ------------------------------------------------------------------ 5. names cannot escape their folders
@pytest.mark.parametrize("name", ["../../escape", "a/b", "..", "/abs"])
def test_train_config_name_that_is_a_path_is_rejected_with_one_line(tmp_path, name):
    work = tmp_path / "work"
    work.mkdir()
    (work / "cfg.yaml").write_text(TINY_TRAIN.replace("name: tiny", f"name: {json.dumps(name)}"))
    before = tree(tmp_path)
    result = invoke(work, ["train", "cfg.yaml", "--tracking-uri", store_uri(tmp_path / "store")])
    error_line(result, "cfg.yaml", "name")
    assert tree(tmp_path) - before <= {Path("store")}


def test_train_name_override_that_is_a_path_is_rejected_with_one_line(tmp_path):
    (tmp_path / "cfg.yaml").write_text(TINY_TRAIN)
    result = invoke(
        tmp_path, ["train", "cfg.yaml", "--set", "name=../x", "--tracking-uri", store_uri(tmp_path / "store")]
    )
    error_line(result, "cfg.yaml", "name")


@pytest.mark.parametrize("how", ["file", "set"])
def test_sweep_name_that_is_a_path_is_rejected_with_one_line(tmp_path, how):
    work = tmp_path / "work"
    work.mkdir()
    text = TINY_SWEEP.replace("name: tiny-sweep", 'name: "../x"') if how == "file" else TINY_SWEEP
    (work / "sweep.yaml").write_text(text)
    args = ["sweep", "sweep.yaml", "--tracking-uri", store_uri(tmp_path / "store")]
    if how == "set":
        args += ["--set", "sweep.name=a/b"]
    before = tree(tmp_path)
    result = invoke(work, args)
    error_line(result, "sweep.yaml", "name")
    assert tree(tmp_path) - before <= {Path("store")}


def test_shipped_experiment_names_are_valid_plain_names():
    from encmm.orchestrator.sweep_config import load_sweep_config
    from encmm.trainables.config import load_train_config

    files = sorted((REPO / "experiments").glob("*.yaml"))
    assert files
    trees = {path.name: yaml.safe_load(path.read_text()) or {} for path in files}
    bases = {tree["base"] for tree in trees.values() if isinstance(tree.get("base"), str)}
    assert bases  # the shared student configs: checked below through the sweeps that use them
    for path in files:
        if path.name in bases:
            continue
        if "search" in trees[path.name]:
            name = load_sweep_config(path)[0].name
        else:
            name = load_train_config(path).name
        assert "/" not in name and not name.startswith("."), (path.name, name)


@pytest.mark.parametrize("name, planted_at", [("../../etc", "etc"), ("..", "encmm-runs"), ("a/../../../etc", "etc")])
def test_sweep_resume_name_cannot_leave_the_sweeps_folder(tmp_path, name, planted_at):
    """A ``sweep.json`` planted where the path would lead is never read: the name is refused up front."""
    work = tmp_path / "work"
    (work / planted_at).mkdir(parents=True)
    (work / planted_at / "sweep.json").write_text("{not json: planted")
    (work / "sweep.yaml").write_text(TINY_SWEEP)
    before = tree(tmp_path)
    result = invoke(work, ["sweep", "sweep.yaml", "--resume", name, "--tracking-uri", store_uri(tmp_path / "store")])
    line = error_line(result, "--resume", repr(name))
    assert "not a sweep name" in line
    assert tree(tmp_path) - before <= {Path("store")}


def test_teacher_run_id_that_is_a_path_reads_no_file_and_exits_2(planted, shared_store, tmp_path):
    """``teacher.run_id`` names the download cache ``<output_dir>/.teachers/<run_id>``: a path there must
    not reach a planted ``best.pt``."""
    work, marker = planted
    planted_at = work / "planted"
    planted_at.mkdir()
    (planted_at / "best.pt").write_bytes((work / "evil.pt").read_bytes())
    (work / "bad.yaml").write_text(TINY_TRAIN + 'teacher: {source: run, run_id: "../../planted"}\nkd: {beta: 0.5}\n')
    before = tree(tmp_path)
    result = invoke(work, ["train", "bad.yaml", "--tracking-uri", shared_store])
    error_line(result, "teacher.run_id", "../../planted")
    assert not marker.exists()
    assert tree(tmp_path) == before


def test_experiment_artifact_folder_stays_under_mlartifacts(tmp_path):
    root = tmp_path / "store" / "mlartifacts"
    for name in ("..", ".", "../x", "a/../../b"):
        location = Path(
            urllib.request.url2pathname(
                tracking.artifact_location_for(store_uri(tmp_path / "store"), name).removeprefix("file://")
            )
        )
        assert root in location.resolve().parents, (name, location)


def test_report_default_folder_stays_under_reports_whatever_the_sweep_tag_says(shared_store, tmp_path):
    """A parent run whose ``encmm.sweep_name`` tag is a path (written by anyone with access to the store)."""
    work = tmp_path / "a" / "work"
    work.mkdir(parents=True)
    uri = shared_store
    run_id = tracking.start_run(
        uri, "encmm", "planted-sweep", tags={"encmm.kind": "sweep", "encmm.sweep_name": "../../escape"}
    )
    tracking.end_run(uri, run_id, "FINISHED")
    before = tree(tmp_path)
    result = invoke(work, ["report", run_id, "--tracking-uri", uri])
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    created = tree(tmp_path) - before
    assert created, "the report wrote nothing"
    reports = Path("a", "work", "reports")
    outside = sorted(str(p) for p in created if reports not in (p, *p.parents))
    assert outside == [], outside
    folders = {p.parts[len(reports.parts)] for p in created if len(p.parts) > len(reports.parts)}
    assert len(folders) == 1 and ".." not in folders, folders
    assert (tmp_path / reports / folders.pop() / "report.md").is_file()


@pytest.mark.ray
def test_diagnose_default_folder_stays_under_diagnostics_whatever_the_model_name_says(
    ray_cluster, shared_store, tmp_path
):
    work = tmp_path / "a" / "work"
    work.mkdir(parents=True)
    features = np.random.default_rng(0).standard_normal((1, 4, 6, 8)).astype(np.float32)
    np.save(work / "feats.npy", features)
    before = tree(tmp_path)
    result = invoke(
        work,
        [
            "diagnose",
            "--features",
            "feats.npy",
            "--model",
            "../../escape",
            "--pairs",
            "2",
            "--tracking-uri",
            shared_store,
        ],
    )
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    created = tree(tmp_path) - before
    root = Path("a", "work", "diagnostics")
    outside = sorted(str(p) for p in created if root not in (p, *p.parents))
    assert outside == [], outside
    folders = {p.parts[len(root.parts)] for p in created if len(p.parts) > len(root.parts)}
    assert len(folders) == 1, folders
    assert (tmp_path / root / folders.pop() / "diagnostics.json").is_file()
