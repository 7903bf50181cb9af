"""The convolution path of ACmix: light FC over the 3N head maps, then shift-and-sum as a group convolution.

Two implementations with identical results: ``"reference"`` (FC, permute, group conv: the official order of
operations) and ``"fused"`` (the FC and the group conv are both linear, so they compose into a single
k_c x k_c grouped convolution from the 3C stacked q/k/v channels, paper.md section 8; the composed weight is
rebuilt every call so training stays exact).

The fused path needs the 3C channels in grouped order (``d * 3N + t * N + j``). :func:`conv_path` copies q, k, v
into that order; a layer can skip the copy by permuting its projection weight with :func:`grouped_qkv_order` and
feeding the one grouped map to :func:`conv_path_grouped` and, as strided views (:func:`split_grouped_qkv`), to
the attention path: no layout copy, and autograd saves the 3C map once for both paths.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _checks
from ._reference import conv_path_reference

CONV_PATH_IMPLS = ("fused", "reference")

__all__ = [
    "CONV_PATH_IMPLS",
    "compose_weight",
    "conv_path",
    "conv_path_grouped",
    "grouped_qkv_order",
    "split_grouped_qkv",
]


def compose_weight(fc_weight: torch.Tensor, group_weight: torch.Tensor) -> torch.Tensor:
    """Compose the FC (k2, 3N) and the group conv (C, k2, k, k) into one grouped-conv weight (C, 3N, k, k).

    W[o, m] = sum_i group_weight[o, i] * fc[i, m]: input channel m = t * N + j of group d (t in q, k, v; j the head).
    """
    fc = fc_weight.reshape(fc_weight.shape[0], -1)  # (k2, 3N)
    return torch.einsum("oixy,im->omxy", group_weight, fc.to(group_weight.dtype))


def conv_path_grouped(
    x: torch.Tensor,
    weight: torch.Tensor,
    num_heads: int,
    fc_bias: torch.Tensor | None,
    group_weight: torch.Tensor,
    stride: int,
) -> torch.Tensor:
    """The fused conv path on q/k/v already stacked in grouped order: one grouped conv (+ the exact FC-bias map).

    Shape: x (B, 3C, H, W), channel d * 3N + t * N + j; weight (C, 3N, k, k) from :func:`compose_weight`;
    returns (B, C, ceil(H / stride), ceil(W / stride)).
    """
    b, c3, h, w = x.shape
    c, kc = c3 // 3, weight.shape[-1]
    out = F.conv2d(x, weight.to(x.dtype), None, stride=stride, padding=kc // 2, groups=c // num_heads)
    if fc_bias is not None:
        # the FC bias enters every in-bounds tap of the group conv: a (1, C, Ho, Wo) map, exact at the border
        wb = torch.einsum("oixy,i->oxy", group_weight.to(x.dtype), fc_bias.to(x.dtype)).unsqueeze(1)  # (C, 1, k, k)
        ones = torch.ones(1, 1, h, w, dtype=x.dtype, device=x.device)
        out = out + F.conv2d(ones.expand(1, c, h, w), wb, None, stride=stride, padding=kc // 2, groups=c)
    return out


def grouped_qkv_order(num_heads: int, head_dim: int, device: torch.device | None = None) -> torch.Tensor:
    """Channel permutation (3C,) from the projection order [q | k | v] to the grouped order of the fused conv path.

    ``x_grouped = x[:, perm]`` where ``x`` is (B, 3C, H, W) with channel ``t * C + j * D + d`` (t in q, k, v; j the
    head; d in head_dim) and ``x_grouped`` has channel ``d * 3N + t * N + j``, the order
    :func:`conv_path_grouped` wants. Applied to the *weight* of the 1 x 1 projection (``weight[perm]``,
    ``bias[perm]``: 3C x C_in numbers), the projection writes the grouped order directly, so the conv path needs no
    layout copy of the 3C-channel map.
    """
    c = num_heads * head_dim
    d = torch.arange(head_dim, device=device).view(head_dim, 1, 1)
    t = torch.arange(3, device=device).view(1, 3, 1)
    j = torch.arange(num_heads, device=device).view(1, 1, num_heads)
    return (t * c + j * head_dim + d).reshape(-1)  # index d * 3N + t * N + j holds t * C + j * D + d


def split_grouped_qkv(x: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v of the attention path as strided *views* of the grouped-order projection (no copy).

    Shape: x (B, 3C, H, W), channel ``d * 3N + t * N + j`` -> three (B, N, D, H, W) views. The ``triton``
    local-attention backend reads them in place; with :func:`conv_path_grouped` reading ``x`` itself, autograd
    keeps one 3C-channel map for both paths.
    """
    b, c3, h, w = x.shape
    head_dim = c3 // (3 * num_heads)
    parts = x.view(b, head_dim, 3, num_heads, h, w).unbind(2)  # each (B, D, N, H, W)
    q, k, v = (p.transpose(1, 2) for p in parts)  # (B, N, D, H, W)
    return q, k, v


