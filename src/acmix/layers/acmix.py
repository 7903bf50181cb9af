"""The ACmix layer for convolutional hosts (ResNet / SAN): the module that replaces a k x k convolution.

Pan et al., "On the Integration of Self-Attention and Convolution", CVPR 2022 (arXiv 2111.14556). Follows the
official ResNet operator (LeapLabTHU/ACmix ``ResNet/test_bottleneck.py``, Apache-2.0) numerically; written anew.

Deviations from the official code (all in ``docs/deviations.md``): q/k/v are one fused 1 x 1 conv (same numbers,
official state dicts load through a key mapping); feature maps of any size work (generalised reflection border);
odd maps with stride 2 give ceil(H / 2); any odd ``conv_kernel_size``; half precision and any device work.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..ops import conv_path, local_attention, shift_kernels, shift_sum_reference
from ..ops._checks import check_odd_kernel, check_stride
from ..ops._reference import conv_path_features
from ..types import SHIFT_ALIASES, MixMode, ShiftMode

_SHIFT_MODES = ("tensor", "fixed", "frozen", "learnable", "group")
_MIX_MODES = ("learned", "fixed", "attn", "conv")


def position_grid(h: int, w: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The official coordinate map (1, 2, H, W): channel 0 is linspace(-1, 1) over W, channel 1 over H."""
    loc_w = torch.linspace(-1.0, 1.0, w, dtype=dtype, device=device).expand(h, w)
    loc_h = torch.linspace(-1.0, 1.0, h, dtype=dtype, device=device).unsqueeze(1).expand(h, w)
    return torch.stack([loc_w, loc_h]).unsqueeze(0)


