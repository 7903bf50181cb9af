"""ACmix for Swin Transformer: timm's window attention plus the ACmix convolution path.

Pan et al., "On the Integration of Self-Attention and Convolution", CVPR 2022 (arXiv 2111.14556). Follows the
official ``WindowAttention_acmix`` (LeapLabTHU/ACmix ``Swin-Transformer/models/swin_transformer_acmix.py``,
docs/official-code.md) numerically; written anew on top of timm's
:class:`~timm.models.swin_transformer.WindowAttention` and :class:`~timm.models.swin_transformer.SwinTransformerBlock`,
whose parameters and names it keeps.

* Stage I is Swin's ``qkv`` Linear, computed once on the whole (cyclically rolled) map.
* Attention path: unchanged (S)W-MSA with the relative position bias and the shift mask, then ``proj``.
* Convolution path: FC (3N -> 9, with bias) over the q/k/v head maps, then the shift-initialised 3 x 3 group conv
  (no bias), run on the **rolled** map before window partition, exactly like the official code: its 3 x 3
  neighbourhoods cross the roll seam and its zero padding lands on the rolled map's border.
* Output: alpha * proj(attention) + beta * conv, then ``proj_drop``; alpha = beta = 0.5 at init.

Maps whose size is not a multiple of the window are padded for the attention (as timm does); the convolution path
always sees the unpadded map.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformerBlock, WindowAttention, window_partition, window_reverse

from ..ops._checks import is_symbolic
from .conv_path import ConvPathMixin

__all__ = ["ACmixSwinBlock", "ACmixWindowAttention"]


def shift_window_mask(x: torch.Tensor, window_size: tuple[int, int], shift_size: tuple[int, int]) -> torch.Tensor:
    """The SW-MSA mask of a rolled, padded map (timm's ``get_attn_mask`` for its size; a ``torch.fx`` leaf).

    Positions from different regions of the cyclic shift may not attend to each other: their logits get -100.

    Shape:
        x (B, Hp, Wp, C), Hp and Wp multiples of the window -> (num_windows, ws0 * ws1, ws0 * ws1).
    """
    hp, wp = x.shape[1], x.shape[2]
    ws0, ws1 = window_size
    img = torch.zeros((1, hp, wp, 1), dtype=x.dtype, device=x.device)
    bounds_h = [(0, hp - ws0), (hp - ws0, hp - shift_size[0]), (hp - shift_size[0], hp)]
    bounds_w = [(0, wp - ws1), (wp - ws1, wp - shift_size[1]), (wp - shift_size[1], wp)]
    region = 0
    for h0, h1 in bounds_h:
        for w0, w1 in bounds_w:
            img[:, h0:h1, w0:w1, :] = float(region)
            region += 1
    windows = window_partition(img, window_size).reshape(-1, ws0 * ws1)  # (nW, N)
    diff = windows.unsqueeze(1) - windows.unsqueeze(2)  # (nW, N, N)
    return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)


torch.fx.wrap("shift_window_mask")


class ACmixWindowAttention(ConvPathMixin, WindowAttention):
    """Swin window attention with the ACmix convolution path; works on the whole (rolled, padded) map.

    Args:
        dim: channels C; the attention width ``num_heads * head_dim`` must equal ``dim``.
        num_heads: N heads.
        head_dim: channels per head (``dim // num_heads`` by default).
        window_size: attention window.
        qkv_bias, attn_drop, proj_drop: as in timm's ``WindowAttention``.
        fc_bias: bias on the conv-path FC (official Swin: yes).
        device, dtype: of the parameters.
        **conv_path: the other options of :meth:`acmix.layers.ConvPathMixin.init_conv_path` (``mix``, ...);
            official Swin: shift init kept. ``conv_impl`` ``None``/``"auto"`` runs fused (one grouped
            conv, 27 N C HW multiply-adds) up to N = 8 heads and FC + group conv (108 C HW) above (Swin's deep
            stages have 12 and 24 heads).

    Shape:
        forward: x (B, Hp, Wp, C) with Hp, Wp multiples of the window (the rolled, padded map) -> (B, H, W, C),
        H, W = ``size`` (the unpadded extent, default Hp, Wp).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        head_dim: int | None = None,
        window_size: int | tuple[int, int] = 7,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        *,
        fc_bias: bool = True,
        device: Any = None,
        dtype: Any = None,
        **conv_path: Any,
    ) -> None:
        hd = head_dim or dim // num_heads
        if hd * num_heads != dim:
            raise ValueError(f"ACmix needs num_heads * head_dim == dim, got {num_heads} * {hd} != {dim}")
        self._acmix_ready = False
        super().__init__(dim, num_heads, head_dim, window_size, qkv_bias, attn_drop, proj_drop, device, dtype)
        self.init_conv_path(dim, 3 * num_heads, hd, fc_bias=fc_bias, device=device, dtype=dtype, **conv_path)
        self._acmix_ready = True
        self.reset_conv_path()

    def reset_parameters(self) -> None:
        """timm's init of the bias table and buffers, then the ACmix init (shift kernels, alpha = beta = 0.5)."""
        super().reset_parameters()
        if self._acmix_ready:
            self.reset_conv_path()

    @classmethod
    def from_window_attention(cls, attn: WindowAttention, **acmix_kwargs: Any) -> ACmixWindowAttention:
        """An ACmix attention holding a copy of ``attn``'s qkv, proj and bias table (same window, heads, dropout)."""
        dim = attn.qkv.in_features
        head_dim = attn.qkv.out_features // 3 // attn.num_heads
        new = cls(
            dim,
            attn.num_heads,
            head_dim,
            attn.window_size,
            qkv_bias=attn.qkv.bias is not None,
            attn_drop=attn.attn_drop.p,
            proj_drop=attn.proj_drop.p,
            device=attn.qkv.weight.device,
            dtype=attn.qkv.weight.dtype,
            **acmix_kwargs,
        )
        new.fused_attn = attn.fused_attn  # type: ignore[misc]
        missing, unexpected = new.load_state_dict(attn.state_dict(), strict=False)
        foreign = [k for k in missing if k not in ("fc.weight", "fc.bias", "shift_weight", "alpha", "beta")]
        if unexpected or foreign:
            raise RuntimeError(
                f"{type(attn).__name__} does not map onto ACmixWindowAttention: missing {foreign}, "
                f"unexpected {unexpected}"
            )
        return new

    def extra_repr(self) -> str:
        return f"dim={self.dim}, window_size={self.window_size}, num_heads={self.num_heads}, {self.conv_path_repr()}"

    def attention_windows(self, qkv: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """timm's (S)W-MSA from precomputed qkv, then ``proj``.

        Shape:
            qkv (num_windows * B, N, 3C), mask (num_windows, N, N) or None -> (num_windows * B, N, C).
        """
        b_, n, _ = qkv.shape
        q, k, v = qkv.reshape(b_, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)  # (B_, heads, N, hd)
        if self.fused_attn:
            attn_mask = self._get_rel_pos_bias()
            if mask is not None:
                num_win = mask.shape[0]
                mask = mask.view(1, num_win, 1, n, n).expand(b_ // num_win, -1, self.num_heads, -1, -1)
                attn_mask = attn_mask + mask.reshape(-1, self.num_heads, n, n)
            x = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=self.attn_drop.p if self.training else 0.0
            )
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)  # (B_, heads, N, N)
            attn = attn + self._get_rel_pos_bias()
            if mask is not None:
                num_win = mask.shape[0]
                attn = attn.view(-1, num_win, self.num_heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
                attn = attn.view(-1, self.num_heads, n, n)
            attn = self.attn_drop(self.softmax(attn))
            x = attn @ v
        return self.proj(x.transpose(1, 2).reshape(b_, n, -1))

    def convolution_path(self, qkv: torch.Tensor) -> torch.Tensor:
        """The ACmix convolution path on the whole map (zero padding at its border).

        Shape:
            qkv (B, H, W, 3C) -> (B, H, W, C), channel d * N + j (the official group-major order).
        """
        out = self.convolution_maps(qkv.permute(0, 3, 1, 2))  # (B, 3C, H, W) head maps [q | k | v] -> (B, C, H, W)
        return out.permute(0, 2, 3, 1)

    def _check_input(self, x: torch.Tensor) -> None:
        if is_symbolic(x):
            return
        if x.dim() != 4:
            raise ValueError(f"ACmixWindowAttention expects a (B, H, W, C) map, got shape {tuple(x.shape)}")
        hp, wp = x.shape[1], x.shape[2]
        if hp % self.window_size[0] or wp % self.window_size[1]:
            raise ValueError(f"map {hp}x{wp} is not a multiple of the window {self.window_size}; pad it first")

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, mask: torch.Tensor | None = None, size: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """Attention over windows of ``x`` plus the convolution path over its top-left ``size`` region."""
        if not torch.jit.is_scripting():  # eager only: TorchScript and torch.fx skip the checks
            self._check_input(x)
        b, hp, wp, c = x.shape
        h, w = size if size is not None else (hp, wp)
        ws0, ws1 = self.window_size
        qkv = self.qkv(x)  # Stage I on the whole map: (B, Hp, Wp, 3C)
        att: torch.Tensor | None = None
        conv: torch.Tensor | None = None
        if self.uses_attention:
            windows = window_partition(qkv, self.window_size).view(-1, ws0 * ws1, 3 * c)  # (nW*B, N, 3C)
            att = self.attention_windows(windows, mask).view(-1, ws0, ws1, c)
            att = window_reverse(att, self.window_size, hp, wp)[:, :h, :w]  # (B, H, W, C)
        if self.uses_convolution:
            conv = self.convolution_path(qkv[:, :h, :w])  # on the rolled map, before window partition
        return self.proj_drop(self.mix_paths(att, conv))


class ACmixSwinBlock(SwinTransformerBlock):
    """timm's Swin block whose attention is :class:`ACmixWindowAttention` (conv path on the rolled map).

    Args:
        *args, **kwargs: :class:`timm.models.swin_transformer.SwinTransformerBlock` arguments.
        acmix_kwargs: keyword arguments for :class:`ACmixWindowAttention`.

    Shape:
        input (B, H, W, C) -> output (B, H, W, C).
    """

    def __init__(self, *args: Any, acmix_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.attn = ACmixWindowAttention.from_window_attention(self.attn, **(acmix_kwargs or {}))

    @classmethod
    def from_block(cls, block: SwinTransformerBlock, **acmix_kwargs: Any) -> ACmixSwinBlock:
        """Convert a built timm block: the same modules and settings, with an ACmix attention (a copy of its own)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        fresh = set(new.__dict__)  # nn.Module bookkeeping: keep the new block's own
        for key, value in block.__dict__.items():
            if key not in fresh:
                new.__dict__[key] = value
        new.train(block.training)
        for name, module in block._modules.items():
            setattr(new, name, module)
        for name, buf in block._buffers.items():
            new.register_buffer(name, buf, persistent=name not in block._non_persistent_buffers_set)
        new.attn = ACmixWindowAttention.from_window_attention(block.attn, **acmix_kwargs)  # type: ignore[arg-type]
        return new

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        has_shift = any(self.shift_size)
        shifted = torch.roll(x, shifts=(-self.shift_size[0], -self.shift_size[1]), dims=(1, 2)) if has_shift else x
        pad_h = (self.window_size[0] - h % self.window_size[0]) % self.window_size[0]
        pad_w = (self.window_size[1] - w % self.window_size[1]) % self.window_size[1]
        shifted = F.pad(shifted, (0, 0, 0, pad_w, 0, pad_h))  # (B, Hp, Wp, C)
        mask: torch.Tensor | None = self.attn_mask  # type: ignore[assignment]
        if getattr(self, "dynamic_mask", False):
            mask = shift_window_mask(shifted, self.window_size, self.shift_size) if has_shift else None
        out = self.attn(shifted, mask=mask, size=(h, w))  # (B, H, W, C), still rolled
        if has_shift:
            out = torch.roll(out, shifts=self.shift_size, dims=(1, 2))
        return out
