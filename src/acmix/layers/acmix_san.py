"""SAN's self-attention module (patchwise and pairwise) and its ACmix extension.

Zhao et al., "Exploring Self-attention for Image Recognition", CVPR 2020 (arXiv 2004.13621); code hszhao/SAN
(``model/san.py``, MIT licence), read and restated, not copied. The ACmix extension follows Pan et al., "On the
Integration of Self-Attention and Convolution", CVPR 2022 (arXiv 2111.14556); no official SAN-ACmix code exists,
so the integration is this project's design (``docs/deviations.md``, section "SAN").

Deviations from hszhao/SAN:
    * the three projections conv1/conv2/conv3 are one 1 x 1 conv ``qkv`` (same numbers; official keys load through
      :func:`acmix.models.san.checkpoint_filter_fn`);
    * the reflection border is the generalised one of :mod:`acmix.ops` (identical where ``ReflectionPad2d`` is
      defined, and defined for maps smaller than the window too: the official module fails there);
    * it runs on CPU (the official aggregation is CUDA-only).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from ..ops import local_aggregate
from ..ops._checks import check_odd_kernel, is_symbolic
from ..ops._indexing import reflect_pad2d
from .acmix import position_grid
from .conv_path import ConvPathMixin

__all__ = ["ACmixSanAttention", "SanAttention"]

_SA_TYPES = ("patchwise", "pairwise")


def _windows(x: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, k*k, H, W): the reflection-bordered k x k window around every pixel, row-major."""
    b, c, h, w = x.shape
    xp = reflect_pad2d(x, kernel_size // 2)  # (B, C, H + 2p, W + 2p)
    cols = F.unfold(xp, kernel_size)  # (B, C*k*k, H*W), channel c * k*k + t
    return cols.reshape(b, c, kernel_size * kernel_size, h, w)


# one leaf node each under torch.fx (their index arithmetic branches on sizes)
torch.fx.wrap("_windows")
torch.fx.wrap("position_grid")


class SanAttention(nn.Module):
    """SAN's self-attention module (SAM), stride 1: weights from q and k, aggregation of v over a k x k window.

    Patchwise (``sa_type="patchwise"``, sa_type 1 upstream): the weights of pixel i are an MLP (``conv_w``) of q_i and
    all k_j of its window; no softmax. Pairwise (sa_type 0): the weights are an MLP of q_i - k_j and the position
    difference p_i - p_j, softmaxed over the window. Both aggregate v with :func:`acmix.ops.local_aggregate`:
    channel c of v uses weight channel ``c mod (out_dim / share_planes)``.

    Args:
        dim: input channels.
        rel_dim: width of q and k (SAN: dim / 16).
        out_dim: width of v and of the output (SAN: dim / 4).
        share_planes: how many channels share one weight channel (SAN: 8).
        kernel_size: odd window size.
        sa_type: ``"patchwise"`` or ``"pairwise"``.

    Shape:
        input (B, dim, H, W) -> output (B, out_dim, H, W).
    """

    def __init__(
        self,
        dim: int,
        rel_dim: int,
        out_dim: int,
        *,
        share_planes: int = 8,
        kernel_size: int = 7,
        sa_type: str = "patchwise",
    ) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("rel_dim", rel_dim), ("out_dim", out_dim), ("share_planes", share_planes)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        check_odd_kernel("kernel_size", kernel_size)
        if sa_type not in _SA_TYPES:
            raise ValueError(f"sa_type must be one of {_SA_TYPES}, got {sa_type!r}")
        if out_dim % share_planes:
            raise ValueError(f"out_dim ({out_dim}) must be divisible by share_planes ({share_planes})")
        self.dim, self.rel_dim, self.out_dim = dim, rel_dim, out_dim
        self.share_planes, self.kernel_size, self.sa_type = share_planes, kernel_size, sa_type
        self.weight_dim = out_dim // share_planes  # Wc: weight channels
        k2 = kernel_size * kernel_size
        # Stage I: SAN's conv1 (q), conv2 (k), conv3 (v) as one 1 x 1 conv, channels [q | k | v]
        self.qkv = nn.Conv2d(dim, 2 * rel_dim + out_dim, 1)
        if sa_type == "patchwise":
            w_in, w_mid, w_out = rel_dim * (k2 + 1), self.weight_dim, k2 * self.weight_dim
            self.conv_p: nn.Conv2d | None = None
        else:
            w_in, w_mid, w_out = rel_dim + 2, rel_dim, self.weight_dim
            self.conv_p = nn.Conv2d(2, 2, 1)
        self.conv_w = nn.Sequential(
            nn.BatchNorm2d(w_in),
            nn.ReLU(inplace=True),
            nn.Conv2d(w_in, w_mid, 1, bias=False),
            nn.BatchNorm2d(w_mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(w_mid, w_out, 1),
        )

    def extra_repr(self) -> str:
        return (
            f"{self.dim}, rel_dim={self.rel_dim}, out_dim={self.out_dim}, share_planes={self.share_planes}, "
            f"kernel_size={self.kernel_size}, sa_type={self.sa_type!r}"
        )

    def _check_input(self, x: torch.Tensor) -> None:
        if is_symbolic(x):
            return
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.dim:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{type(self).__name__} expects a (B, {self.dim}, H, W) tensor, got {got}")

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Stage I: (B, dim, H, W) -> (B, 2 rel_dim + out_dim, H, W), channels [q | k | v]."""
        if not torch.jit.is_scripting():  # eager only: TorchScript and torch.fx skip the checks
            self._check_input(x)
        return self.qkv(x)

    def attention_path(self, qkv: torch.Tensor) -> torch.Tensor:
        """SAN aggregation: (B, 2 rel_dim + out_dim, H, W) -> (B, out_dim, H, W)."""
        q, k, v = qkv.split([self.rel_dim, self.rel_dim, self.out_dim], dim=1)
        b, _, h, w = q.shape
        k2 = self.kernel_size * self.kernel_size
        k_win = _windows(k, self.kernel_size)  # (B, rel, k2, H, W)
        if self.sa_type == "patchwise":
            feats = torch.cat([q, k_win.reshape(b, -1, h, w)], 1)  # (B, rel * (1 + k2), H, W): [q | k_{c, t}]
            weight = self.conv_w(feats).reshape(b, self.weight_dim, k2, h, w)  # channel w * k2 + t
        else:
            assert self.conv_p is not None
            pos = self.conv_p(position_grid(h, w, q.dtype, q.device))  # (1, 2, H, W)
            rel_q = q.unsqueeze(2) - k_win  # (B, rel, k2, H, W): q_i - k_j
            rel_p = (pos.unsqueeze(2) - _windows(pos, self.kernel_size)).expand(b, -1, -1, -1, -1)  # (B, 2, k2, H, W)
            feats = torch.cat([rel_q, rel_p], 1).reshape(b, -1, k2 * h, w)  # (B, rel + 2, k2 * H, W)
            weight = self.conv_w(feats).reshape(b, self.weight_dim, k2, h, w).softmax(dim=2)
        return local_aggregate(v.contiguous(), weight, self.kernel_size)  # (B, out_dim, H, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention_path(self.project(x))


class ACmixSanAttention(ConvPathMixin, SanAttention):
    """SAN's self-attention module with the ACmix convolution path (this project's design, docs/deviations.md).

    Stage I is SAN's (q, k of width rel_dim, v of width out_dim). The head maps of the conv path are SAN's weight-
    sharing groups: head_dim = Wc = out_dim / share_planes, so v gives ``share_planes`` head maps and q, k give
    rel_dim / Wc each. A light FC maps these M head maps to k_c^2 maps, and a c-III group conv (out_dim x k_c^2 x
    k_c x k_c, shift-initialised, no bias) shifts and sums them on the value width. Output
    ``alpha * SAN(x) + beta * conv_path(x)`` with learnable alpha = beta = 0.5 (official ACmix init).

    Args:
        dim, rel_dim, out_dim, share_planes, kernel_size, sa_type: as :class:`SanAttention`.
        fc_bias: bias on the conv-path FC (here False, as in the official ResNet host).
        **conv_path: the other options of :meth:`acmix.layers.ConvPathMixin.init_conv_path` (``mix``, ...).

    Shape:
        input (B, dim, H, W) -> output (B, out_dim, H, W).
    """

    def __init__(
        self,
        dim: int,
        rel_dim: int,
        out_dim: int,
        *,
        share_planes: int = 8,
        kernel_size: int = 7,
        sa_type: str = "patchwise",
        fc_bias: bool = False,
        **conv_path: Any,
    ) -> None:
        super().__init__(dim, rel_dim, out_dim, share_planes=share_planes, kernel_size=kernel_size, sa_type=sa_type)
        if rel_dim % self.weight_dim:
            raise ValueError(f"rel_dim ({rel_dim}) must be divisible by out_dim / share_planes ({self.weight_dim})")
        self.head_dim = self.weight_dim
        num_maps = (2 * rel_dim + out_dim) // self.head_dim  # M head maps: 2 rel / Wc + share_planes
        self.init_conv_path(out_dim, num_maps, self.head_dim, fc_bias=fc_bias, **conv_path)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Conv-path init: default FC init, shift kernels in the group conv (Fig. 3 c-III), alpha = beta as given."""
        self.reset_conv_path()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.conv_path_repr()}, num_maps={self.num_maps}"

    def convolution_path(self, qkv: torch.Tensor) -> torch.Tensor:
        """(B, 2 rel_dim + out_dim, H, W) -> (B, out_dim, H, W)."""
        return self.convolution_maps(qkv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.project(x)
        att = self.attention_path(qkv) if self.uses_attention else None
        conv = self.convolution_path(qkv) if self.uses_convolution else None
        return self.mix_paths(att, conv)
