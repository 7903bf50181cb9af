"""Type aliases shared across the package."""

from __future__ import annotations

from typing import Literal

ShiftMode = Literal["tensor", "fixed", "frozen", "learnable", "group"]
MixMode = Literal["learned", "fixed", "attn", "conv"]

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
