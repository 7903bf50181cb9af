"""SAN patchwise aggregation in Triton (``local_aggregate(..., backend="triton")``).

Semantics of the official SAN kernel (:mod:`acmix.ops.aggregation`): ``out[b, c, y, x] = sum_t w[b, c mod Wc, t,
y, x] * x[b, c, reflect(y s - k//2 + t // k), reflect(x s - k//2 + t % k)]`` with the generalised reflection border.

* forward: a program owns BLOCK_C channels x BLOCK_P output positions and loops over the k^2 taps, reading the
  features at reflected indices (no padded copy) and the weights in their own strides; float32 accumulation;
* d weight: a program owns one weight channel and BLOCK_P positions, holds all k^2 taps in registers and loops
  over the C / Wc channels that share the weight (no atomics);
* d features: a gather over the k^2 taps on the padded grid (every padded position receives from at most one
  output per tap), then the padded gradient is folded back onto the map through the reflection (``index_add``).

Registered through :mod:`torch.library` (``acmix::local_aggregate_triton`` and its backward op) so
``torch.compile`` keeps it in the graph. Runs on CUDA, or on the CPU under ``TRITON_INTERPRET=1`` (tests).
"""

from __future__ import annotations

from typing import Any

import torch

from .._indexing import reflect_index
from .triton_attention import axis_reflection, can_run_on, kernels

_BLOCK_C, _BLOCK_P = 16, 64


def can_run_triton_aggregate(x: torch.Tensor) -> tuple[bool, str]:
    """CUDA (or CPU under ``TRITON_INTERPRET=1``), float32 / float16 / bfloat16."""
    return can_run_on(x)


def _like_x(x: torch.Tensor, shape: tuple[int, int, int, int]) -> torch.Tensor:
    """A new (B, C, h, w) tensor, channels_last when x is."""
    channels_last = x.shape[1] > 1 and x.is_contiguous(memory_format=torch.channels_last)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)


def _offsets(h: int, w: int, kernel_size: int) -> dict[str, int]:
    """Reflection offsets large enough for positions down to -(k // 2)."""
    pad = kernel_size // 2
    py, offy, _ = axis_reflection(h, pad)
    px, offx, _ = axis_reflection(w, pad)
    return {"Py": py, "OFFy": offy, "Px": px, "OFFx": offx}


def _forward(x: torch.Tensor, weight: torch.Tensor, kernel_size: int, stride: int) -> torch.Tensor:
    b, c, h, w = x.shape
    wc, ho, wo = weight.shape[1], weight.shape[-2], weight.shape[-1]
    out = _like_x(x, (b, c, ho, wo))
    ncb, npb = -(-c // _BLOCK_C), -(-(ho * wo) // _BLOCK_P)
    kernels()._agg_fwd[(b * ncb * npb,)](
        x, weight, out,
        *x.stride(), *weight.stride(), *out.stride(),
        c, wc, h, w, ho, wo,
        n_cblocks=ncb, n_pblocks=npb,
        KS=kernel_size, STRIDE=stride, BLOCK_C=_BLOCK_C, BLOCK_P=_BLOCK_P,
        **_offsets(h, w, kernel_size),
    )  # fmt: skip
    return out


def _fold_padded(dxp: torch.Tensor, h: int, w: int, pad: int) -> torch.Tensor:
    """Add a padded-grid gradient (B, C, HP, WP), padded position i = input position i - pad, onto (B, C, H, W)."""
    rows = reflect_index(torch.arange(-pad, dxp.shape[-2] - pad, device=dxp.device), h)
    cols = reflect_index(torch.arange(-pad, dxp.shape[-1] - pad, device=dxp.device), w)
    g = dxp.new_zeros(*dxp.shape[:-1], w).index_add_(-1, cols, dxp)
    return dxp.new_zeros(*dxp.shape[:-2], h, w).index_add_(-2, rows, g)


def _backward(
    dout: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, kernel_size: int, stride: int
) -> tuple[torch.Tensor, torch.Tensor]:
    b, c, h, w = x.shape
    wc, k2, ho, wo = weight.shape[1:]
    mod = kernels()
    offsets = _offsets(h, w, kernel_size)
    dw = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
    npb = -(-(ho * wo) // _BLOCK_P)
    block_t = max(16, 1 << (k2 - 1).bit_length())
    mod._agg_bwd_weight[(b * wc * npb,)](
        x, dout, dw,
        *x.stride(), *dout.stride(), *dw.stride(),
        c, wc, h, w, ho, wo,
        n_pblocks=npb,
        KS=kernel_size, STRIDE=stride, BLOCK_T=block_t, BLOCK_P=_BLOCK_P,
        **offsets,
    )  # fmt: skip
    pad = kernel_size // 2
    hp, wp = (ho - 1) * stride + 2 * pad + 1, (wo - 1) * stride + 2 * pad + 1
    dxp = torch.empty(b, c, hp, wp, dtype=torch.float32, device=x.device)
    ncb, npp = -(-c // _BLOCK_C), -(-(hp * wp) // _BLOCK_P)
    mod._agg_bwd_input[(b * ncb * npp,)](
        weight, dout, dxp,
        *weight.stride(), *dout.stride(),
        c, wc, hp, wp, ho, wo,
        n_cblocks=ncb, n_pblocks=npp,
        KS=kernel_size, STRIDE=stride, BLOCK_C=_BLOCK_C, BLOCK_P=_BLOCK_P,
    )  # fmt: skip
    dx = _fold_padded(dxp, h, w, pad).to(x.dtype)
    return dx, dw


@torch.library.custom_op("acmix::local_aggregate_triton", mutates_args=())
def _aggregate_op(x: torch.Tensor, weight: torch.Tensor, kernel_size: int, stride: int) -> torch.Tensor:
    return _forward(x, weight, kernel_size, stride)


@_aggregate_op.register_fake
def _aggregate_fake(x, weight, kernel_size, stride):  # type: ignore[no-untyped-def]
    return _like_x(x, (x.shape[0], x.shape[1], weight.shape[-2], weight.shape[-1]))


@torch.library.custom_op("acmix::local_aggregate_triton_backward", mutates_args=())
def _aggregate_backward_op(
    dout: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, kernel_size: int, stride: int
) -> tuple[torch.Tensor, torch.Tensor]:
    return _backward(dout, x, weight, kernel_size, stride)


@_aggregate_backward_op.register_fake
def _aggregate_backward_fake(dout, x, weight, kernel_size, stride):  # type: ignore[no-untyped-def]
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    x, weight, kernel_size, stride = inputs
    ctx.save_for_backward(x, weight)
    ctx.meta = (kernel_size, stride)


def _aggregate_autograd(ctx: Any, dout: torch.Tensor) -> tuple[Any, ...]:
    x, weight = ctx.saved_tensors
    kernel_size, stride = ctx.meta
    dx, dw = _aggregate_backward_op(dout, x, weight, kernel_size, stride)
    return dx, dw, None, None


_aggregate_op.register_autograd(_aggregate_autograd, setup_context=_setup_context)


def local_aggregate_triton(x: torch.Tensor, weight: torch.Tensor, kernel_size: int, stride: int = 1) -> torch.Tensor:
    """Triton aggregation; same contract as :func:`acmix.ops.aggregation.local_aggregate_reference`.

    Shape:
        x: (B, C, H, W) (any strides); weight: (B, Wc, k*k, ceil(H/s), ceil(W/s)); returns (B, C, ceil(H/s),
        ceil(W/s)), channels_last when x is.
    """
    return _aggregate_op(x, weight, kernel_size, stride)
