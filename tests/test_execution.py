"""The one seam between Ray Train's two execution modes: what each holds, how it reports and restarts."""

from __future__ import annotations

import pytest

from encmm.trainables.config import ResourcesConfig
from encmm.trainables.execution import Execution


def test_one_cpu_worker_in_a_sweep_runs_in_the_trial_driver_holding_the_workers_share():
    execution = Execution.of(ResourcesConfig(workers=1, cpus_per_worker=1.5))
    assert execution.in_process
    assert execution.caller_bundle(0.01) == {"CPU": pytest.approx(1.51)}
    assert execution.total(0.01) == {"CPU": pytest.approx(1.51), "GPU": 0}
    # Tune retries the trial; Train restarts nothing and calls no RunConfig callbacks in local mode.
    assert execution.worker_restarts == 0 and not execution.reports_through_callbacks


def test_a_lone_run_keeps_a_worker_actor_on_auto_so_train_restarts_a_killed_worker():
    execution = Execution.of(ResourcesConfig(workers=1, max_failures=3), lone_run=True)
    assert not execution.in_process
    assert execution.worker_restarts == 3 and execution.reports_through_callbacks
    assert execution.caller_bundle(0.01) == {"CPU": 0.01}


def test_ddp_and_gpu_runs_use_worker_actors_with_the_same_total_as_local_mode():
    ddp = Execution.of(ResourcesConfig(workers=4, cpus_per_worker=2, gpus_per_worker=1))
    assert not ddp.in_process
    assert ddp.worker_bundle() == {"CPU": 2, "GPU": 1}
    assert ddp.caller_bundle(0.5) == {"CPU": 0.5}
    assert ddp.total(0.5) == {"CPU": 8.5, "GPU": 4}
    gpu_local = Execution.of(ResourcesConfig(gpus_per_worker=1, local_mode="on"))
    assert gpu_local.in_process and gpu_local.caller_bundle(0.5) == {"CPU": 1.5, "GPU": 1}
    assert gpu_local.total(0.5) == {"CPU": 1.5, "GPU": 1}


@pytest.mark.parametrize("setting, in_process", [("on", True), ("off", False)])
def test_an_explicit_local_mode_wins_over_auto_in_both_callers(setting, in_process):
    for lone_run in (False, True):
        assert Execution.of(ResourcesConfig(local_mode=setting), lone_run=lone_run).in_process is in_process
