"""The contract every local-attention implementation shares (the reference and the fast backends), written once.

An implementation is written as ``impl(q, k, v, w: Window) -> Tensor`` and decorated with :func:`attention_backend`,
which gives it the op's signature ``fn(q, k, v, kernel_size, stride=1, rel_pos=None, scale=None, **options)`` and
resolves the arguments the same way for all: ``scale`` defaults to ``head_dim ** -0.5``. A :class:`Window` unpacks
into those arguments again (``other_backend(q, k, v, *window)``).

Shape (every backend):
    q, k, v: (B, N, D, H, W); rel_pos: (D, H, W) or broadcastable 5-D, or None;
    returns (B, N, D, ceil(H / stride), ceil(W / stride)).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

__all__ = ["Window", "attention_backend"]


class Window(NamedTuple):
    """The arguments of one local-attention call beside q, k and v, resolved (``scale`` is a number)."""

    kernel_size: int
    stride: int
    rel_pos: torch.Tensor | None
    scale: float


def attention_backend(impl: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Give ``impl(q, k, v, w: Window, **options)`` the op's signature; ``options`` are backend-specific keywords."""

    def fn(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kernel_size: int,
        stride: int = 1,
        rel_pos: torch.Tensor | None = None,
        scale: float | None = None,
        **options: Any,
    ) -> torch.Tensor:
        resolved = q.shape[2] ** -0.5 if scale is None else scale
        return impl(q, k, v, Window(kernel_size, stride, rel_pos, float(resolved)), **options)

    # name and documentation of the implementation, the signature of the op (no __wrapped__: inspect shows the latter)
    for attr in ("__name__", "__qualname__", "__doc__", "__module__"):
        setattr(fn, attr, getattr(impl, attr))
    return fn
