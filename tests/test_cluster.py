"""A real two-node Ray cluster on this machine (`ray start` twice, loopback only, token auth as Ray 2.60's head
turns it on), tracked in a real `mlflow server` as the README tells cluster users to: trials spread over the
nodes, and a node SIGKILLed mid-trial costs that trial at most its epoch in flight."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from test_faults import free_port, start_mlflow_server, stop_server
from test_sweep import TINY_BASE, write_yaml

pytestmark = [pytest.mark.ray, pytest.mark.server]
RAY = [sys.executable, "-m", "ray.scripts.scripts"]
ENCMM = [sys.executable, "-m", "encmm.orchestrator.cli"]


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


@pytest.fixture(scope="module")
def two_nodes():
    """A head and a second node of 1 CPU each, in a temp folder of their own (so no other test's
    ``ray.init()`` finds them), stopped by PID afterwards (``ray stop`` would stop every Ray on the machine)."""
    temp_dir = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))  # short: Ray's socket paths have a length limit
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=str(temp_dir), RAY_AUTH_MODE="token")
    port = free_port()
    common = ["--num-cpus=1", "--node-ip-address=127.0.0.1", "--disable-usage-stats"]
    before = cluster_processes(temp_dir)
    try:
        subprocess.run(
            [*RAY, "start", "--head", f"--port={port}", "--include-dashboard=false", *common],
            env=env,
            check=True,
            capture_output=True,
            timeout=120,
        )
        head = cluster_processes(temp_dir) - before
        subprocess.run(
            [*RAY, "start", f"--address=127.0.0.1:{port}", *common],
            env=env,
            check=True,
            capture_output=True,
            timeout=120,
        )
        second = cluster_processes(temp_dir) - head - before
        raylets = [p for p in second if "raylet" in " ".join(psutil.Process(p).cmdline()[:1])]
        assert len(raylets) == 1, f"expected one raylet for the second node, found {raylets}"
        yield {"address": f"127.0.0.1:{port}", "env": env, "second_raylet": raylets[0]}
    finally:
        kill(cluster_processes(temp_dir))
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_trials_spread_over_two_nodes_and_a_lost_node_costs_at_most_the_epoch_in_flight(two_nodes, tmp_path):
    from mlflow.tracking import MlflowClient

    port = free_port()
    server = start_mlflow_server(tmp_path / "store", port)
    uri = f"http://127.0.0.1:{port}"
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
        proc = subprocess.Popen(
            [*ENCMM, "sweep", str(sweep_file), "--address", two_nodes["address"]],
            cwd=tmp_path,
            env={**two_nodes["env"], "MLFLOW_TRACKING_URI": uri},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            client = MlflowClient(uri)
            trials = wait_for_training_trials(client, proc, 2)
            nodes = {r.info.run_id: r.data.tags["encmm.node_id"] for r in trials}
            assert len(set(nodes.values())) == 2, "both trials ran on one node"
            os.kill(two_nodes["second_raylet"], 9)  # the second node is lost mid-trial
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


def wait_for_training_trials(client, proc: subprocess.Popen, count: int, timeout: float = 300) -> list:
    """The sweep's RUNNING trial runs once ``count`` of them have logged an epoch."""
    deadline, trials = time.time() + timeout, []
    while time.time() < deadline and len(trials) < count:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(1)
        experiment = client.get_experiment_by_name("encmm")
        if experiment is not None:
            runs = client.search_runs([experiment.experiment_id], "tags.`encmm.kind` = 'trial'")
            trials = [r for r in runs if "val/acc1" in r.data.metrics and r.info.status == "RUNNING"]
    assert len(trials) == count, f"{count} trials did not train at once"
    return trials