class ACmix(nn.Module):
    """ACmix: shared 1 x 1 projections, then a local self-attention path and a shift/convolution path.

    Output = alpha * attention(q, k, v) + beta * conv_path(q, k, v) (Fig. 2 (c)).

    Args:
        dim: input channels.
        dim_out: output channels (default ``dim``); must be divisible by ``num_heads``.
        stride: spatial stride (queries and the group conv are strided; projections run at input resolution,
            as in the official code).
        num_heads: N heads; head_dim = dim_out / N.
        attn_kernel_size: odd attention window k_att (official 7).
        conv_kernel_size: odd conv-path kernel k_c (official 3; any odd size works here).
        qkv_bias: bias on the q/k/v projections (official: yes).
        fc_bias: bias on the conv-path FC (ResNet code: no; Swin code: yes).
        use_rel_pos: the official linear relative position term (``conv_p``); off gives plain local attention.
        shift_mode: Fig. 3 variant of the shift: ``"tensor"`` (a), ``"fixed"`` (b), ``"frozen"`` (c-I),
            ``"learnable"`` (c-II) or ``"group"`` (c-III, official). Aliases ``a, b, c1, c2, c3`` accepted.
        shift_init: initialise learnable group-conv kernels as shift kernels (paper); ``False`` applies
            ``kaiming_normal_(fan_out, relu)`` as the official ResNet model does to every conv.
        mix: ``"learned"`` alpha/beta (official), ``"fixed"`` alpha/beta, ``"attn"`` attention path only or
            ``"conv"`` convolution path only.
        alpha_init, beta_init: initial (or fixed) alpha and beta; official 0.5 each.
        backend: local attention backend (``None``: automatic, see :func:`acmix.ops.available_backends`).
        conv_impl: ``"fused"`` (one grouped conv, default) or ``"reference"`` (FC, permute, group conv).

    Shape:
        input (B, dim, H, W) -> output (B, dim_out, ceil(H / stride), ceil(W / stride)), NCHW (channels_last ok).
    """

    def __init__(
        self,
        dim: int,
        dim_out: int | None = None,
        *,
        stride: int = 1,
        num_heads: int = 4,
        attn_kernel_size: int = 7,
        conv_kernel_size: int = 3,
        qkv_bias: bool = True,
        fc_bias: bool = False,
        use_rel_pos: bool = True,
        shift_mode: ShiftMode | str = "group",
        shift_init: bool = True,
        mix: MixMode | str = "learned",
        alpha_init: float = 0.5,
        beta_init: float = 0.5,
        backend: str | None = None,
        conv_impl: str = "fused",
    ) -> None:
        super().__init__()
        dim_out = dim if dim_out is None else dim_out
        for name, value in (("dim", dim), ("dim_out", dim_out), ("num_heads", num_heads)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if dim_out % num_heads:
            raise ValueError(f"dim_out ({dim_out}) must be divisible by num_heads ({num_heads})")
        check_odd_kernel("attn_kernel_size", attn_kernel_size)
        check_odd_kernel("conv_kernel_size", conv_kernel_size)
        check_stride(stride)
        shift_mode = SHIFT_ALIASES.get(str(shift_mode).lower(), shift_mode)
        if shift_mode not in _SHIFT_MODES:
            raise ValueError(f"shift_mode must be one of {_SHIFT_MODES} (or a, b, c1, c2, c3), got {shift_mode!r}")
        if mix not in _MIX_MODES:
            raise ValueError(f"mix must be one of {_MIX_MODES}, got {mix!r}")
        if conv_impl not in ("fused", "reference"):
            raise ValueError(f"conv_impl must be 'fused' or 'reference', got {conv_impl!r}")
        self.dim, self.dim_out, self.stride, self.num_heads = dim, dim_out, stride, num_heads
        self.head_dim = dim_out // num_heads
        self.attn_kernel_size, self.conv_kernel_size = attn_kernel_size, conv_kernel_size
        self.shift_mode, self.shift_init, self.mix = str(shift_mode), shift_init, str(mix)
        self.alpha_init, self.beta_init = alpha_init, beta_init
        self.backend, self.conv_impl = backend, conv_impl
        k2 = conv_kernel_size * conv_kernel_size

        # Stage I: the three 1 x 1 projections, fused into one conv (channels [q | k | v]).
        self.qkv = nn.Conv2d(dim, 3 * dim_out, 1, bias=qkv_bias)
        # official relative position term: conv_p on a 2-channel coordinate map
        self.pos_proj = nn.Conv2d(2, self.head_dim, 1) if use_rel_pos else None
        # Stage II conv path: light FC 3N -> k_c^2 (Fig. 2), then the shift as a group conv (Fig. 3)
        self.fc = nn.Conv2d(3 * num_heads, k2, 1, bias=fc_bias)
        shape_full = (dim_out, k2, conv_kernel_size, conv_kernel_size)  # c-III
        shape_shared = (self.head_dim, k2, conv_kernel_size, conv_kernel_size)  # c-I / c-II
        self.shift_weight: nn.Parameter | None
        if shift_mode == "group":
            self.shift_weight = nn.Parameter(torch.empty(shape_full))
        elif shift_mode in ("learnable", "frozen"):
            self.shift_weight = nn.Parameter(torch.empty(shape_shared), requires_grad=shift_mode == "learnable")
        else:
            self.shift_weight = None
        if shift_mode == "fixed":
            self.register_buffer(
                "shift_buffer", torch.empty(1, k2, conv_kernel_size, conv_kernel_size), persistent=False
            )
        if mix in ("learned", "fixed"):
            if mix == "learned":
                self.alpha = nn.Parameter(torch.empty(1))
                self.beta = nn.Parameter(torch.empty(1))
            else:
                self.register_buffer("alpha", torch.empty(1))
                self.register_buffer("beta", torch.empty(1))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Official init: default conv init for projections and FC, shift kernels (or Kaiming), alpha = beta = 0.5."""
        self.qkv.reset_parameters()
        self.fc.reset_parameters()
        if self.pos_proj is not None:
            self.pos_proj.reset_parameters()
        kernels = shift_kernels(self.conv_kernel_size)  # (k2, k, k)
        if self.shift_weight is not None:
            with torch.no_grad():
                if self.shift_init or not self.shift_weight.requires_grad:
                    self.shift_weight.copy_(kernels.expand_as(self.shift_weight))
                else:
                    nn.init.kaiming_normal_(self.shift_weight, mode="fan_out", nonlinearity="relu")
        if self.shift_mode == "fixed":
            self._buffer("shift_buffer").copy_(kernels.unsqueeze(0))
        if self.mix in ("learned", "fixed"):
            with torch.no_grad():
                self.alpha.fill_(self.alpha_init)
                self.beta.fill_(self.beta_init)

    def _buffer(self, name: str) -> torch.Tensor:
        buf = self.get_buffer(name)
        assert isinstance(buf, torch.Tensor)
        return buf

    def extra_repr(self) -> str:
        return (
            f"{self.dim}, {self.dim_out}, stride={self.stride}, num_heads={self.num_heads}, "
            f"attn_kernel_size={self.attn_kernel_size}, conv_kernel_size={self.conv_kernel_size}, "
            f"shift_mode={self.shift_mode!r}, mix={self.mix!r}"
        )

    def group_weight(self) -> torch.Tensor | None:
        """The effective Fig. 3 c-III kernel (dim_out, k^2, k, k), output channel d * N + j; None for ``"tensor"``."""
        if self.shift_mode == "group":
            return self.shift_weight
        if self.shift_mode in ("learnable", "frozen"):
            assert self.shift_weight is not None
            return self.shift_weight.repeat_interleave(self.num_heads, dim=0)
        if self.shift_mode == "fixed":
            return self._buffer("shift_buffer").expand(self.dim_out, -1, -1, -1)
        return None

    def rel_pos(self, h: int, w: int, like: torch.Tensor) -> torch.Tensor | None:
        """The position map (head_dim, H, W) that enters the logits as q_i . (p_i - p_j); None when disabled."""
        if self.pos_proj is None:
            return None
        grid = position_grid(h, w, self.pos_proj.weight.dtype, like.device)  # (1, 2, H, W)
        return self.pos_proj(grid)[0].to(like.dtype)  # (head_dim, H, W)

    def _check_input(self, x: Any) -> None:
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"ACmix expects a torch.Tensor (B, {self.dim}, H, W), got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"ACmix expects a 4-D NCHW tensor (B, {self.dim}, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != self.dim:
            raise ValueError(f"ACmix expects {self.dim} input channels, got {x.shape[1]} (shape {tuple(x.shape)})")
        if not torch.is_floating_point(x):
            raise ValueError(f"ACmix expects a floating-point input, got dtype {x.dtype}")
        if x.shape[0] < 1 or x.shape[2] < 1 or x.shape[3] < 1:
            raise ValueError(f"ACmix expects a non-empty input, got shape {tuple(x.shape)}")
        if x.device != self.qkv.weight.device:
            raise ValueError(f"ACmix input is on {x.device} but the layer's parameters are on {self.qkv.weight.device}")

    def attention_path(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) x 3 -> (B, C, Ho, Wo), channel head * head_dim + d."""
        b, c, h, w = q.shape
        n, d = self.num_heads, self.head_dim
        out = local_attention(
            q.reshape(b, n, d, h, w),
            k.reshape(b, n, d, h, w),
            v.reshape(b, n, d, h, w),
            kernel_size=self.attn_kernel_size,
            stride=self.stride,
            rel_pos=self.rel_pos(h, w, q),
            backend=self.backend,
        )  # (B, N, D, Ho, Wo)
        return out.reshape(b, c, out.shape[-2], out.shape[-1])

    def convolution_path(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) x 3 -> (B, C, Ho, Wo), channel d * N + j (the official group-major order)."""
        fc_w = self.fc.weight.reshape(self.fc.weight.shape[0], -1)  # (k2, 3N)
        if self.shift_mode == "tensor":
            f = conv_path_features(q, k, v, self.num_heads, fc_w, self.fc.bias)  # (B, D*k2, H, W)
            return shift_sum_reference(f, self.conv_kernel_size, self.num_heads, self.stride)
        gw = self.group_weight()
        assert gw is not None
        return conv_path(q, k, v, self.num_heads, fc_w, gw, self.fc.bias, self.stride, impl=self.conv_impl)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        q, k, v = self.qkv(x).chunk(3, dim=1)  # Stage I: (B, C, H, W) each
        if self.mix == "attn":
            return self.attention_path(q, k, v)
        if self.mix == "conv":
            return self.convolution_path(q, k, v)
        att, conv = self.attention_path(q, k, v), self.convolution_path(q, k, v)
        return self.alpha.to(att.dtype) * att + self.beta.to(conv.dtype) * conv  # Fig. 2 (c): alpha, beta

    # ------------------------------------------------------------------ official checkpoint compatibility
    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        convert_official_state_dict(state_dict, prefix, self)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


def is_official_state_dict(state_dict: dict[str, Any], prefix: str = "") -> bool:
    """True when ``state_dict`` holds the official operator's keys (conv1/conv2/conv3/...) under ``prefix``."""
    return f"{prefix}conv1.weight" in state_dict and f"{prefix}qkv.weight" not in state_dict


def convert_official_state_dict(state_dict: dict[str, Any], prefix: str, layer: ACmix) -> None:
    """Rewrite, in place, the official keys under ``prefix`` into this layer's keys.

    conv1/conv2/conv3 -> qkv (concatenated), conv_p -> pos_proj, fc -> fc, dep_conv.weight -> shift_weight,
    rate1 -> alpha, rate2 -> beta. A ``dep_conv.bias`` (absent in official checkpoints) must be zero.
    """
    if not is_official_state_dict(state_dict, prefix):
        return
    pop = state_dict.pop
    state_dict[f"{prefix}qkv.weight"] = torch.cat([pop(f"{prefix}conv{i}.weight") for i in (1, 2, 3)], 0)
    if f"{prefix}conv1.bias" in state_dict:
        state_dict[f"{prefix}qkv.bias"] = torch.cat([pop(f"{prefix}conv{i}.bias") for i in (1, 2, 3)], 0)
    for name in ("weight", "bias"):
        if f"{prefix}conv_p.{name}" in state_dict:
            state_dict[f"{prefix}pos_proj.{name}"] = pop(f"{prefix}conv_p.{name}")
    bias = state_dict.pop(f"{prefix}dep_conv.bias", None)
    if bias is not None and bool(torch.any(bias != 0)):
        raise ValueError(f"{prefix}dep_conv.bias is non-zero; the official operator has no group-conv bias")
    if f"{prefix}dep_conv.weight" in state_dict:
        w = pop(f"{prefix}dep_conv.weight")
        if layer.shift_mode in ("learnable", "frozen"):
            shared = w[:: layer.num_heads]
            if not torch.equal(shared.repeat_interleave(layer.num_heads, 0), w):
                raise ValueError(
                    f"{prefix}dep_conv.weight has distinct kernels per head; it needs shift_mode='group', "
                    f"not {layer.shift_mode!r}"
                )
            w = shared
        state_dict[f"{prefix}shift_weight"] = w
    for old, new in (("rate1", "alpha"), ("rate2", "beta")):
        if f"{prefix}{old}" in state_dict:
            state_dict[f"{prefix}{new}"] = pop(f"{prefix}{old}")
