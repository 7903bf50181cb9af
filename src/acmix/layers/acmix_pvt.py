"""PVT v1's spatial-reduction attention (SRA) and its ACmix extension.

Wang et al., "Pyramid Vision Transformer: A Versatile Backbone for Dense Prediction without Convolutions", ICCV 2021
(arXiv 2102.12122); code whai362/PVT ``classification/pvt.py`` (Apache-2.0), read and restated, not copied. The ACmix
extension follows Pan et al., "On the Integration of Self-Attention and Convolution", CVPR 2022 (arXiv 2111.14556);
no official PVT-ACmix code exists, so the integration is this project's design (docs/deviations.md, section "PVT").

Deviations from whai362/PVT: none in the arithmetic (``F.scaled_dot_product_attention`` computes the same softmax
attention); prefix tokens (the stage-4 cls token) are only allowed with ``sr_ratio == 1``, as upstream implies.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from ..ops import cell_upsample
from ..ops._checks import is_symbolic
from .conv_path import ConvPathMixin

__all__ = ["ACmixSpatialReductionAttention", "SpatialReductionAttention"]

torch.fx.wrap("cell_upsample")  # one leaf node under torch.fx (its index arithmetic needs int sizes)


class SpatialReductionAttention(nn.Module):
    """PVT's SRA: q from every token, k and v from a map reduced by a ratio x ratio strided conv + LayerNorm.

    Args:
        dim: token channels.
        num_heads: attention heads (head-major channels, c = head * head_dim + d).
        sr_ratio: spatial reduction ratio of keys and values (1: none).
        qkv_bias: bias of the q and kv projections.
        attn_drop: dropout on the attention weights.
        proj_drop: dropout after the output projection.

    Shape:
        x (B, P + H * W, dim) tokens (P prefix tokens first, then the H x W map row-major) -> same shape.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        *,
        sr_ratio: int = 1,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        if not isinstance(sr_ratio, int) or sr_ratio < 1:
            raise ValueError(f"sr_ratio must be a positive int, got {sr_ratio!r}")
        self.dim, self.num_heads, self.head_dim, self.sr_ratio = dim, num_heads, dim // num_heads, sr_ratio
        self.scale = self.head_dim**-0.5
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.sr: nn.Conv2d | None = None
        self.norm: nn.LayerNorm | None = None
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)  # upstream: default eps (1e-5), unlike the blocks' 1e-6

    def extra_repr(self) -> str:
        return f"{self.dim}, num_heads={self.num_heads}, sr_ratio={self.sr_ratio}"

    def _check(self, x: torch.Tensor, feat_size: tuple[int, int], num_prefix_tokens: int) -> None:
        if is_symbolic(x):
            return
        h, w = feat_size
        if x.dim() != 3 or x.shape[1] != num_prefix_tokens + h * w or x.shape[2] != self.dim:
            raise ValueError(f"expected tokens (B, {num_prefix_tokens} + {h}*{w}, {self.dim}), got {tuple(x.shape)}")
        if num_prefix_tokens and self.sr_ratio > 1:
            raise ValueError("prefix (cls) tokens need sr_ratio == 1 (the PVT cls-token stage has no reduction)")
        if self.sr_ratio > 1 and (h < self.sr_ratio or w < self.sr_ratio):
            raise ValueError(f"the {h}x{w} map is smaller than the reduction ratio {self.sr_ratio}")

    def project(
        self, x: torch.Tensor, feat_size: tuple[int, int], num_prefix_tokens: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Stage I: q (B, heads, N, hd) from all N tokens; k, v (B, heads, N', hd) from the reduced map."""
        if not torch.jit.is_scripting():  # eager only: TorchScript and torch.fx skip the checks
            self._check(x, feat_size, num_prefix_tokens)
        b, n, c = x.shape
        q = self.q(x).reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # (B, heads, N, hd)
        if self.sr is not None:
            assert self.norm is not None
            x_ = x.transpose(1, 2).reshape(b, c, feat_size[0], feat_size[1])  # (B, C, H, W)
            x = self.norm(self.sr(x_).flatten(2).transpose(1, 2))  # (B, N', C), N' = (H // r) * (W // r)
        kv = self.kv(x).reshape(b, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (2, B, h, N', hd)
        return q, kv[0], kv[1]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Softmax attention (B, heads, N, hd) x (B, heads, N', hd) x 2 -> projected tokens (B, N, dim)."""
        b, _, n, _ = q.shape
        out = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0, scale=self.scale
        )  # (B, heads, N, hd)
        return self.proj(out.transpose(1, 2).reshape(b, n, self.dim))

    def forward(self, x: torch.Tensor, feat_size: tuple[int, int], num_prefix_tokens: int = 0) -> torch.Tensor:
        q, k, v = self.project(x, feat_size, num_prefix_tokens)
        return self.proj_drop(self.attend(q, k, v))


class ACmixSpatialReductionAttention(ConvPathMixin, SpatialReductionAttention):
    """SRA with the ACmix convolution path (this project's design, docs/deviations.md section "PVT").

    The conv path of Fig. 2 runs at full resolution on the Stage I features that SRA already computes: q at full
    resolution, and k, v from the reduced map, each full-resolution pixel taking the k, v of the reduction cell it
    fell into (:func:`acmix.ops.cell_upsample`). A light FC maps the 3N head maps to k_c^2 maps and a c-III group
    conv (dim x k_c^2 x k_c x k_c, shift-initialised, no bias) shifts and sums them (:func:`acmix.ops.conv_path`).
    Output ``proj_drop(alpha * proj(attention) + beta * conv_path)`` as in the official Swin-ACmix; prefix tokens
    have no neighbourhood, their conv-path output is zero.

    Args:
        dim, num_heads, sr_ratio, qkv_bias, attn_drop, proj_drop: as :class:`SpatialReductionAttention`.
        fc_bias: bias on the conv-path FC (here True, as in the official transformer host).
        **conv_path: the other options of :meth:`acmix.layers.ConvPathMixin.init_conv_path` (``mix``, ...).

    Shape:
        x (B, P + H * W, dim) -> same shape.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        *,
        sr_ratio: int = 1,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        fc_bias: bool = True,
        **conv_path: Any,
    ) -> None:
        super().__init__(dim, num_heads, sr_ratio=sr_ratio, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.init_conv_path(dim, 3 * num_heads, self.head_dim, fc_bias=fc_bias, **conv_path)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Conv-path init as the official Swin-ACmix: default FC init, shift kernels kept, alpha/beta as given."""
        self.reset_conv_path()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.conv_path_repr()}"

    def _head_map(self, t: torch.Tensor, num_prefix_tokens: int, size: tuple[int, int]) -> torch.Tensor:
        """(B, heads, P + h w, hd) -> (B, heads * hd, h, w): channel head * hd + d (head-major, as conv_path wants)."""
        return t[:, :, num_prefix_tokens:].transpose(2, 3).reshape(t.shape[0], self.dim, size[0], size[1])

    def convolution_path(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, feat_size: tuple[int, int], num_prefix_tokens: int
    ) -> torch.Tensor:
        """q (B, heads, P + H W, hd), k, v (B, heads, P + H' W', hd) -> (B, H W, dim) spatial tokens."""
        h, w = feat_size
        hr, wr = (h // self.sr_ratio, w // self.sr_ratio) if self.sr is not None else (h, w)
        p = num_prefix_tokens
        q_map = self._head_map(q, p, (h, w))
        k_map = cell_upsample(self._head_map(k, p, (hr, wr)), (h, w), self.sr_ratio)  # (B, C, H, W)
        v_map = cell_upsample(self._head_map(v, p, (hr, wr)), (h, w), self.sr_ratio)
        out = self.convolution_maps(torch.cat([q_map, k_map, v_map], 1))  # (B, C, H, W)
        return out.flatten(2).transpose(1, 2)  # (B, H W, C)

    def forward(self, x: torch.Tensor, feat_size: tuple[int, int], num_prefix_tokens: int = 0) -> torch.Tensor:
        q, k, v = self.project(x, feat_size, num_prefix_tokens)
        att = self.attend(q, k, v) if self.uses_attention else None  # (B, P + H W, C)
        conv: torch.Tensor | None = None
        if self.uses_convolution:
            conv = self.convolution_path(q, k, v, feat_size, num_prefix_tokens)  # (B, H W, C)
            if num_prefix_tokens > 0:
                conv = F.pad(conv, (0, 0, num_prefix_tokens, 0))  # prefix tokens: no neighbourhood, conv path 0
        return self.proj_drop(self.mix_paths(att, conv))
