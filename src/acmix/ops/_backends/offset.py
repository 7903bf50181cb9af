"""Offset-by-offset local attention: a memory-lean CPU/any-device backend with a recomputing backward.

Two facts from docs/derived-facts.md make this simple:

* the relative position term is a key offset: ``q_i . (k_j + p_i - p_j)`` has the same softmax over j as
  ``q_i . (k_j - p_j)``, so the op is plain local attention over ``(q, k' = k - p, v)``;
* the reflection border only repeats real keys, so padding ``k'`` and ``v`` once (generalised reflection,
  :func:`acmix.ops._indexing.reflect_pad2d`) gives every window its exact contents.

The window is then visited one offset ``(dy, dx)`` at a time: the keys of offset t for all queries at once are a
strided slice of the padded map, so each step is a few whole-map elementwise ops. The forward keeps the k^2 logits of
one step's worth of heads (not of channels) and the autograd function saves only ``q``, the padded ``k'`` and ``v``,
the output and the softmax log-sum-exp; the backward recomputes the attention weights offset by offset (like
FlashAttention's backward) instead of storing the (B, N, D, k^2, H, W) expansion that the unfold reference keeps.

Half precision is computed in float32 (inputs upcast once, softmax statistics and accumulators in float32).
"""

from __future__ import annotations

import torch

from .._indexing import padded_indices
from .._window import Window, attention_backend


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other float type is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def offset_keys(k: torch.Tensor, rel_pos: torch.Tensor | None) -> torch.Tensor:
    """``k' = k - p``: the relative position term as a key offset (docs/derived-facts.md). Shapes as ``k``."""
    if rel_pos is None:
        return k
    p = rel_pos if rel_pos.dim() == 5 else rel_pos[None, None]
    return k - p.to(k.dtype)


