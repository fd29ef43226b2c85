"""The training core, in-process: no Ray, no MLflow."""

from __future__ import annotations

import pytest
import torch

from encmm.trainables.config import load_train_config
from encmm.trainables.engine import fit
from tests.conftest import TINY_DIGITS


def tiny_config(*overrides: str):
    return load_train_config(
        None,
        [
            *TINY_DIGITS,
            "data.batch_size=32",
            "schedule.warmup_epochs=0",
            "optim.lr=3e-3",
            "schedule.min_lr=1e-3",
            "optim.lr_base_batch=64",
            *overrides,
        ],
    )


def test_two_epoch_digits_run_raises_val_accuracy():
    history = []
    fit(tiny_config("schedule.epochs=2"), log=lambda metrics, step: history.append(metrics))
    assert [m["epoch"] for m in history] == [0, 1]
    assert history[1]["val/acc1"] > history[0]["val/acc1"]
    assert history[1]["val/acc1"] > 15.0  # chance is 10% on 10 balanced classes


def test_resumed_run_matches_uninterrupted_run_exactly(tmp_path):
    cfg = tiny_config("schedule.epochs=3", "data.augment=shift", "student.drop_path=0.1")
    straight = fit(cfg, checkpoint_dir=tmp_path / "straight")

    class Interrupt(Exception):
        pass

    def crash_at_epoch_1(metrics, step):
        if step == 1:
            raise Interrupt  # epoch 1 trained and checkpointed: metrics are logged only after the checkpoint

    with pytest.raises(Interrupt):
        fit(cfg, log=crash_at_epoch_1, checkpoint_dir=tmp_path / "resumed")
    saved = torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)
    assert saved["epoch"] == 1
    resumed_history = []
    resumed = fit(cfg, log=lambda m, s: resumed_history.append(s), checkpoint_dir=tmp_path / "resumed")
    assert resumed_history == [2]  # epochs 0 and 1 were not trained again
    for key in ("train/loss", "val/loss", "val/acc1"):
        assert resumed[key] == pytest.approx(straight[key], rel=1e-6, abs=1e-9), key


def test_each_epochs_random_streams_come_from_seed_rank_and_epoch_alone():
    """What a resume relies on (no RNG state in the checkpoint) and what DDP needs (ranks never share a stream):
    Python, NumPy and torch draws after ``seed_epoch`` depend on (seed, rank, epoch) only, and differ when any
    of them does, also between seed s, rank r + 1 and seed s + 1, rank r (seed + rank would make those equal)."""
    import random

    import numpy as np

    from encmm.trainables.engine import seed_epoch

    def draws(seed, rank, epoch):
        seed_epoch(seed, rank, epoch)
        return (random.random(), float(np.random.rand()), torch.rand(1).item())

    first = draws(3, 1, 2)
    torch.rand(100), random.random(), np.random.rand(7)  # whatever the streams drew in between
    assert draws(3, 1, 2) == first
    others = [draws(3, 0, 2), draws(3, 1, 1), draws(3, 1, 3), draws(4, 1, 2), draws(4, 0, 2), draws(3, 2, 2)]
    assert len({first, *others}) == 7
    assert all(a != b for other in others for a, b in zip(first, other))


@pytest.fixture(scope="module")
def teacher_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("teacher")
    fit(tiny_config("schedule.epochs=1", "student.width=64", "student.head_dim=16"), checkpoint_dir=folder)
    return folder / "best.pt"


@pytest.mark.parametrize(
    "remedy,feature_loss,alpha", [("none", "mse", 0.0), ("lift", "fft", 0.9), ("widelast", "mse", 0.9)]
)
def test_student_distils_from_an_encmm_teacher_checkpoint(teacher_checkpoint, remedy, feature_loss, alpha):
    history = []
    fit(
        tiny_config(
            "schedule.epochs=1",
            f"student.remedy={remedy}",
            f"kd.feature_loss={feature_loss}",
            f"kd.alpha={alpha}",
            "kd.beta=1.0",
            "teacher.source=checkpoint",
            f"teacher.checkpoint={teacher_checkpoint}",
        ),
        log=lambda m, s: history.append(m),
    )
    metrics = history[-1]
    assert metrics["train/feat"] > 0
    assert ("train/kl" in metrics) == (alpha > 0)
    expected = (1 - alpha) * metrics["train/ce"] + metrics["train/feat"] + alpha * metrics.get("train/kl", 0.0)
    assert metrics["train/loss"] == pytest.approx(expected, rel=1e-4)


def test_avgpool_alignment_trains_without_a_projector(teacher_checkpoint):
    history = []
    fit(
        tiny_config(
            "schedule.epochs=1",
            "kd.beta=1.0",
            "student.projector=avgpool",
            "teacher.source=checkpoint",
            f"teacher.checkpoint={teacher_checkpoint}",
        ),
        log=lambda m, s: history.append(m),
    )
    assert history[-1]["train/feat"] > 0


def test_checkpoint_loads_with_weights_only_and_holds_the_full_state(tmp_path):
    fit(tiny_config("schedule.epochs=1", "optim.ema_decay=0.9"), checkpoint_dir=tmp_path)
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "ema", "epoch", "spec", "config"} <= set(ckpt)
    assert ckpt["spec"]["num_classes"] == 10 and ckpt["spec"]["params_inference"] > 0


def _rank_streams(rank: int, world_size: int, port: int, out: dict) -> None:
    """One DDP rank (gloo, CPU): set up a 2-epoch digits run, record its student's weights, then run its epochs
    from 0 and again from 1 (a resume), recording each epoch's first draws from the RNGs that augmentation,
    random erasing and drop-path use (the epoch's training itself is left out)."""
    import random

    import numpy as np
    import torch.distributed as dist

    from encmm.trainables import engine

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        state = engine.setup_training(
            tiny_config("data.augment=shift", "schedule.epochs=2"), device=engine.resolve_device(0)
        )
        weights = torch.cat([p.detach().flatten() for p in state.core.student.parameters()])
        draws = []
        engine.train_one_epoch = lambda state, epoch: (
            draws.append((epoch, torch.rand(4), random.random(), float(np.random.rand()))) or {"train/loss": 0.0}
        )
        engine.run_epochs(state, 0)
        engine.run_epochs(state, 1)
        out[rank] = (weights, draws)
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_start_from_the_same_student_but_draw_their_own_augmentation_streams():
    """Identical initial weights (DDP's starting point), but each rank its own crops, shifts, erasing boxes and
    drop-path masks for its different images, epoch by epoch, and a run resumed at epoch 1 draws on each rank
    what that rank drew at epoch 1 (restoring one saved RNG state on every rank made the ranks share one)."""
    import torch.multiprocessing as mp

    from tests.conftest import free_port

    port, world_size = free_port(), 2
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank_streams, args=(world_size, port, out), nprocs=world_size, join=True)
        (w0, draws0), (w1, draws1) = out[0], out[1]
    assert torch.equal(w0, w1)
    for draws in (draws0, draws1):
        assert [epoch for epoch, *_ in draws] == [0, 1, 1]
        (_, t_a, r_a, n_a), (_, t_b, r_b, n_b), (_, t_resumed, r_resumed, n_resumed) = draws
        assert torch.equal(t_resumed, t_b) and r_resumed == r_b and n_resumed == n_b
        assert not torch.equal(t_a, t_b) and r_a != r_b
    for (_, t0, r0, n0), (_, t1, r1, n1) in zip(draws0, draws1):
        assert not torch.equal(t0, t1) and r0 != r1 and n0 != n1
