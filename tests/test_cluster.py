"""A real two-node Ray cluster on this machine, started by the README's own cluster commands, tracked in a
real `mlflow server` started by the README's own server command: trials spread over the nodes, and a node
SIGKILLed mid-trial costs that trial at most its epoch in flight. With ``data.loader=ray_data``, Ray Data tasks on
one node feed the Train worker on the other.

The README's lines (section "Pointing encmm at a cluster") are read from README.md and run as written, with
only these changes for one small machine: ``<head-ip>`` is 127.0.0.1, the ports 6379 and 5000 are free ones,
``/shared`` is the test's folder; ``ray start`` also gets ``--num-cpus=1 --node-ip-address=127.0.0.1
--disable-usage-stats`` (two 1-CPU nodes on loopback; the head a free ``--dashboard-port``) and a ``RAY_TMPDIR`` of
its own, ``mlflow server``
``--workers 1``; ``encmm`` runs the test's tiny configs with the README's ``--address`` and environment (the
README's ``--set`` values ask for GPUs). Environment variables are only those the README's lines set: a README
that forgot token authentication fails here (the second node cannot join).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from test_faults import stop_server, wait_for_health
from test_sweep import TINY_BASE, write_yaml

from tests.conftest import free_port

pytestmark = [pytest.mark.ray, pytest.mark.server]
RAY = [sys.executable, "-m", "ray.scripts.scripts"]
ENCMM = [sys.executable, "-m", "encmm.orchestrator.cli"]
README = Path(__file__).resolve().parents[1] / "README.md"
RAY_PORT, MLFLOW_PORT = free_port(), free_port()


def readme_lines(heading: str) -> list[str]:
    """The commands of the first ``bash`` block after ``heading`` in the README, with the substitutions
    above (continuation lines joined, comment lines dropped)."""
    text = README.read_text()
    start = text.index("```bash", text.index(heading)) + len("```bash")
    block = text[start : text.index("```", start)].replace("\\\n", " ")
    lines = [line.strip() for line in block.splitlines() if line.strip() and not line.strip().startswith("#")]
    swap = {"<head-ip>": "127.0.0.1", ":6379": f":{RAY_PORT}", "=6379": f"={RAY_PORT}", "/shared": "{shared}"}
    swap["--port 5000"] = f"--port {MLFLOW_PORT}"
    return [re.sub("|".join(map(re.escape, swap)), lambda m: swap[m.group(0)], line) for line in lines]


def readme_command(heading: str, *starts: str) -> tuple[dict, list[str]]:
    """(environment it sets, words) of the README line under ``heading`` whose command starts with ``starts``;
    ``export`` lines before it count as its environment."""
    env: dict[str, str] = {}
    for line in readme_lines(heading):
        words = shlex.split(line, comments=True)
        if words[0] == "export":
            env.update(word.split("=", 1) for word in words[1:])
            continue
        prefix = {}
        while "=" in words[0] and not words[0].startswith("-"):
            key, value = words.pop(0).split("=", 1)
            prefix[key] = value
        if tuple(words[: len(starts)]) == starts:
            return {**env, **prefix}, words
    raise AssertionError(f"README.md has no `{' '.join(starts)}` line under {heading!r}")


CLUSTER = "**Ray cluster.**"
SERVER = "**MLflow server.**"


def cluster_processes(temp_dir: Path) -> set[int]:
    """PIDs of the Ray processes that belong to the cluster whose temp folder is ``temp_dir``."""
    found = set()
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(str(temp_dir) in part for part in proc.info["cmdline"] or ()):
                found.add(proc.info["pid"])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def kill(pids) -> None:
    for pid in pids:
        try:
            psutil.Process(pid).kill()
        except psutil.NoSuchProcess:
            pass


class TwoNodes:
    """A head and a second node of 1 CPU each, started by the README's ``ray start`` lines, in a temp folder
    of their own (so no other test's ``ray.init()`` finds them), stopped by PID (``ray stop`` would stop every
    Ray on the machine)."""

    common = ["--num-cpus=1", "--node-ip-address=127.0.0.1", "--disable-usage-stats"]

    def __init__(self):
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))  # short: Ray's socket paths are limited
        self.base_env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
        self.base_env["RAY_TMPDIR"] = str(self.temp_dir)
        self.address = f"127.0.0.1:{RAY_PORT}"
        driver_env, words = readme_command(CLUSTER, "encmm", "train")
        assert words[words.index("--address") + 1] == self.address, words
        self.env = {**self.base_env, **driver_env}  # what the README's `encmm` lines run with
        self.head: set[int] = set()
        self.second: set[int] = set()

    def ray_start(self, env: dict, words: list[str], *extra: str) -> set[int]:
        """The README's ``ray start ...`` (``words``, then ``extra``); returns the PIDs of the processes it left
        running."""
        assert words[:2] == ["ray", "start"], words
        before = cluster_processes(self.temp_dir)
        command = [*RAY, *words[1:], *self.common, *extra]
        done = subprocess.run(command, env={**self.base_env, **env}, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{shlex.join(words)} failed:\n{done.stderr[-2000:]}"
        return cluster_processes(self.temp_dir) - before

    def start_head(self) -> None:
        # A dashboard port of its own: the session's local cluster (`ray_cluster`) may hold Ray's default 8265,
        # and a head whose dashboard cannot bind starts without it (no state API: `ray.util.state` fails).
        words = readme_command(CLUSTER, "ray", "start", "--head")
        self.head = self.ray_start(*words, f"--dashboard-port={free_port()}")

    def start_second(self) -> None:
        self.second = self.ray_start(*readme_command(CLUSTER, "ray", "start", f"--address={self.address}"))

    def ensure_second(self) -> None:
        """Start the second node again if an earlier test lost it."""
        if not any(psutil.pid_exists(p) and psutil.Process(p).name() == "raylet" for p in self.second):
            self.start_second()

    @property
    def second_raylet(self) -> int:
        raylets = [p for p in self.second if psutil.pid_exists(p) and psutil.Process(p).name() == "raylet"]
        assert len(raylets) == 1, f"expected one raylet for the second node, found {raylets}"
        return raylets[0]

    def lose_second(self) -> None:
        """The second machine is gone: SIGKILL its raylet first, then every other process of that node and
        every worker its raylet started (a worker outliving its raylet would keep training over gloo)."""
        raylet = psutil.Process(self.second_raylet)
        node = {raylet.pid, *(p.pid for p in raylet.children(recursive=True))}
        for pid in self.second - node:
            try:
                node |= {pid, *(p.pid for p in psutil.Process(pid).children(recursive=True))}
            except psutil.NoSuchProcess:
                continue
        raylet.kill()
        kill(node - {raylet.pid})

    def stop(self) -> None:
        kill(cluster_processes(self.temp_dir))
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def two_nodes():
    nodes = TwoNodes()
    try:
        nodes.start_head()
        nodes.start_second()
        yield nodes
    finally:
        nodes.stop()


def test_trials_spread_over_two_nodes_and_a_lost_node_costs_at_most_the_epoch_in_flight(two_nodes, tmp_path):
    from mlflow.tracking import MlflowClient

    server, uri = start_mlflow_server(tmp_path / "shared")
    epochs = 8
    sweep_file = write_yaml(
        tmp_path / "sweep.yaml",
        {
            "name": "two-nodes",
            "max_concurrent_trials": 2,
            "base": {
                **TINY_BASE,
                "schedule": {"epochs": epochs, "warmup_epochs": 0},
                "resources": {"workers": 1, "cpus_per_worker": 0.95},  # + the driver's 0.01: one trial per node
            },
            "search": {"grid": {"optim.lr": [0.003, 0.002]}},
        },
    )
    try:
        proc = start_on_cluster(two_nodes, tmp_path, uri, "sweep", str(sweep_file))
        try:
            client = MlflowClient(uri)
            trials = wait_for_runs(client, proc, "trial", 2)
            nodes = {r.info.run_id: r.data.tags["encmm.node_id"] for r in trials}
            assert len(set(nodes.values())) == 2, "both trials ran on one node"
            two_nodes.lose_second()  # mid-trial
            _, err = proc.communicate(timeout=480)
            assert proc.returncode == 0, err[-3000:]
            assert "(raylet)" not in err, "Ray's raylet output reached the console"
        finally:
            if proc.poll() is None:
                proc.kill()

        parent_id = trials[0].data.tags["mlflow.parentRunId"]
        children = client.search_runs([trials[0].info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'")
        assert len(children) == 2 and {c.info.run_id for c in children} == set(nodes)  # one run per trial
        assert all(c.info.status == "FINISHED" for c in children)
        assert client.get_run(parent_id).info.status == "FINISHED"
        moved = [c for c in children if c.data.tags["encmm.node_id"] != nodes[c.info.run_id]]
        assert len(moved) == 1, "exactly the trial of the lost node moves"
        survivor = next(c for c in children if c.info.run_id != moved[0].info.run_id)
        assert moved[0].data.tags["encmm.node_id"] == survivor.data.tags["encmm.node_id"]  # retried on the head
        for child in children:  # resumed from its last checkpoint: every epoch logged once
            steps = [m.step for m in client.get_metric_history(child.info.run_id, "val/acc1")]
            assert sorted(steps) == list(range(epochs)), (child.info.run_id, steps)
    finally:
        stop_server(server)


def start_mlflow_server(shared: Path) -> tuple[subprocess.Popen, str]:
    """The README's ``mlflow server ...`` line with ``/shared`` = ``shared``; returns (process, tracking URI)."""
    env, words = readme_command(SERVER, "mlflow", "server")
    shared.mkdir(parents=True, exist_ok=True)
    words = [word.replace("{shared}", str(shared)) for word in words]
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", *words[1:], "--workers", "1"],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    wait_for_health(process, MLFLOW_PORT)
    return process, f"http://127.0.0.1:{MLFLOW_PORT}"


