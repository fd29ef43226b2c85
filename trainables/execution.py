"""How one Ray Train run executes, and everything that changes with it: the one place that knows.

Ray Train runs the training loop either on **worker actors** (a Train controller starts one actor per DDP
rank) or in **local mode** (``ScalingConfig(num_workers=0)``): inside the calling process, which is the
Tune trial driver in a sweep or ``encmm train`` itself. The two differ in:

============  ==========================================  ============================================
              worker actors                               local mode (in process)
============  ==========================================  ============================================
resources     each actor holds ``cpus/gpus_per_worker``;  the caller holds the worker's share too
              the caller only its own share
reporting     ``ray.train.report``; in a Tune trial a      the loop calls ``report_fn`` itself
              ``TuneReportCallback`` forwards it           (``ray.tune.report`` in a trial)
callbacks     ``RunConfig`` callbacks run                 never called
checkpoints   committed by Train's controller; resumed    the loop commits ``<run_dir>/checkpoint.pt``
              from ``ray.train.get_checkpoint()``          and resumes from it
restarts      Train restarts a failed worker              none: Tune retries the trial
              (``resources.max_failures``)
rank, device  Train's context, ``get_device()``           rank 0, the engine's own device choice
============  ==========================================  ============================================

``resources.local_mode: auto`` picks local mode for one worker without GPUs in a sweep; ``encmm train``
(a lone run, no Tune above it to retry) keeps worker actors on auto so that a killed worker is restarted.

Ray-free: the sweep's resource plan and dry run read it; ``trainables.ray_worker`` builds Ray Train's
objects from it and ``orchestrator.sweep`` asks it how a trial's metrics reach Tune.
"""

from __future__ import annotations

from dataclasses import dataclass

from encmm.trainables.config import ResourcesConfig, TrainConfig

# CPUs of one Ray Data input task (``data.loader=ray_data``): one decode/augment stream, as a DataLoader worker.
INPUT_TASK_CPUS = 1.0


def free_cpus_for_input(cfg: TrainConfig) -> float:
    """CPUs a run needs free on the cluster besides what it holds. Ray Data schedules its input tasks
    (``data.loader=ray_data``) outside the run's bundles, on any node: a cluster that the runs fill completely
    never starts one, and the run waits for its first batch forever."""
    return INPUT_TASK_CPUS if cfg.data.loader == "ray_data" else 0.0


@dataclass(frozen=True)
class Execution:
    in_process: bool  # Train local mode: the loop runs in the calling process
    workers: int
    cpus_per_worker: float
    gpus_per_worker: int
    max_failures: int  # worker failures Ray Train tolerates (worker actors only)

    @classmethod
    def of(cls, resources: ResourcesConfig, *, lone_run: bool = False) -> Execution:
        """The execution ``resources`` asks for; ``lone_run`` for ``encmm train`` (no Tune retry above it)."""
        if resources.local_mode == "auto":
            in_process = not lone_run and resources.workers == 1 and not resources.use_gpu
        else:
            in_process = resources.local_mode == "on"
        return cls(
            in_process=in_process,
            workers=resources.workers,
            cpus_per_worker=resources.cpus_per_worker,
            gpus_per_worker=resources.gpus_per_worker,
            max_failures=resources.max_failures,
        )

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_worker > 0

    def worker_bundle(self) -> dict[str, float]:
        """What one Train worker holds (the caller holds it itself in local mode)."""
        bundle = {"CPU": self.cpus_per_worker}
        if self.use_gpu:
            bundle["GPU"] = self.gpus_per_worker
        return bundle

    def caller_bundle(self, own_cpus: float) -> dict[str, float]:
        """What the calling process (a Tune trial's driver) holds: ``own_cpus``, plus the worker's share
        in local mode, where no worker actor asks for it."""
        if not self.in_process:
            return {"CPU": own_cpus}
        bundle = self.worker_bundle()
        bundle["CPU"] += own_cpus
        return bundle

    def total(self, own_cpus: float) -> dict[str, float]:
        """CPUs and GPUs one run holds in all, its caller included (the same in both modes)."""
        return {"CPU": self.workers * self.cpus_per_worker + own_cpus, "GPU": self.workers * self.gpus_per_worker}

    @property
    def worker_restarts(self) -> int:
        """The ``FailureConfig.max_failures`` Ray Train applies: none in local mode (Tune retries instead)."""
        return 0 if self.in_process else self.max_failures

    @property
    def reports_through_callbacks(self) -> bool:
        """Whether the run's metrics reach Tune through Train's ``RunConfig`` callbacks (worker actors) rather
        than through the loop's own ``report_fn`` (local mode, where Train never calls them)."""
        return not self.in_process

    def describe(self) -> str:
        if self.in_process:
            return "Train local mode: the worker runs inside the driver"
        return f"{self.workers} Train worker actor(s)"
