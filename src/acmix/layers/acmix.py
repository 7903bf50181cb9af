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
import torch.nn.functional as F
import torch.utils.checkpoint

from ..ops import local_attention
from ..ops._checks import check_odd_kernel, check_stride, is_exporting, is_symbolic
from ..ops.conv_path import group_order
from ..types import ConvImpl, MixMode, ShiftMode
from .conv_path import ConvPathMixin


def position_grid(h: int, w: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The official coordinate map (1, 2, H, W): channel 0 is linspace(-1, 1) over W, channel 1 over H."""
    loc_w = _linspace(w, dtype, device).expand(h, w)
    loc_h = _linspace(h, dtype, device).unsqueeze(1).expand(h, w)
    return torch.stack([loc_w, loc_h]).unsqueeze(0)


def _linspace(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.linspace(-1, 1, n)``; while ``torch.export`` traces, the same values from ``arange`` (within one ulp),
    because ``linspace`` fixes a symbolic ``n`` to the traced size (an ONNX graph would then refuse other sizes)."""
    if not torch.jit.is_scripting():
        # the TorchScript ONNX exporter (ultralytics' export uses it) also writes linspace in float64 whatever the
        # dtype, which onnxruntime then cannot convolve
        if is_exporting() or torch.onnx.is_in_onnx_export():
            idx = torch.arange(n, dtype=dtype, device=device)
            step = 2.0 / max(n - 1, 1)
            return torch.where(idx < n // 2, idx * step - 1.0, 1.0 - (n - 1 - idx) * step)
    return torch.linspace(-1.0, 1.0, n, dtype=dtype, device=device)


torch.fx.wrap("position_grid")  # one leaf node under torch.fx (its sizes may be Proxies)


class ACmix(ConvPathMixin, nn.Module):
    """ACmix: shared 1 x 1 projections, then a local self-attention path and a shift/convolution path.

    Output = alpha * attention(q, k, v) + beta * conv_path(q, k, v) (Fig. 2 (c)).

    The positional order is the official operator's, ``ACmix(in_planes, out_planes, kernel_att, head, kernel_conv,
    stride, dilation)``, and the official names are accepted as keyword aliases, so code written for the official class
    runs unchanged (giving a value under both names is a ``TypeError``).

    Args:
        dim: input channels (official ``in_planes``).
        dim_out: output channels (official ``out_planes``; default ``dim``); must be divisible by ``num_heads``.
        attn_kernel_size: odd attention window k_att (official ``kernel_att``; default 7).
        num_heads: N heads (official ``head``; default 4); head_dim = dim_out / N.
        conv_kernel_size: odd conv-path kernel k_c (official ``kernel_conv``; default 3; any odd size works here).
        stride: spatial stride (queries and the group conv are strided; projections run at input resolution,
            as in the official code).
        dilation: must be 1; other values are refused with a ``ValueError`` (the official operator accepts the
            argument but its window is never dilated).
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
        backend: local attention backend (``None``: :func:`acmix.ops.use_backend` or automatic, see
            :func:`acmix.ops.available_backends`).
        conv_impl: ``"fused"`` (one grouped conv), ``"reference"`` (FC, permute, group conv), ``"auto"`` or ``None``
            (fused up to 8 heads, :func:`acmix.ops.conv_path_maps`; ``None`` also follows
            :func:`acmix.ops.use_backend`).
        recompute: while gradients are recorded, keep only the input for backward and recompute the projection,
            both paths and the mix during backward (``torch.utils.checkpoint``): the layer's activation memory
            drops to its input and output, for about one more forward of time (measured in ``acmix bench op``,
            subject ``acmix-recompute``). Off by default; settable later as ``layer.recompute = True``.

    Shape:
        input (B, dim, H, W) -> output (B, dim_out, ceil(H / stride), ceil(W / stride)), NCHW (channels_last ok).
    """

    def __init__(
        self,
        dim: int | None = None,
        dim_out: int | None = None,
        attn_kernel_size: int | None = None,
        num_heads: int | None = None,
        conv_kernel_size: int | None = None,
        stride: int = 1,
        dilation: int = 1,
        *,
        in_planes: int | None = None,
        out_planes: int | None = None,
        kernel_att: int | None = None,
        head: int | None = None,
        kernel_conv: int | None = None,
        qkv_bias: bool = True,
        fc_bias: bool = False,
        use_rel_pos: bool = True,
        shift_mode: ShiftMode | str = "group",
        shift_init: bool = True,
        mix: MixMode | str = "learned",
        alpha_init: float = 0.5,
        beta_init: float = 0.5,
        backend: str | None = None,
        conv_impl: ConvImpl | str | None = None,
        recompute: bool = False,
    ) -> None:
        super().__init__()
        dim = _official_alias("dim", dim, "in_planes", in_planes, None)
        if dim is None:
            raise TypeError("ACmix needs the input channels: dim (official name: in_planes)")
        dim_out = _official_alias("dim_out", dim_out, "out_planes", out_planes, dim)
        attn_kernel_size = _official_alias("attn_kernel_size", attn_kernel_size, "kernel_att", kernel_att, 7)
        num_heads = _official_alias("num_heads", num_heads, "head", head, 4)
        conv_kernel_size = _official_alias("conv_kernel_size", conv_kernel_size, "kernel_conv", kernel_conv, 3)
        if dilation != 1:
            raise ValueError(
                f"ACmix supports dilation=1 only, got dilation={dilation!r} (the official operator pads for a dilated "
                "window but never dilates it; see docs/deviations.md)"
            )
        for name, value in (("dim", dim), ("dim_out", dim_out), ("num_heads", num_heads)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if dim_out % num_heads:
            raise ValueError(f"dim_out ({dim_out}) must be divisible by num_heads ({num_heads})")
        check_odd_kernel("attn_kernel_size", attn_kernel_size)
        check_stride(stride)
        self.dim, self.dim_out, self.stride, self.num_heads = dim, dim_out, stride, num_heads
        self.head_dim = dim_out // num_heads
        self.attn_kernel_size = attn_kernel_size
        self.backend = backend
        self.recompute = bool(recompute)

        # Stage I: the three 1 x 1 projections, fused into one conv (parameters in the order [q | k | v]).
        self.qkv = nn.Conv2d(dim, 3 * dim_out, 1, bias=qkv_bias)
        # the projection runs with its rows in the conv path's group order (channel d * 3N + t * N + j): the fused
        # grouped conv reads its output as it is, and q, k, v are strided views of it (no copies)
        self.qkv_order: torch.Tensor
        self.register_buffer("qkv_order", group_order(3 * num_heads, self.head_dim), persistent=False)
        # official relative position term: conv_p on a 2-channel coordinate map
        self.pos_proj = nn.Conv2d(2, self.head_dim, 1) if use_rel_pos else None
        # Stage II conv path: light FC 3N -> k_c^2 (Fig. 2), then the shift as a group conv (Fig. 3); alpha, beta
        self.init_conv_path(
            dim_out,
            3 * num_heads,
            self.head_dim,
            conv_kernel_size=conv_kernel_size,
            fc_bias=fc_bias,
            shift_mode=shift_mode,
            shift_init=shift_init,
            mix=mix,
            alpha_init=alpha_init,
            beta_init=beta_init,
            conv_impl=conv_impl,
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Official init: default conv init for projections and FC, shift kernels (or Kaiming), alpha = beta = 0.5."""
        self.qkv.reset_parameters()
        self.fc.reset_parameters()
        if self.pos_proj is not None:
            self.pos_proj.reset_parameters()
        self.reset_shift_and_mix()

    def extra_repr(self) -> str:
        return (
            f"{self.dim}, {self.dim_out}, stride={self.stride}, num_heads={self.num_heads}, "
            f"attn_kernel_size={self.attn_kernel_size}, {self.conv_path_repr()}"
            + (", recompute=True" if self.recompute else "")
        )

    def rel_pos(self, h: int, w: int, like: torch.Tensor) -> torch.Tensor | None:
        """The position map (head_dim, H, W) that enters the logits as q_i . (p_i - p_j); None when disabled."""
        if self.pos_proj is None:
            return None
        grid = position_grid(h, w, self.pos_proj.weight.dtype, like.device)  # (1, 2, H, W)
        return self.pos_proj(grid)[0].to(like.dtype)  # (head_dim, H, W)

    def _check_input(self, x: Any) -> None:
        if is_symbolic(x):
            return
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
        """(B, C, H, W) x 3, channels head-major (head * head_dim + d) -> (B, C, Ho, Wo), the same order."""
        b, c, h, w = q.shape
        n, d = self.num_heads, self.head_dim
        return self.attention_heads(q.reshape(b, n, d, h, w), k.reshape(b, n, d, h, w), v.reshape(b, n, d, h, w))

    def convolution_path(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) x 3 -> (B, C, Ho, Wo), channel d * N + j (the official group-major order)."""
        return self.convolution_maps(torch.cat([q, k, v], 1), self.stride)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Stage I in the conv path's group order: (B, dim, H, W) -> (B, 3C, H, W), channel d * 3N + t * N + j
        (t in q, k, v; j the head; d < head_dim). :meth:`split_heads` views q, k, v in it."""
        order = self.qkv_order
        bias = self.qkv.bias
        if bias is not None:
            bias = bias[order]
        return F.conv2d(x, self.qkv.weight[order], bias)

    def split_heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v (B, N, D, H, W) as strided views of the group-ordered projection (B, 3C, H, W)."""
        b, _, h, w = qkv.shape
        parts = qkv.view(b, self.head_dim, 3, self.num_heads, h, w).unbind(2)  # 3 x (B, D, N, H, W)
        # one unbind (not three selects): its backward stacks dq, dk, dv into one map instead of zero-filling the
        # whole 3C map once per view and adding the three; indexed, not a generator (TorchScript compiles this)
        return parts[0].transpose(1, 2), parts[1].transpose(1, 2), parts[2].transpose(1, 2)

    def attention_heads(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Local attention on (B, N, D, H, W) heads -> (B, C, Ho, Wo), channel head * head_dim + d."""
        b, n, d, h, w = q.shape
        out = local_attention(
            q, k, v, self.attn_kernel_size, self.stride, self.rel_pos(h, w, q), backend=self.backend
        )  # (B, N, D, Ho, Wo)
        return out.reshape(b, n * d, out.shape[-2], out.shape[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():  # eager (and compile/export) only: TorchScript and torch.fx skip the checks
            self._check_input(x)
            if self.recompute and torch.is_grad_enabled() and not is_symbolic(x):
                # saved for backward: x (and the parameters); everything below runs again during backward
                return torch.utils.checkpoint.checkpoint(self._paths, x, use_reentrant=False)
        return self._paths(x)

    def _paths(self, x: torch.Tensor) -> torch.Tensor:
        """Stage I and II: (B, dim, H, W) -> (B, dim_out, Ho, Wo)."""
        qkv = self.project(x)  # Stage I: (B, 3C, H, W) in group order
        att = self.attention_heads(*self.split_heads(qkv)) if self.uses_attention else None
        conv = self.convolution_maps(qkv, self.stride, order="groups") if self.uses_convolution else None
        return self.mix_paths(att, conv)  # Fig. 2 (c): alpha * att + beta * conv

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


def _official_alias(name: str, value: Any, alias: str, alias_value: Any, default: Any) -> Any:
    """``value`` or its official alias (at most one of them given), else ``default``."""
    if value is not None and alias_value is not None:
        raise TypeError(f"ACmix got both {name}={value!r} and its official alias {alias}={alias_value!r}; pass one")
    if value is not None:
        return value
    return default if alias_value is None else alias_value


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
