"""Which implementation of the ACmix ops a benchmark row runs: the backend switch and its description.

The ops' implementations are not module state: a row's ``backend`` is entered as a :class:`acmix.ops.use_backend`
context around every step (:func:`backend_context`); only the host attention of the Swin/PVT layers (timm's
``fused_attn`` flag) is set on the modules (:func:`set_host_attention`).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..layers import ConvPathMixin
from ..ops import choose_aggregate_backend, choose_backend, use_backend

__all__ = ["acmix_layers", "backend_context", "describe_backend", "set_host_attention"]


def _acmix_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if type(m).__module__.startswith("acmix.")]


def acmix_layers(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` defined by acmix whose formulation can be switched.

    That is, modules with a local-attention ``backend`` attribute, a convolution-path ``conv_impl`` or a SAN
    aggregation (``sa_type``).
    """
    return [m for m in _acmix_modules(model) if any(hasattr(m, a) for a in ("backend", "conv_impl", "sa_type"))]


def backend_context(backend: str | None) -> use_backend:
    """The ops' implementations for a row's ``backend``: ``None`` automatic; ``"reference"`` the official-style
    formulation of every op (unfold local attention and SAN aggregation, FC + permute + group-conv convolution path);
    any other name that local-attention backend. Entered around every step of a
    :class:`~acmix.bench.runner.PreparedCase`."""
    if backend == "reference":
        return use_backend(attention="reference", aggregate="reference", conv="reference")
    return use_backend(attention=backend)


def set_host_attention(model: nn.Module, backend: str | None) -> int:
    """For ``backend="reference"``, run acmix's host attention as the official code does (explicit softmax(q k^T) v,
    ``fused_attn=False``, as the official Swin); returns how many acmix layers can be switched at all.

    The local-attention, aggregation and convolution-path implementations are not module state: they follow
    :func:`backend_context`.
    """
    if backend == "reference":
        for m in _acmix_modules(model):
            if getattr(m, "fused_attn", None) is True:
                setattr(m, "fused_attn", False)  # noqa: B010  (timm's attribute on acmix's window attention)
    return len(acmix_layers(model))


def describe_backend(model: nn.Module, backend: str | None, device: torch.device, dtype: torch.dtype) -> str:
    """The row's ``backend`` column: ``none`` (nothing switchable), the forced name, or what runs automatically.

    Automatic choices read ``attn:<local-attention backend>``, ``agg:<SAN aggregation backend>``,
    ``conv:<conv path impl>`` joined by ``+``.
    """
    layers = acmix_layers(model)
    if not layers:
        return "none"
    if backend is not None:
        return backend
    sample = torch.empty(1, 1, 1, 1, 1, device=device, dtype=dtype)
    parts = []
    try:
        if any(hasattr(m, "backend") for m in layers):
            parts.append(f"attn:{choose_backend(sample).name}")
        if any(hasattr(m, "sa_type") for m in layers):
            parts.append(f"agg:{choose_aggregate_backend(sample[0]).name}")
    except (ValueError, RuntimeError) as exc:  # e.g. an ACMIX_BACKEND that cannot run here
        parts.append(f"?({exc})")
    impls = sorted({m.resolved_conv_impl() for m in layers if isinstance(m, ConvPathMixin)})
    if impls:
        parts.append("conv:" + "/".join(impls))
    return "+".join(parts)
