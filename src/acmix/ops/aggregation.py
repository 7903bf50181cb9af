"""SAN's patchwise aggregation: a per-position weighted sum over a k x k reflection window.

Semantics of the official SAN CUDA kernel (hszhao/SAN; docs/official-code.md), which is CUDA-only upstream:

    out[b, c, y, x] = sum_{t < k*k} weight[b, c mod Wc, t, y, x] * x[b, c, reflect(y*s - k//2 + t//k),
                                                                      reflect(x*s - k//2 + t%k)]

Channel c shares its weights with channels c +- Wc (interleaved), not with its neighbours. The border is the same
generalised reflection as the ACmix attention path (:mod:`acmix.ops._indexing`).
"""

from __future__ import annotations

import torch

from . import _checks
from ._dispatch import AGGREGATE, Backend
from ._reference import _unfold_windows


def local_aggregate_reference(x: torch.Tensor, weight: torch.Tensor, kernel_size: int, stride: int = 1) -> torch.Tensor:
    """Unfold-based reference. x (B, C, H, W), weight (B, Wc, k*k, Ho, Wo) -> (B, C, Ho, Wo)."""
    b, c, h, w = x.shape
    wc = weight.shape[1]
    cols = _unfold_windows(x.unsqueeze(1), kernel_size, stride)[:, 0]  # (B, C, k2, Ho, Wo)
    cols = cols.reshape(b, c // wc, wc, *cols.shape[2:])  # (B, C/Wc, Wc, k2, Ho, Wo): c = g * Wc + w
    out = (cols * weight.unsqueeze(1)).sum(3)  # (B, C/Wc, Wc, Ho, Wo)
    return out.reshape(b, c, *out.shape[-2:])


def _always(x: torch.Tensor) -> tuple[bool, str]:
    return True, ""


AGGREGATE.register(Backend("reference", local_aggregate_reference, _always, priority=0, description="unfold-based"))

from . import _backends  # noqa: E402, F401  (registers the fast backends)


def local_aggregate(
    x: torch.Tensor, weight: torch.Tensor, kernel_size: int, stride: int = 1, backend: str | None = None
) -> torch.Tensor:
    """SAN patchwise aggregation (reflection border, interleaved weight sharing).

    Args:
        x: features to aggregate.
        weight: per-position window weights; channel c of ``x`` uses weight channel ``c mod Wc``.
        kernel_size: odd window size k.
        stride: output stride; output position y reads the window centred on input position y * stride.
        backend: implementation name (``"offset"``, ``"reference"``; see
            :func:`acmix.ops.available_aggregate_backends`); ``None`` picks the best runnable one
            (``ACMIX_AGGREGATE_BACKEND`` overrides).

    Shape:
        x: (B, C, H, W); weight: (B, Wc, k*k, ceil(H / s), ceil(W / s)) with C divisible by Wc;
        returns (B, C, ceil(H / s), ceil(W / s)).
    """
    if not torch.jit.is_scripting():
        if not _checks.is_symbolic(x):
            _check_args(x, weight, kernel_size, stride)
        if torch.jit.is_tracing():  # TorchScript trace / ONNX export(dynamo=False): record standard operators
            return AGGREGATE.choose(x, backend).fn(x, weight, kernel_size, stride)
    return torch.ops.acmix.local_aggregate(x, weight, kernel_size, stride, backend)


def _check_args(x: torch.Tensor, weight: torch.Tensor, kernel_size: int, stride: int) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a 4-D tensor (B, C, H, W), got {got}")
    _checks.check_float("x", x)
    _checks.check_odd_kernel("kernel_size", kernel_size)
    _checks.check_stride(stride)
    b, c, h, w = x.shape
    ho, wo = -(-h // stride), -(-w // stride)
    if weight.dim() != 5 or weight.shape[0] != b or weight.shape[2:] != (kernel_size * kernel_size, ho, wo):
        raise ValueError(
            f"weight must be (B, Wc, k*k, Ho, Wo) = ({b}, Wc, {kernel_size * kernel_size}, {ho}, {wo}), "
            f"got {tuple(weight.shape)}"
        )
    if c % weight.shape[1]:
        raise ValueError(f"channels of x ({c}) must be divisible by weight channels Wc ({weight.shape[1]})")
    if weight.dtype != x.dtype or weight.device != x.device:
        raise ValueError(
            f"weight must match x's dtype/device ({x.dtype}, {x.device}), got ({weight.dtype}, {weight.device})"
        )
