"""Offset-by-offset patchwise aggregation (SAN): a memory-lean backend with no k^2 unfold of the features.

``out[b, c, i] = sum_t weight[b, c mod Wc, t, i] * x[b, c, window_t(i)]``: for each window offset t the features
of all outputs at once are a strided slice of the reflection-padded map (generalised reflection, so maps of any
size work), so the op is k^2 fused multiply-adds over whole maps. The autograd function saves the padded features
and the weights only (the unfold reference keeps a (B, C, k^2, Ho, Wo) copy of the features) and its backward is
the same loop transposed. Half precision is computed in float32.
"""

from __future__ import annotations

import torch

from .offset import _window_slice, compute_dtype, pad_map, unpad_grad


class OffsetAggregate(torch.autograd.Function):
    """Saves the padded features and the weights; backward loops over the offsets again."""

    @staticmethod
    def forward(ctx, x, weight, kernel_size, stride):  # type: ignore[override]
        b, c, h, w = x.shape
        wc = weight.shape[1]
        ho, wo = weight.shape[-2:]
        cdt = compute_dtype(x.dtype)
        xp = pad_map(x.to(cdt), kernel_size // 2)
        xp = xp.view(b, c // wc, wc, *xp.shape[-2:])  # (B, G, Wc, H + 2p, W + 2p): channel c = g * Wc + w
        wt = weight.to(cdt)
        out = xp.new_zeros(b, c // wc, wc, ho, wo)
        for t in range(kernel_size * kernel_size):
            x_t = _window_slice(xp, t // kernel_size, t % kernel_size, ho, wo, stride)
            out.addcmul_(wt[:, None, :, t], x_t)
        ctx.save_for_backward(xp, wt)
        ctx.meta = (kernel_size, stride, h, w, x.dtype, weight.dtype)
        return out.reshape(b, c, ho, wo).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        xp, wt = ctx.saved_tensors
        kernel_size, stride, h, w, x_dtype, w_dtype = ctx.meta
        b, g, wc, _, _ = xp.shape
        ho, wo = grad_out.shape[-2:]
        go = grad_out.to(xp.dtype).reshape(b, g, wc, ho, wo)
        dxp = torch.zeros_like(xp) if ctx.needs_input_grad[0] else None
        dw = torch.empty_like(wt) if ctx.needs_input_grad[1] else None
        prod = torch.empty_like(go)
        for t in range(kernel_size * kernel_size):
            dy, dx = t // kernel_size, t % kernel_size
            if dxp is not None:
                _window_slice(dxp, dy, dx, ho, wo, stride).addcmul_(wt[:, None, :, t], go)
            if dw is not None:
                torch.mul(go, _window_slice(xp, dy, dx, ho, wo, stride), out=prod)
                torch.sum(prod, dim=1, out=dw[:, :, t])
        dx_out = None
        if dxp is not None:
            dx_out = unpad_grad(dxp.reshape(b, g * wc, *xp.shape[-2:]), h, w, kernel_size // 2).to(x_dtype)
        return dx_out, None if dw is None else dw.to(w_dtype), None, None


def local_aggregate_offset(x: torch.Tensor, weight: torch.Tensor, kernel_size: int, stride: int = 1) -> torch.Tensor:
    """Offset-loop aggregation; same contract as :func:`acmix.ops.aggregation.local_aggregate_reference`.

    Shape:
        x: (B, C, H, W); weight: (B, Wc, k*k, ceil(H/s), ceil(W/s)); returns (B, C, ceil(H/s), ceil(W/s)).
    """
    out = OffsetAggregate.apply(x, weight, kernel_size, stride)
    assert isinstance(out, torch.Tensor)
    return out
