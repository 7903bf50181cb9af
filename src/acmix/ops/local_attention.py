"""The attention path of ACmix: local k x k sliding-window multi-head attention (public functional op)."""

from __future__ import annotations

import torch

from . import _checks
from ._dispatch import Backend, choose_backend, register_backend
from ._reference import local_attention_reference


def _always(q: torch.Tensor) -> tuple[bool, str]:
    return True, ""


register_backend(
    Backend("reference", local_attention_reference, _always, priority=0, description="unfold-based (official-style)")
)

from . import _backends  # noqa: E402, F401  (registers the fast backends)


def local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: int = 7,
    stride: int = 1,
    rel_pos: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Sliding-window multi-head attention with ACmix's relative position term and reflection border.

    Each query (every ``stride``-th pixel) attends to the k x k window of keys centred on it; positions outside
    the map are reflected (generalised to maps of any size, down to 1 x 1, see ``docs/deviations.md``). The logit
    is ``scale * q_i . (k_j + p_i - p_j)`` with ``p = rel_pos`` (the official linear relative position term) and
    ``scale`` defaulting to ``head_dim ** -0.5``.

    Args:
        q, k, v: queries, keys, values.
        kernel_size: odd window size k_att.
        stride: query stride; keys and values stay at full resolution.
        rel_pos: optional position map shared over batch and heads, or broadcastable per batch/head.
        scale: logit scale; ``None`` means ``head_dim ** -0.5``.
        backend: implementation name (see :func:`acmix.ops.available_backends`); ``None`` picks the fastest one
            this input can run on (``ACMIX_BACKEND`` overrides). The choice is made per call, inside the custom op
            ``torch.ops.acmix.local_attention`` (so also in scripted and FX-traced models, :mod:`acmix.ops._library`).

    Shape:
        q, k, v: (B, heads, head_dim, H, W); rel_pos: (head_dim, H, W) or broadcastable to q;
        returns (B, heads, head_dim, ceil(H / stride), ceil(W / stride)).

    Example:
        >>> q = k = v = torch.randn(2, 4, 16, 9, 11)
        >>> local_attention(q, k, v, kernel_size=7, stride=2).shape
        torch.Size([2, 4, 16, 5, 6])
    """
    if not torch.jit.is_scripting():
        if not _checks.is_symbolic(q):
            _check_args(q, k, v, kernel_size, stride, rel_pos)
        if torch.jit.is_tracing():  # TorchScript trace / ONNX export(dynamo=False): record standard operators
            return choose_backend(q, backend).fn(q, k, v, kernel_size, stride, rel_pos, scale)
    return torch.ops.acmix.local_attention(q, k, v, kernel_size, stride, rel_pos, scale, backend)


def _check_args(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel_size: int, stride: int, rel_pos: torch.Tensor | None
) -> None:
    _checks.check_qkv(q, k, v)
    _checks.check_odd_kernel("kernel_size", kernel_size)
    _checks.check_stride(stride)
    if rel_pos is not None:
        _checks.check_float("rel_pos", rel_pos)
        want = q.shape[2:]
        if rel_pos.dim() not in (3, 5) or rel_pos.shape[-3:] != want:
            raise ValueError(
                f"rel_pos must be (head_dim, H, W) = {tuple(want)} or 5-D broadcastable to q, "
                f"got {tuple(rel_pos.shape)}"
            )
        if rel_pos.device != q.device:
            raise ValueError(f"rel_pos must be on q's device {q.device}, got {rel_pos.device}")
