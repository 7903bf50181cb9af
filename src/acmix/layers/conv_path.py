"""The ACmix convolution path and the alpha/beta mix, written once for every host layer.

Pan et al., "On the Integration of Self-Attention and Convolution", CVPR 2022 (arXiv 2111.14556), Sec. 4 and
Fig. 2 (c): after the shared Stage I projections, a light FC maps the head maps to k_c^2 maps, a shift-and-sum
(Fig. 3, as a group convolution in the official code) aggregates them like a k_c x k_c convolution, and the output is
``alpha * attention + beta * convolution``.

:class:`ConvPathMixin` gives a host layer (``nn.Module``) these parameters under flat names, so official and earlier
acmix checkpoints keep their keys: ``fc`` (the FC, a 1 x 1 conv M -> k_c^2), ``shift_weight`` (the group-conv
kernel) or the non-persistent ``shift_buffer`` (fixed shift kernels), ``alpha`` and ``beta``. The host computes its
Stage I head maps in its own way and calls :meth:`ConvPathMixin.convolution_maps` and
:meth:`ConvPathMixin.mix_paths`. Hosts: :class:`acmix.ACmix` (ResNet), :class:`acmix.layers.ACmixSanAttention`,
:class:`acmix.layers.ACmixSpatialReductionAttention` (PVT), :class:`acmix.layers.ACmixWindowAttention` (Swin).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from ..ops import conv_path_maps, shift_kernels
from ..ops._checks import check_odd_kernel
from ..ops._reference import conv_path_features, shift_sum_reference
from ..ops.conv_path import resolve_conv_impl
from ..types import CONV_IMPLS, MIX_MODES, SHIFT_ALIASES, SHIFT_MODES, ConvImpl, MixMode, ShiftMode

__all__ = ["ConvPathMixin"]


def _check_choice(name: str, value: object, valid: tuple[str, ...], extra: str = "") -> None:
    if value not in valid:
        raise ValueError(f"{name} must be one of {valid}{extra}, got {value!r}")


class ConvPathMixin:
    """Convolution path (Fig. 2 bottom, Fig. 3) + alpha/beta mix (Fig. 2 (c)) for an ``nn.Module`` host layer.

    Call :meth:`init_conv_path` in the host's ``__init__`` (after ``nn.Module.__init__``) and
    :meth:`reset_conv_path` (or :meth:`reset_shift_and_mix` after the host's own ``fc.reset_parameters()``) in its
    initialisation.

    Options (the same names on every host):
        conv_kernel_size: odd k_c (official 3).
        fc_bias: bias on the FC (official ResNet code: no; official Swin code: yes).
        shift_mode: Fig. 3 variant: ``"tensor"`` (a), ``"fixed"`` (b), ``"frozen"`` (c-I), ``"learnable"`` (c-II)
            or ``"group"`` (c-III, the official code); aliases ``a, b, c1, c2, c3``.
        shift_init: initialise learnable kernels as shift kernels (the paper); False: Kaiming normal (fan_out).
        mix: ``"learned"`` alpha/beta (official), ``"fixed"`` alpha/beta, ``"attn"`` or ``"conv"`` (one path).
        alpha_init, beta_init: initial (or fixed) alpha and beta; official 0.5 each.
        conv_impl: ``"fused"``, ``"reference"`` or ``"auto"``/``None`` (:func:`acmix.ops.conv_path_maps`;
            ``None`` also follows :func:`acmix.ops.use_backend`).
    """

    if TYPE_CHECKING:  # for mypy only: TorchScript reads class annotations and cannot parse these strings
        fc: nn.Conv2d
        shift_weight: nn.Parameter | None
        alpha: torch.Tensor
        beta: torch.Tensor
        shift_buffer: torch.Tensor

    def init_conv_path(
        self,
        dim_out: int,
        num_maps: int,
        head_dim: int,
        *,
        conv_kernel_size: int = 3,
        fc_bias: bool = False,
        shift_mode: ShiftMode | str = "group",
        shift_init: bool = True,
        mix: MixMode | str = "learned",
        alpha_init: float = 0.5,
        beta_init: float = 0.5,
        conv_impl: ConvImpl | str | None = None,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        """Create the FC, the shift kernel and alpha/beta (uninitialised: call :meth:`reset_conv_path`).

        Args:
            dim_out: output channels C_out of the path; a multiple of ``head_dim``.
            num_maps: M, the number of head maps the host stacks (3N for q/k/v with N heads).
            head_dim: channels per head map (the group convolution's number of groups).
            the rest: see the class docstring.
        """
        assert isinstance(self, nn.Module), "ConvPathMixin needs an nn.Module host"
        check_odd_kernel("conv_kernel_size", conv_kernel_size)
        shift_mode = SHIFT_ALIASES.get(str(shift_mode).lower(), str(shift_mode))
        _check_choice("shift_mode", shift_mode, SHIFT_MODES, " (or a, b, c1, c2, c3)")
        _check_choice("mix", mix, MIX_MODES)
        if conv_impl is not None:
            _check_choice("conv_impl", conv_impl, CONV_IMPLS)
        if head_dim < 1 or dim_out % head_dim:
            raise ValueError(f"conv path output channels ({dim_out}) must be a multiple of head_dim ({head_dim})")
        self.conv_dim_out, self.num_maps, self.conv_head_dim = dim_out, num_maps, head_dim
        self.conv_kernel_size, self.fc_bias = conv_kernel_size, fc_bias
        self.shift_mode, self.shift_init, self.mix = shift_mode, shift_init, str(mix)
        self.alpha_init, self.beta_init, self.conv_impl = alpha_init, beta_init, conv_impl
        k, k2 = conv_kernel_size, conv_kernel_size * conv_kernel_size
        dd = {"device": device, "dtype": dtype}
        # light FC M -> k_c^2 (Fig. 2), shared over the head_dim channels and the pixels
        self.fc = nn.Conv2d(num_maps, k2, 1, bias=fc_bias, **dd)
        if shift_mode == "group":  # c-III: one kernel per output channel
            self.shift_weight = nn.Parameter(torch.empty(dim_out, k2, k, k, **dd))
        elif shift_mode in ("learnable", "frozen"):  # c-I / c-II: one kernel per group, shared by its outputs
            self.shift_weight = nn.Parameter(
                torch.empty(head_dim, k2, k, k, **dd), requires_grad=shift_mode == "learnable"
            )
        else:
            self.shift_weight = None
        if shift_mode == "fixed":
            self.register_buffer("shift_buffer", torch.empty(1, k2, k, k, **dd), persistent=False)
        if self.mix == "learned":
            self.alpha = nn.Parameter(torch.empty(1, **dd))
            self.beta = nn.Parameter(torch.empty(1, **dd))
        elif self.mix == "fixed":
            self.register_buffer("alpha", torch.empty(1, **dd))
            self.register_buffer("beta", torch.empty(1, **dd))

    def reset_shift_and_mix(self) -> None:
        """Shift kernels (or Kaiming normal with ``shift_init=False``) and alpha/beta at their initial values."""
        kernels = shift_kernels(self.conv_kernel_size)  # (k2, k, k)
        with torch.no_grad():
            if self.shift_weight is not None:
                if self.shift_init or not self.shift_weight.requires_grad:
                    self.shift_weight.copy_(kernels.expand_as(self.shift_weight))
                else:
                    nn.init.kaiming_normal_(self.shift_weight, mode="fan_out", nonlinearity="relu")
            if self.shift_mode == "fixed":
                buf = self.get_buffer("shift_buffer")  # type: ignore[attr-defined]
                buf.copy_(kernels.unsqueeze(0))
            if self.mix in ("learned", "fixed"):
                self.alpha.fill_(self.alpha_init)
                self.beta.fill_(self.beta_init)

    def reset_conv_path(self) -> None:
        """PyTorch's default FC init, then :meth:`reset_shift_and_mix` (the official initialisation)."""
        self.fc.reset_parameters()
        self.reset_shift_and_mix()

    def conv_path_repr(self) -> str:
        """The path's options for ``extra_repr``."""
        return f"conv_kernel_size={self.conv_kernel_size}, shift_mode={self.shift_mode!r}, mix={self.mix!r}"

    @property
    def uses_attention(self) -> bool:
        """Whether the output depends on the attention path (every mix but ``"conv"``)."""
        return self.mix != "conv"

    @property
    def uses_convolution(self) -> bool:
        """Whether the output depends on the convolution path (every mix but ``"attn"``)."""
        return self.mix != "attn"

    def resolved_conv_impl(self) -> str:
        """The implementation the convolution path runs here and now: ``"fused"`` or ``"reference"``."""
        return resolve_conv_impl(
            self.conv_impl, self.num_maps, self.conv_head_dim, self.conv_dim_out, self.conv_kernel_size
        )

    def group_weight(self) -> torch.Tensor | None:
        """The effective Fig. 3 c-III kernel (C_out, k^2, k, k), output channel d * (C_out / head_dim) + j.

        ``None`` for ``shift_mode="tensor"`` (literal shifts, no kernel).
        """
        copies = self.conv_dim_out // self.conv_head_dim
        weight = self.shift_weight
        if self.shift_mode == "group":
            return weight
        if self.shift_mode == "learnable" or self.shift_mode == "frozen":
            assert weight is not None
            return weight.repeat_interleave(copies, dim=0)
        if hasattr(self, "shift_buffer"):  # "fixed" (hasattr: TorchScript resolves it when it compiles)
            return self.shift_buffer.expand(self.conv_dim_out, -1, -1, -1)
        return None

    def convolution_maps(self, maps: torch.Tensor, stride: int = 1, order: str = "maps") -> torch.Tensor:
        """The convolution path on the host's stacked head maps.

        Shape:
            maps (B, M * head_dim, H, W), channel m * head_dim + d (``order="maps"``) or d * M + m
            (``order="groups"``) -> (B, C_out, ceil(H / stride), ceil(W / stride)), channel d * (C_out / head_dim) + j
            (the official group-major order).
        """
        fc_w = self.fc.weight.reshape(self.fc.weight.shape[0], -1)  # (k2, M)
        gw = self.group_weight()
        if gw is None:  # Fig. 3 (a): literal tensor shifts of the FC maps
            if order == "groups":
                b, c, h, w = maps.shape
                maps = maps.reshape(b, self.conv_head_dim, -1, h, w).transpose(1, 2).reshape(b, c, h, w)
            f = conv_path_features(maps, self.conv_head_dim, fc_w, self.fc.bias)  # (B, D * k2, H, W)
            return shift_sum_reference(f, self.conv_kernel_size, self.conv_dim_out // self.conv_head_dim, stride)
        return conv_path_maps(
            maps, self.conv_head_dim, fc_w, gw, self.fc.bias, stride, impl=self.conv_impl, order=order
        )

    def mix_paths(self, att: torch.Tensor | None, conv: torch.Tensor | None) -> torch.Tensor:
        """``alpha * att + beta * conv`` (Fig. 2 (c)); with ``mix="attn"``/``"conv"`` the one path that is used."""
        if self.mix == "attn":
            assert att is not None
            return att
        if self.mix == "conv":
            assert conv is not None
            return conv
        assert att is not None and conv is not None
        return self.alpha.to(att.dtype) * att + self.beta.to(conv.dtype) * conv
