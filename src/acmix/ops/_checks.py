"""Input validation shared by the ops: every failure is a ValueError naming expected vs received.

The checks run in eager mode (and while ``torch.compile`` / ``torch.export`` trace, on their fake tensors). They are
skipped while TorchScript compiles (callers guard them with ``if not torch.jit.is_scripting():``) and while
``torch.fx`` traces symbolically (:func:`is_symbolic`), as timm's models skip theirs.
"""

from __future__ import annotations

import torch
import torch.fx


def check_odd_kernel(name: str, k: int) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1 or k % 2 == 0:
        raise ValueError(f"{name} must be a positive odd int, got {k!r}")


def check_stride(stride: int) -> None:
    if not isinstance(stride, int) or isinstance(stride, bool) or stride < 1:
        raise ValueError(f"stride must be a positive int, got {stride!r}")


def check_float(name: str, t: torch.Tensor) -> None:
    if not torch.is_floating_point(t):
        raise ValueError(
            f"{name} must be a floating-point tensor (float16/bfloat16/float32/float64), got dtype {t.dtype}"
        )


def check_same(name: str, t: torch.Tensor, ref: torch.Tensor, ref_name: str = "q") -> None:
    if t.shape != ref.shape:
        raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(t.shape)}")
    if t.device != ref.device:
        raise ValueError(f"{name} must be on {ref_name}'s device {ref.device}, got {t.device}")
    if t.dtype != ref.dtype:
        raise ValueError(f"{name} must have {ref_name}'s dtype {ref.dtype}, got {t.dtype}")


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """q, k, v: (B, heads, head_dim, H, W), same shape, dtype and device."""
    if not isinstance(q, torch.Tensor) or q.dim() != 5:
        got = tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__
        raise ValueError(f"q must be a 5-D tensor (B, heads, head_dim, H, W), got {got}")
    check_float("q", q)
    check_same("k", k, q)
    check_same("v", v, q)
    if q.shape[-1] < 1 or q.shape[-2] < 1:
        raise ValueError(f"q must have a non-empty H x W map, got {tuple(q.shape)}")


def is_symbolic(x: object) -> bool:
    """True for a ``torch.fx`` Proxy: ``torch.fx.symbolic_trace`` is running, shapes are not known, checks skip."""
    return isinstance(x, torch.fx.Proxy)


def is_exporting() -> bool:
    """True while ``torch.export`` traces (``torch.compiler.is_exporting``, torch >= 2.5; False before)."""
    check = getattr(torch.compiler, "is_exporting", None)
    return bool(check()) if check is not None else False


def is_fx_symbolic_tracing() -> bool:
    """True while ``torch.fx.symbolic_trace`` (or a ``torch.fx.Tracer``) runs, not while ``torch.export`` traces."""
    fx = torch.fx._symbolic_trace
    check = getattr(fx, "is_fx_symbolic_tracing", None) or fx.is_fx_tracing  # the former: torch >= 2.9
    return bool(check())