def start_on_cluster(nodes: TwoNodes, folder: Path, uri: str, *args: str) -> subprocess.Popen:
    """``encmm ARGS --address <head>`` in ``folder``, tracking into ``uri``; output captured."""
    return subprocess.Popen(
        [*ENCMM, *args, "--address", nodes.address],
        cwd=folder,
        env={**nodes.env, "MLFLOW_TRACKING_URI": uri},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def cluster_nodes(nodes: TwoNodes) -> list[dict]:
    """``ray.nodes()`` of the cluster, asked by a driver of its own (this process stays off it)."""
    code = (
        f"import json, ray\nray.init(address={nodes.address!r}, logging_level='ERROR')\nprint(json.dumps(ray.nodes()))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=nodes.env, capture_output=True, text=True, timeout=120, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def ray_log_lines(temp_dir: Path, text: str) -> list[str]:
    """Lines holding ``text`` in the log files of every node of the cluster whose temp folder is ``temp_dir``."""
    found = []
    for path in temp_dir.glob("ray/session_*/logs/*"):
        if path.is_file() and path.suffix in (".out", ".err", ".log"):
            found += [line for line in path.read_text(errors="replace").splitlines() if text in line]
    return found


def wait_for_runs(client, proc: subprocess.Popen, kind: str, count: int, timeout: float = 300) -> list:
    """The RUNNING runs tagged ``encmm.kind = kind`` once ``count`` of them have logged an epoch."""
    deadline, runs = time.time() + timeout, []
    while time.time() < deadline and len(runs) < count:
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(
                f"encmm exited {proc.returncode} before {count} {kind} run(s) trained:\n{out[-2000:]}{err[-2000:]}"
            )
        time.sleep(0.3)
        experiment = client.get_experiment_by_name("encmm")
        if experiment is not None:
            found = client.search_runs([experiment.experiment_id], f"tags.`encmm.kind` = '{kind}'")
            runs = [r for r in found if "val/acc1" in r.data.metrics and r.info.status == "RUNNING"]
    assert len(runs) == count, f"{count} {kind} run(s) did not train at once"
    return runs


def test_ddp_run_spanning_both_nodes_resumes_when_the_lost_node_comes_back(two_nodes, tmp_path):
    """`encmm train` with 2 DDP workers (gloo), one per node; the second node is lost mid-epoch and a new
    one joins: Ray Train restarts the worker group on it and resumes from the last committed epoch."""
    from mlflow.tracking import MlflowClient

    two_nodes.ensure_second()
    server, uri = start_mlflow_server(tmp_path / "shared")
    epochs = 20  # ~14 s of training: the node is lost right after the first epoch, mid-run
    config = write_yaml(
        tmp_path / "ddp.yaml",
        {
            **TINY_BASE,
            "name": "ddp-two-nodes",
            "schedule": {"epochs": epochs, "warmup_epochs": 0},
            "resources": {"workers": 2, "cpus_per_worker": 1, "max_failures": 3},  # one worker per node
        },
    )
    try:
        proc = start_on_cluster(two_nodes, tmp_path, uri, "train", str(config))
        try:
            client = MlflowClient(uri)
            (run,) = wait_for_runs(client, proc, "train", 1)
            two_nodes.lose_second()
            time.sleep(3)
            two_nodes.start_second()  # capacity comes back
            out, err = proc.communicate(timeout=480)
            assert proc.returncode == 0, err[-3000:]
            resumed = ray_log_lines(two_nodes.temp_dir, "encmm: resuming ddp-two-nodes at epoch")
            assert resumed, "the worker group did not resume from a checkpoint"  # in the workers' logs
            assert "[ddp-two-nodes]: workers restarted; resumed at epoch " in err, err[-3000:]  # and the console
        finally:
            if proc.poll() is None:
                proc.kill()
        run = client.get_run(run.info.run_id)
        assert run.info.status == "FINISHED" and run.data.params["resources.workers"] == "2"
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val/acc1")]
        assert sorted(steps) == list(range(epochs)), steps  # resumed from the last committed epoch
    finally:
        stop_server(server)


def test_diagnose_sharded_over_both_nodes_gives_the_numbers_of_one_node(two_nodes, ray_cluster, tmp_path):
    """`encmm diagnose --workers 2 --address <head>`: one shard worker per node (1 CPU each), tracked into a
    real mlflow server; the same command on the session's one-node local cluster gives the same diagnostics."""
    from mlflow.tracking import MlflowClient
    from test_diagnose import assert_same_numbers, diagnose

    two_nodes.ensure_second()
    overrides = ("img_size=32", "patch_size=8", "depth=2")
    model = ["--model", "vit_tiny_patch16_224", *(f"--model-arg={a}" for a in overrides)]
    args = ["diagnose", *model, "--images-per-class", "3", "--batch-size", "4", "--pairs", "20", "--workers", "2"]
    server, uri = start_mlflow_server(tmp_path / "shared")
    try:
        proc = start_on_cluster(two_nodes, tmp_path, uri, *args, "--out", "two-nodes")
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name("encmm")
        (run,) = client.search_runs([experiment.experiment_id], "tags.`encmm.kind` = 'diagnose'")
        assert run.info.status == "FINISHED" and run.data.tags["encmm.workers"] == "2"
        alive = {n["NodeID"] for n in cluster_nodes(two_nodes) if n["Alive"]}
        assert set(run.data.tags["encmm.worker_nodes"].split(",")) == alive and len(alive) == 2  # both nodes
    finally:
        stop_server(server)
    one, _ = diagnose(args[1:], f"sqlite:///{tmp_path / 'one.db'}", tmp_path / "one-node")  # in this process
    two = json.loads((tmp_path / "two-nodes" / "diagnostics.json").read_text())
    assert two["num_images"] == 30 and len(two["layers"]) == 2
    assert_same_numbers(two, one)  # integer ranks identical, floats to round-off


RAY_DATA_PLACEMENT = """
import json, ray
from ray.util.state import list_actors, list_tasks
ray.init(address={address!r}, logging_level="ERROR")
workers = {{a.actor_id: a.node_id for a in list_actors(filters=[("class_name", "=", "RayTrainWorker")], limit=10000)}}
tasks = {{t.task_id: t.node_id for t in list_tasks(limit=10000) if "load_samples" in t.name}}  # any attempt, state
print(json.dumps({{"workers": workers, "tasks": tasks}}))
"""


def ray_data_placement(nodes: TwoNodes) -> dict[str, dict[str, str]]:
    """{"workers": {actor id: node id}, "tasks": {task id: node id}} of every Train worker actor and Ray Data
    ``load_samples`` task the cluster has a record of (dead ones and earlier tests' included)."""
    code = RAY_DATA_PLACEMENT.format(address=nodes.address)
    done = subprocess.run(
        [sys.executable, "-c", code], env=nodes.env, capture_output=True, text=True, timeout=120, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_ray_data_tasks_on_one_node_feed_the_train_worker_on_the_other(two_nodes, tmp_path):
    """`encmm train` with ``data.loader=ray_data`` on a JPEG ImageFolder: the one Train worker takes the only CPU
    of its node, so every Ray Data task (read, decode, augment) must run on the other node; Ray's task records
    say where each ran, and the run ends FINISHED."""
    from mlflow.tracking import MlflowClient
    from test_deit_recipe import write_jpeg_folder

    two_nodes.ensure_second()
    write_jpeg_folder(tmp_path / "images", classes=2, train=16, val=4)
    config = write_yaml(
        tmp_path / "ray-data.yaml",
        {
            **TINY_BASE,
            "name": "ray-data-two-nodes",
            "data": {"name": "imagefolder", "root": str(tmp_path / "images"), "img_size": 16, "batch_size": 8},
            "resources": {"workers": 1, "cpus_per_worker": 1},  # the whole of one node
        },
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # both nodes are this machine: no server needed
    before = ray_data_placement(two_nodes)  # earlier tests' Train workers (the DDP test's on both nodes)
    proc = start_on_cluster(two_nodes, tmp_path, uri, "train", str(config), "--set", "data.loader=ray_data")
    try:
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("encmm").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["data.loader"] == "ray_data"
    after = ray_data_placement(two_nodes)
    workers = {after["workers"][a] for a in set(after["workers"]) - set(before["workers"])}
    tasks = [after["tasks"][t] for t in set(after["tasks"]) - set(before["tasks"])]
    (worker_node,) = workers  # this run's one Train worker
    # One epoch of 32 train and 8 val images: at least one task for each split, every one placed on a node.
    assert len(tasks) >= 2 and None not in tasks, tasks
    assert worker_node not in tasks, "a Ray Data task ran on the Train worker's node"
