"""Type aliases shared across the package."""

from __future__ import annotations

from typing import Literal

ShiftMode = Literal["tensor", "fixed", "frozen", "learnable", "group"]
MixMode = Literal["learned", "fixed", "attn", "conv"]
ConvImpl = Literal["auto", "fused", "reference"]

#: Fig. 3 variants of the shift: (a) tensor shifts, (b) fixed group-conv kernels, (c-I) frozen, (c-II) learnable
#: shared kernels, (c-III) full group convolution (the official code)
SHIFT_MODES: tuple[str, ...] = ("tensor", "fixed", "frozen", "learnable", "group")
#: how the attention and convolution paths are combined: learned or fixed alpha/beta, or one path alone
MIX_MODES: tuple[str, ...] = ("learned", "fixed", "attn", "conv")
#: convolution-path implementations: FC + group conv as the official code (``"reference"``), the two composed
#: into one grouped convolution (``"fused"``), or the one with fewer multiply-adds (``"auto"``)
CONV_IMPLS: tuple[str, ...] = ("auto", "fused", "reference")

#: Fig. 3 panel names accepted as aliases of :data:`ShiftMode`.
SHIFT_ALIASES: dict[str, str] = {
    "a": "tensor",
    "b": "fixed",
    "c1": "frozen",
    "c-i": "frozen",
    "c2": "learnable",
    "c-ii": "learnable",
    "c3": "group",
    "c-iii": "group",
}
