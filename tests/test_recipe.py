"""The authors' recipe, pinned: weight-decay exemptions per remedy, both LR schedule modes against the
formula, uneven channel pooling, Lift's LayerNorm eps (issue 13, `../shared/paper.md`)."""

from __future__ import annotations

import math

import pytest
import torch

from encmm.trainables.config import KDConfig, load_train_config
from encmm.trainables.engine import fit, setup_training
from encmm.trainables.losses import DistillationLoss, pool_teacher_channels
from tests.conftest import TINY_DIGITS

TEACHER_FREE = [*TINY_DIGITS, "student.target_width=64"]


def decayed_names(remedy: str, *overrides: str) -> tuple[set[str], set[str]]:
    cfg = load_train_config(None, [*TEACHER_FREE, f"student.remedy={remedy}", "optim.weight_decay=0.05", *overrides])
    state = setup_training(cfg, device=torch.device("cpu"))
    names = {id(p): n for n, p in state.core.named_parameters()}
    decay, no_decay = set(), set()
    for group in state.optimizer.param_groups:
        (decay if group["weight_decay"] > 0 else no_decay).update(names[id(p)] for p in group["params"])
    return decay, no_decay


@pytest.mark.parametrize(
    "remedy, exempt", [("none", True), ("lift", False), ("widelast", False), ("uniformwide", False)]
)
def test_auto_weight_decay_exempts_pos_embed_and_cls_token_only_for_the_plain_baseline(remedy, exempt):
    decay, no_decay = decayed_names(remedy)
    trunk = "trunk" if remedy == "widelast" else "backbone"
    for name in (f"student.{trunk}.pos_embed", f"student.{trunk}.cls_token"):
        assert (name in no_decay) is exempt and (name in decay) is not exempt
    assert all(".bias" not in n and "norm" not in n for n in decay)  # 1-D tensors never decay (timm)
    assert any(n.endswith("qkv.weight") for n in decay)


@pytest.mark.parametrize("remedy", ["none", "lift", "widelast", "uniformwide"])
def test_explicit_weight_decay_policy_overrides_the_remedy_default(remedy):
    trunk = "trunk" if remedy == "widelast" else "backbone"
    _, no_decay = decayed_names(remedy, "optim.no_weight_decay=timm")
    assert {f"student.{trunk}.pos_embed", f"student.{trunk}.cls_token"} <= no_decay
    decay, _ = decayed_names(remedy, "optim.no_weight_decay=none")
    assert {f"student.{trunk}.pos_embed", f"student.{trunk}.cls_token"} <= decay


def authors_lr(t: float, *, base: float, warmup_lr: float, warmup: float, total: float, min_lr: float) -> float:
    """timm's CosineLRScheduler as DeiT configures it (no warm-up prefix, one cycle): linear warm-up from
    ``warmup_lr`` over ``warmup`` units, then min_lr + (base - min_lr)/2 (1 + cos(pi t / total))."""
    if t < warmup:
        return warmup_lr + t * (base - warmup_lr) / warmup
    return min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi * t / total))


SCHEDULE = [
    "schedule.epochs=8",
    "schedule.warmup_epochs=3",
    "schedule.warmup_lr=1e-6",
    "schedule.min_lr=1e-5",
    "optim.lr=1e-3",
    "optim.lr_base_batch=64",
    "data.batch_size=64",
    "student.depth=1",
]


def test_epoch_schedule_follows_the_authors_loop_one_epoch_late():
    cfg = load_train_config(None, [*TINY_DIGITS, *SCHEDULE, "schedule.step_on=epoch"])
    state = setup_training(cfg, device=torch.device("cpu"))
    kw = dict(base=cfg.optim.lr, warmup_lr=1e-6, warmup=3, total=8, min_lr=1e-5)
    used = []
    for epoch in range(cfg.schedule.epochs):  # the engine's order: train the epoch, then step(epoch)
        used.append(state.optimizer.param_groups[0]["lr"])
        state.scheduler.step(epoch)
    expected = [authors_lr(max(e - 1, 0), **kw) for e in range(8)]
    assert used == pytest.approx(expected, rel=1e-9)
    assert used[0] == used[1] == pytest.approx(1e-6)  # epochs 0-1 at warmup_lr
    assert max(used) == used[4] == pytest.approx(authors_lr(3, **kw))  # the peak one epoch after warm-up ends


