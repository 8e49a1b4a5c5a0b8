"""int8 dynamic quantisation of an image tower, attention projections included.

`torch.ao.quantization.quantize_dynamic` converts plain `nn.Linear` layers only. A ViT block keeps
its attention projections inside `nn.MultiheadAttention` (a packed in-projection parameter and a
non-quantisable out-projection): a third of the block's weights would stay fp32. They are moved
into `LinearSelfAttention` first (same weights, same arithmetic in fp32), then everything is
quantised. ViT-B-32 on an AVX2 CPU: faster than quantising the MLPs alone, image vectors within
cosine 0.9996 of fp32 (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn.functional as F


class LinearSelfAttention(torch.nn.Module):
    """The self-attention of an `nn.MultiheadAttention`, its projections as plain `nn.Linear`."""

    def __init__(self, mha: torch.nn.MultiheadAttention) -> None:
        super().__init__()
        d = mha.embed_dim
        self.heads, self.batch_first = mha.num_heads, mha.batch_first
        self.in_proj = torch.nn.Linear(d, 3 * d)
        self.in_proj.weight.data, self.in_proj.bias.data = mha.in_proj_weight.data, mha.in_proj_bias.data
        self.out_proj = torch.nn.Linear(d, d)
        self.out_proj.weight.data, self.out_proj.bias.data = mha.out_proj.weight.data, mha.out_proj.bias.data

    @staticmethod
    def fits(mha: object) -> bool:
        """A plain multi-head attention this class reproduces exactly (no extra biases or kdim/vdim)."""
        return (
            isinstance(mha, torch.nn.MultiheadAttention) and mha._qkv_same_embed_dim
            and mha.in_proj_bias is not None and mha.out_proj.bias is not None
            and mha.bias_k is None and not mha.add_zero_attn
        )

    def forward(self, q, k, v, need_weights: bool = False, attn_mask=None):
        if k is not q or v is not q or need_weights:
            raise RuntimeError("LinearSelfAttention computes self-attention only, without weights")
        x = q if self.batch_first else q.transpose(0, 1)
        n, length, d = x.shape
        qkv = self.in_proj(x).view(n, length, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=attn_mask)
        out = self.out_proj(out.transpose(1, 2).reshape(n, length, d))
        return (out if self.batch_first else out.transpose(0, 1)), None


def unpack_attention(tower: torch.nn.Module) -> int:
    """Replace the self-attention of `tower`'s transformer blocks by `LinearSelfAttention`, in place."""
    done = 0
    for block in getattr(getattr(tower, "transformer", None), "resblocks", []):
        if LinearSelfAttention.fits(getattr(block, "attn", None)):
            block.attn = LinearSelfAttention(block.attn)
            done += 1
    return done


def quantize_int8(visual: torch.nn.Module) -> torch.nn.Module:
    """A copy of `visual` with every Linear layer (attention included) dynamically quantised to int8."""
    tower = copy.deepcopy(visual)
    unpack_attention(tower)
    with warnings.catch_warnings():  # torch.ao.quantization is deprecated in favour of torchao
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(tower, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
