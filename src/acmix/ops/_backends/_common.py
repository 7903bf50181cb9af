"""The contract every fast local-attention backend shares, written once.

A backend is written as ``impl(q, k, v, w: Window) -> Tensor`` and decorated with :func:`attention_backend`, which
gives it the op's signature (that of :func:`acmix.ops._reference.local_attention_reference`) and resolves the
arguments the same way for all: ``scale`` defaults to ``head_dim ** -0.5``. The undecorated form stays reachable as
``fn.__wrapped__`` (one backend falling back to another passes its :class:`Window` on).

Shape (every backend):
    q, k, v: (B, N, D, H, W); rel_pos: (D, H, W) or broadcastable 5-D, or None;
    returns (B, N, D, ceil(H / stride), ceil(W / stride)).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import torch

__all__ = ["LocalAttentionFn", "Window", "attention_backend"]


class Window(NamedTuple):
    """The resolved non-tensor arguments of one local-attention call (and the position map)."""

    kernel_size: int
    stride: int
    rel_pos: torch.Tensor | None
    scale: float


class LocalAttentionFn(Protocol):
    """The op's signature: ``fn(q, k, v, kernel_size, stride=1, rel_pos=None, scale=None, **options)``."""

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kernel_size: int,
        stride: int = 1,
        rel_pos: torch.Tensor | None = None,
        scale: float | None = None,
        **options: Any,
    ) -> torch.Tensor: ...


def attention_backend(impl: Callable[..., torch.Tensor]) -> LocalAttentionFn:
    """Give ``impl(q, k, v, w: Window, **options)`` the op's signature; ``options`` are backend-specific keywords."""

    @functools.wraps(impl)
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

    return fn