def test_epoch_and_update_schedules_as_the_training_loop_applies_them():
    history: dict[str, list[dict]] = {}
    for step_on in ("epoch", "update"):
        cfg = load_train_config(
            None,
            [*TINY_DIGITS, *SCHEDULE, "schedule.epochs=4", "schedule.warmup_epochs=2", f"schedule.step_on={step_on}"],
        )
        records: list[dict] = []
        fit(cfg, log=lambda metrics, epoch: records.append(metrics))
        history[step_on] = records
    kw = dict(base=1e-3, warmup_lr=1e-6, warmup=2, total=4, min_lr=1e-5)
    epoch_lrs = [m["train/lr"] for m in history["epoch"]]  # constant within an epoch: the one it trained at
    assert epoch_lrs == pytest.approx([authors_lr(max(e - 1, 0), **kw) for e in range(4)], rel=1e-9)
    # update mode: the lr after the last step of epoch e is the formula at (e + 1) epochs' worth of updates
    update_lrs = [m["train/lr"] for m in history["update"]]
    assert update_lrs == pytest.approx([authors_lr(e + 1, **kw) for e in range(4)], rel=1e-6)


def test_epoch_schedule_resumes_at_the_lr_of_the_next_epoch(tmp_path):
    cfg = load_train_config(
        None, [*TINY_DIGITS, *SCHEDULE, "schedule.epochs=4", "schedule.warmup_epochs=2", "schedule.step_on=epoch"]
    )
    straight = fit(cfg, checkpoint_dir=tmp_path / "straight")

    class Stop(Exception):
        pass

    def stop_while_logging_epoch_1(metrics, epoch):  # epoch 1's checkpoint is committed before its log
        if epoch == 1:
            raise Stop

    with pytest.raises(Stop):
        fit(cfg, log=stop_while_logging_epoch_1, checkpoint_dir=tmp_path / "resumed")
    resumed = []
    last = fit(cfg, log=lambda metrics, epoch: resumed.append(metrics), checkpoint_dir=tmp_path / "resumed")
    kw = dict(base=1e-3, warmup_lr=1e-6, warmup=2, total=4, min_lr=1e-5)
    assert [m["epoch"] for m in resumed] == [2, 3]
    assert [m["train/lr"] for m in resumed] == pytest.approx([authors_lr(1, **kw), authors_lr(2, **kw)], rel=1e-9)
    assert last["val/acc1"] == pytest.approx(straight["val/acc1"], abs=1e-6)


def test_uneven_channel_pooling_averages_adaptive_bins():
    c_t, width = 384, 219
    tokens = torch.randn(2, 9, c_t, dtype=torch.float64)
    pooled = pool_teacher_channels(tokens, width)
    assert pooled.shape == (2, 9, width)
    for j in (0, 1, 100, 218):
        lo, hi = (j * c_t) // width, -((-(j + 1) * c_t) // width)  # floor, ceil
        torch.testing.assert_close(pooled[..., j], tokens[..., lo:hi].mean(-1))
    # equal bins when the width divides: the same as a reshape-and-mean
    torch.testing.assert_close(pool_teacher_channels(tokens, 192), tokens.reshape(2, 9, 192, 2).mean(-1))


def test_uniformwide_is_distilled_through_uneven_pooling_of_the_teacher():
    student_tokens = torch.randn(2, 4, 38)
    teacher_tokens = torch.randn(2, 4, 64)
    loss = DistillationLoss(KDConfig(beta=1.0), align="avgpool", student_width=38)
    out = loss(torch.randn(2, 3), torch.zeros(2, dtype=torch.long), student_tokens, None, teacher_tokens)
    expected = torch.nn.functional.mse_loss(student_tokens, pool_teacher_channels(teacher_tokens, 38))
    assert out["feat"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_lift_projector_layer_norm_uses_the_authors_eps():
    from encmm.trainables.models import build_student

    cfg = load_train_config(None, [*TEACHER_FREE, "student.remedy=lift"])
    model = build_student(cfg.student, num_classes=10, img_size=16, target_width=64)
    norm = model.lift[1]
    assert isinstance(norm, torch.nn.LayerNorm) and norm.eps == 1e-5