def _conv_path_fused(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    num_heads: int,
    fc_weight: torch.Tensor,
    fc_bias: torch.Tensor | None,
    group_weight: torch.Tensor,
    stride: int,
) -> torch.Tensor:
    b, c, h, w = q.shape
    hd = c // num_heads
    weight = compose_weight(fc_weight, group_weight.to(q.dtype))  # (C, 3N, kc, kc)
    if _channels_last_like(q):
        # one copy straight into channels_last (B, H, W, D, 3, N): the grouped conv then runs NHWC, no conversions
        parts = [t.permute(0, 2, 3, 1).reshape(b, h, w, num_heads, hd).transpose(3, 4) for t in (q, k, v)]
        x = torch.stack(parts, 4).reshape(b, h, w, 3 * c).permute(0, 3, 1, 2)  # channel d*3N + t*N + j
    else:
        x = torch.stack([q, k, v], 1).reshape(b, 3, num_heads, hd, h, w)  # (B, 3, N, D, H, W)
        x = x.permute(0, 3, 1, 2, 4, 5).reshape(b, 3 * c, h, w)  # (B, 3C, H, W): channel d*3N + t*N + j
    return conv_path_grouped(x, weight, num_heads, fc_bias, group_weight, stride)


def _channels_last_like(t: torch.Tensor) -> bool:
    """Channels are t's fastest dimension (a channels_last tensor or a channel slice of one), with C > 1."""
    return t.shape[1] > 1 and t.stride(1) == 1 and t.stride(3) >= t.shape[1]


def conv_path(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    num_heads: int,
    fc_weight: torch.Tensor,
    group_weight: torch.Tensor,
    fc_bias: torch.Tensor | None = None,
    stride: int = 1,
    impl: str = "fused",
) -> torch.Tensor:
    """ACmix Stage II convolution path (Fig. 2 bottom; Fig. 3 (c-III) shift as group convolution).

    Args:
        q, k, v: the Stage I projections, channels head-major (c = head * head_dim + d).
        num_heads: N; head_dim = C / N.
        fc_weight: (k_c^2, 3N) or (k_c^2, 3N, 1, 1): the light FC, shared over head_dim and pixels.
        group_weight: (C, k_c^2, k_c, k_c): group conv with groups = head_dim, output channel d * N + j.
        fc_bias: optional (k_c^2,) FC bias (the Swin code has one, the ResNet code does not).
        stride: stride of the group convolution (zero padding k_c // 2).
        impl: ``"fused"`` (default, one grouped conv) or ``"reference"``.

    Shape:
        q, k, v: (B, C, H, W) -> (B, C, ceil(H / stride), ceil(W / stride)).
    """
    if impl not in CONV_PATH_IMPLS:
        raise ValueError(f"unknown conv path impl {impl!r}; valid: {', '.join(CONV_PATH_IMPLS)}")
    if q.dim() != 4:
        raise ValueError(f"q must be a 4-D tensor (B, C, H, W), got {tuple(q.shape)}")
    _checks.check_float("q", q)
    _checks.check_same("k", k, q)
    _checks.check_same("v", v, q)
    _checks.check_stride(stride)
    c = q.shape[1]
    if c % num_heads:
        raise ValueError(f"channels ({c}) must be divisible by num_heads ({num_heads})")
    kc = group_weight.shape[-1]
    if group_weight.dim() != 4 or group_weight.shape != (c, kc * kc, kc, kc):
        raise ValueError(
            f"group_weight must be (C, k^2, k, k) = ({c}, {kc * kc}, {kc}, {kc}), got {tuple(group_weight.shape)}"
        )
    if fc_weight.reshape(fc_weight.shape[0], -1).shape != (kc * kc, 3 * num_heads):
        raise ValueError(f"fc_weight must be (k^2, 3N) = ({kc * kc}, {3 * num_heads}), got {tuple(fc_weight.shape)}")
    fn = _conv_path_fused if impl == "fused" else conv_path_reference
    return fn(q, k, v, num_heads, fc_weight, fc_bias, group_weight, stride)
