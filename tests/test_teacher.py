"""A frozen CaiT teacher with fused talking-heads attention computes timm's function (CPU, fp32)."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from timm.models.cait import TalkingHeadAttn

from encmm.trainables.config import load_train_config
from encmm.trainables.engine import setup_training
from encmm.trainables.teacher import FrozenTeacher, FusedTalkingHeadAttn, fuse_talking_heads
from tests.conftest import TINY_DIGITS


def full_scale_mixing(module: torch.nn.Module, seed: int) -> None:
    """timm initialises CaiT's head mixing near zero and its layer scale at 1e-5, which would hide a wrong
    attention branch; draw them at full scale instead."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if name.endswith(("proj_l.weight", "proj_w.weight", "proj_l.bias", "proj_w.bias")):
            p.data = torch.randn(p.shape, generator=g) * 0.5
        elif "gamma" in name:
            p.data = torch.ones_like(p)


@pytest.mark.parametrize("dim,heads,tokens", [(32, 4, 17), (96, 8, 50), (48, 3, 5)])
def test_fused_block_computes_timms_talking_heads_attention(dim, heads, tokens):
    torch.manual_seed(0)
    block = TalkingHeadAttn(dim, num_heads=heads, qkv_bias=True).eval()
    full_scale_mixing(block, seed=1)
    fused = copy.deepcopy(block)
    assert fuse_talking_heads(fused) == 1 and type(fused) is FusedTalkingHeadAttn
    x = torch.randn(3, tokens, dim)
    with torch.no_grad():
        expected, got = block(x), fused(x)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def tiny_cait() -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(
        "cait_xxs24_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=4, num_classes=7
    ).eval()
    full_scale_mixing(model, seed=2)
    return model


def frozen(model: torch.nn.Module) -> FrozenTeacher:
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    return FrozenTeacher(model, -1, student_mean=mean, student_std=std, teacher_mean=mean, teacher_std=std)


def test_fused_cait_teacher_gives_timms_logits_and_tokens_with_the_same_state_dict():
    reference = tiny_cait()
    model = copy.deepcopy(reference)
    assert fuse_talking_heads(model) == 3  # the 3 self-attention blocks; class attention is timm's SDPA already
    assert model.state_dict().keys() == reference.state_dict().keys()
    x = torch.randn(4, 3, 32, 32)
    expected_logits, expected_tokens = frozen(reference)(x)
    logits, tokens = frozen(model)(x)
    assert tokens.shape == expected_tokens.shape == (4, 16, 32)
    assert (tokens - expected_tokens).norm() / expected_tokens.norm() < 1e-5
    assert (logits - expected_logits).norm() / expected_logits.norm() < 1e-5
    assert (tokens - frozen(model)(torch.randn(4, 3, 32, 32))[1]).norm() > 0.1 * tokens.norm()  # input matters


def test_models_without_talking_heads_are_left_alone():
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2)
    before = [type(m) for m in vit.modules()]
    assert fuse_talking_heads(vit) == 0 and [type(m) for m in vit.modules()] == before


def cait_teacher_config(fused_attention: str):
    return load_train_config(
        None,
        [
            *TINY_DIGITS,
            "teacher.source=timm",
            "teacher.model=cait_xxs24_224",
            "teacher.pretrained=false",
            f"teacher.fused_attention={fused_attention}",
            "kd.alpha=0.5",
            "kd.beta=0",
        ],
    )


@pytest.mark.parametrize("setting,fused", [("on", True), ("auto", False), ("off", False)])  # auto: on CUDA only
def test_training_setup_fuses_a_cait_teacher_as_configured(setting, fused):
    state = setup_training(cait_teacher_config(setting), device=torch.device("cpu"))
    kinds = {type(m) for m in state.teacher.modules() if isinstance(m, TalkingHeadAttn)}
    assert kinds == ({FusedTalkingHeadAttn} if fused else {TalkingHeadAttn})


def test_bfloat16_teacher_weights_give_the_float32_teachers_outputs_to_bf16_precision():
    """``teacher.dtype: bfloat16``: the frozen CaiT keeps bf16 weights; without autocast its input is cast to them,
    under bf16 autocast they are used as they are; both give the float32 teacher's logits and tokens to bf16
    precision (8 mantissa bits: a few parts in a thousand per op)."""
    reference = frozen(tiny_cait())
    teacher = frozen(copy.deepcopy(reference.model)).cast_weights(torch.bfloat16)
    assert {p.dtype for p in teacher.parameters()} == {torch.bfloat16}
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = reference(x)
        plain = teacher(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = teacher(x)
    for got in (plain, autocast):
        for value, want in zip(got, expected):
            assert value.dtype == torch.bfloat16
            error = (value.float() - want).norm() / want.norm()
            assert 0 < error < 3e-2, error  # not bit-equal (bf16 did run), but close


def test_engine_keeps_the_teacher_in_bfloat16_when_asked_and_trains():
    """``teacher.dtype=bfloat16`` reaches the set-up: the teacher's weights are bf16 and a KD step runs."""
    from encmm.trainables.engine import train_one_epoch

    cfg = load_train_config(
        None,
        [
            *TINY_DIGITS,
            "teacher.source=timm",
            "teacher.model=vit_tiny_patch16_224",
            "teacher.pretrained=false",
            "teacher.img_size=16",
            "student.patch_size=16",  # the teacher's 1x1 token grid
            "teacher.dtype=bfloat16",
            "kd.alpha=0.0",  # a timm teacher keeps its 1,000-class head: feature KD only
            "kd.beta=1.0",
            "student.projector=avgpool",
        ],
    )
    state = setup_training(cfg, device=torch.device("cpu"))
    assert {p.dtype for p in state.teacher.parameters()} == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in state.core.parameters())
    metrics = train_one_epoch(state, 0)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))


def test_the_training_core_refuses_a_teacher_whose_token_grid_differs_from_the_students():
    """Feature KD compares the maps token by token: a 1x1 teacher grid against the student's 4x4 would broadcast
    in the loss and train on nonsense. encmm train / sweep refuse it in their preflight; engine.fit (the Python
    API) refuses it at set-up, before any step."""
    from encmm.trainables.engine import fit

    overrides = [
        *TINY_DIGITS,
        "teacher.source=timm",
        "teacher.model=vit_tiny_patch16_224",
        "teacher.pretrained=false",
        "teacher.img_size=16",
        "kd.alpha=0.0",
        "student.projector=avgpool",
    ]
    steps = []
    with pytest.raises(ValueError, match=r"teacher token grid \(1, 1\) cannot be matched to the student's \(4, 4\)"):
        fit(load_train_config(None, [*overrides, "kd.beta=1.0"]), log=lambda metrics, step: steps.append(step))
    assert steps == []
