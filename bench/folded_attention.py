"""An experiment for the CaiT-S24 teacher's speed: talking-heads attention with the head mixing folded
into the two attention matmuls. Not used by encmm itself; ``bench_train_step.py --teacher-attention
folded`` measures it against timm's block.

timm's ``TalkingHeadAttn`` mixes the H heads of every attention entry with ``proj_l`` (before the softmax)
and ``proj_w`` (after it): Linear(H, H) layers on permuted ``[B, N, N, H]`` copies of the attention map.
On an H100 those K=H matmuls and their layout copies took ~44% of a compiled KD step (BENCHMARKS.md, 5).
Here both mixings ride inside matmuls with a larger inner dimension instead:

    S'_g  = sum_h Wl[g,h] q_h k_h^T + bl_g        = [Wl[g,0] q_0 | ... | Wl[g,H-1] q_{H-1}] @ [k_0 | ... ]^T
    out_g = sum_h Ww[g,h] P_h v_g + bw_g 1^T v_g  = [P_0 | ... | P_{H-1}] @ [Ww[g,0] v_g ; ... ] + bw_g 1^T v_g

8x the FLOPs of the two attention matmuls (inner dimension C = H*d, and H*N), about 3 TFLOP more per
step of 256 images, in exchange for no separate pass over the mixed maps.
"""

from __future__ import annotations

import torch
from timm.models.cait import TalkingHeadAttn
from torch import nn

from encmm.trainables.teacher import FusedTalkingHeadAttn, fuse_talking_heads


class FoldedTalkingHeadAttn(TalkingHeadAttn):
    """Same parameters and, in eval mode, the same function as timm's ``TalkingHeadAttn``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        h, d = self.num_heads, c // self.num_heads
        qkv = self.qkv(x).reshape(b, n, 3, h, d).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]  # [B, H, N, d]
        mix_l = self.proj_l.weight.to(q.dtype)[None, :, :, None, None]  # [1, G, H, 1, 1]
        q_mixed = (mix_l * q[:, None]).permute(0, 1, 3, 2, 4).reshape(b, h, n, c)  # [B, G, N, H*d]
        k_all = k.permute(0, 2, 1, 3).reshape(b, 1, n, c)  # [B, 1, N, H*d]
        attn = q_mixed @ k_all.transpose(-2, -1) + self.proj_l.bias.to(q.dtype)[None, :, None, None]
        attn = attn.softmax(dim=-1)  # [B, H, N, M]
        p_all = attn.permute(0, 2, 1, 3).reshape(b, 1, n, h * n)  # [B, 1, N, H*M]
        mix_w = self.proj_w.weight.to(v.dtype)[None, :, :, None, None]  # [1, G, H, 1, 1]
        v_mixed = (mix_w * v[:, :, None]).reshape(b, h, h * n, d)  # [B, G, H*M, d]
        out = p_all @ v_mixed + self.proj_w.bias.to(v.dtype)[None, :, None, None] * v.sum(2, keepdim=True)
        x = out.transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(x))


class ExpandedSdpaTalkingHeadAttn(FusedTalkingHeadAttn):
    """encmm's ``FusedTalkingHeadAttn`` as first written: the same fold into one SDPA, but with the H mixed
    queries as H heads and K, V expanded to them (stride 0) instead of stacked as rows of one head.
    Kept to measure that layout choice (bench_teacher_forward.py, variant ``fused-expanded``)."""

    def attend(self, q_mixed: torch.Tensor, k_all: torch.Tensor, v_all: torch.Tensor) -> torch.Tensor:
        b, g, n, c = q_mixed.shape
        return torch.nn.functional.scaled_dot_product_attention(
            q_mixed, k_all.expand(b, g, n, c), v_all.expand(b, g, n, c), scale=self.scale
        )


def fold_talking_heads(model: nn.Module) -> int:
    """Swap timm's talking-heads blocks in ``model`` (eval, no attention dropout) for the folded one,
    in place: same parameters, same state-dict keys. Returns how many were swapped."""
    return fuse_talking_heads(model, FoldedTalkingHeadAttn)