def pad_map(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Generalised reflection pad of (..., H, W) by ``pad`` on every side (contiguous result)."""
    h, w = x.shape[-2:]
    x = x.index_select(-2, padded_indices(h, pad, x.device))
    return x.index_select(-1, padded_indices(w, pad, x.device))


def unpad_grad(g: torch.Tensor, h: int, w: int, pad: int) -> torch.Tensor:
    """Adjoint of :func:`pad_map`: fold the gradient of a padded (..., H + 2p, W + 2p) map back onto (..., H, W)."""
    rows = padded_indices(h, pad, g.device)
    cols = padded_indices(w, pad, g.device)
    g_cols = torch.zeros(*g.shape[:-1], w, dtype=g.dtype, device=g.device).index_add_(-1, cols, g)
    return torch.zeros(*g.shape[:-2], h, w, dtype=g.dtype, device=g.device).index_add_(-2, rows, g_cols)


def _window_slice(xp: torch.Tensor, dy: int, dx: int, ho: int, wo: int, stride: int) -> torch.Tensor:
    """Keys/values at window offset (dy, dx) for every query: (..., Ho, Wo) strided view of the padded map."""
    return xp[..., dy : dy + stride * (ho - 1) + 1 : stride, dx : dx + stride * (wo - 1) + 1 : stride]


def offset_forward(
    qs: torch.Tensor, kp: torch.Tensor, vp: torch.Tensor, kernel_size: int, stride: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward pass on padded maps.

    Shape:
        qs: (B, N, D, Ho, Wo) strided, pre-scaled queries; kp, vp: (B, N, D, H + 2p, W + 2p) padded keys
        (already offset by the positions) and values; returns out (B, N, D, Ho, Wo) and lse (B, N, Ho, Wo).
    """
    ho, wo = qs.shape[-2:]
    k2 = kernel_size * kernel_size
    logits = qs.new_empty(k2, qs.shape[0], qs.shape[1], ho, wo)  # (k2, B, N, Ho, Wo)
    prod = torch.empty_like(qs)
    for t in range(k2):
        torch.mul(qs, _window_slice(kp, t // kernel_size, t % kernel_size, ho, wo, stride), out=prod)
        torch.sum(prod, dim=2, out=logits[t])
    lse = torch.logsumexp(logits, dim=0)  # (B, N, Ho, Wo)
    attn = logits.sub_(lse).exp_()  # softmax weights, in place
    out = torch.zeros_like(qs)
    for t in range(k2):
        out.addcmul_(attn[t].unsqueeze(2), _window_slice(vp, t // kernel_size, t % kernel_size, ho, wo, stride))
    return out, lse


def offset_backward(
    grad_out: torch.Tensor,
    qs: torch.Tensor,
    kp: torch.Tensor,
    vp: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    kernel_size: int,
    stride: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward pass: recompute each offset's weights from ``lse``; returns grads of qs, kp and vp (padded)."""
    ho, wo = qs.shape[-2:]
    delta = (grad_out * out).sum(2)  # (B, N, Ho, Wo): sum_j A_ij dA_ij
    dqs = torch.zeros_like(qs)
    dkp = torch.zeros_like(kp)
    dvp = torch.zeros_like(vp)
    prod = torch.empty_like(qs)
    a = lse.new_empty(lse.shape)
    da = lse.new_empty(lse.shape)
    for t in range(kernel_size * kernel_size):
        dy, dx = t // kernel_size, t % kernel_size
        k_t = _window_slice(kp, dy, dx, ho, wo, stride)
        v_t = _window_slice(vp, dy, dx, ho, wo, stride)
        torch.mul(qs, k_t, out=prod)
        torch.sum(prod, dim=2, out=a)
        a.sub_(lse).exp_()  # A_t (B, N, Ho, Wo)
        torch.mul(grad_out, v_t, out=prod)
        torch.sum(prod, dim=2, out=da)  # dA_t
        _window_slice(dvp, dy, dx, ho, wo, stride).addcmul_(a.unsqueeze(2), grad_out)
        ds = da.sub_(delta).mul_(a).unsqueeze(2)  # d logit_t = A_t (dA_t - delta)
        dqs.addcmul_(ds, k_t)
        _window_slice(dkp, dy, dx, ho, wo, stride).addcmul_(ds, qs)
    return dqs, dkp, dvp


class OffsetAttention(torch.autograd.Function):
    """Local attention over (q, k', v) without positions; saves q, padded k' and v, out and lse only."""

    @staticmethod
    def forward(ctx, q, kq, v, kernel_size, stride, scale):  # type: ignore[override]
        h, w = q.shape[-2:]
        pad = kernel_size // 2
        cdt = compute_dtype(q.dtype)
        qs = (q[..., ::stride, ::stride].to(cdt) * scale).contiguous()
        kp = pad_map(kq.to(cdt), pad)
        vp = pad_map(v.to(cdt), pad)
        out, lse = offset_forward(qs, kp, vp, kernel_size, stride)
        ctx.save_for_backward(qs, kp, vp, out, lse)
        ctx.meta = (kernel_size, stride, scale, h, w, q.dtype)
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        qs, kp, vp, out, lse = ctx.saved_tensors
        kernel_size, stride, scale, h, w, dtype = ctx.meta
        dqs, dkp, dvp = offset_backward(grad_out.to(qs.dtype), qs, kp, vp, out, lse, kernel_size, stride)
        pad = kernel_size // 2
        dq = None
        if ctx.needs_input_grad[0]:
            dq = torch.zeros(*qs.shape[:-2], h, w, dtype=qs.dtype, device=qs.device)
            dq[..., ::stride, ::stride] = dqs * scale
            dq = dq.to(dtype)
        dk = unpad_grad(dkp, h, w, pad).to(dtype) if ctx.needs_input_grad[1] else None
        dv = unpad_grad(dvp, h, w, pad).to(dtype) if ctx.needs_input_grad[2] else None
        return dq, dk, dv, None, None, None


@attention_backend
def local_attention_offset(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: Window) -> torch.Tensor:
    """Offset-loop backend (contract: :mod:`acmix.ops._window`)."""
    out = OffsetAttention.apply(q, offset_keys(k, w.rel_pos), v, w.kernel_size, w.stride, w.scale)
    assert isinstance(out, torch.Tensor)
    return out
