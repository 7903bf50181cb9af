"""Shared test helpers: an independent naive local attention."""

from __future__ import annotations

import torch


def bounce(i: int, n: int) -> int:
    """Reflect i into [0, n) by walking, bouncing off both ends (independent of acmix.ops._indexing)."""
    if n == 1:
        return 0
    while i < 0 or i >= n:
        i = -i if i < 0 else 2 * (n - 1) - i
    return i


def naive_local_attention(q, k, v, kernel_size, stride=1, rel_pos=None, scale=None):
    """Python loops over every output pixel. q, k, v: (B, N, D, H, W); rel_pos: (D, H, W) or None."""
    b, n, d, h, w = q.shape
    scale = d**-0.5 if scale is None else scale
    ho, wo = -(-h // stride), -(-w // stride)
    out = torch.zeros(b, n, d, ho, wo, dtype=q.dtype)
    p = kernel_size // 2
    for bi in range(b):
        for hi in range(n):
            for y in range(ho):
                for x in range(wo):
                    cy, cx = y * stride, x * stride
                    qi = q[bi, hi, :, cy, cx]
                    logits, values = [], []
                    for dy in range(kernel_size):
                        for dx in range(kernel_size):
                            r, c = bounce(cy - p + dy, h), bounce(cx - p + dx, w)
                            key = k[bi, hi, :, r, c]
                            if rel_pos is not None:
                                key = key + rel_pos[:, cy, cx] - rel_pos[:, r, c]
                            logits.append(scale * (qi * key).sum())
                            values.append(v[bi, hi, :, r, c])
                    a = torch.stack(logits).softmax(0)
                    out[bi, hi, :, y, x] = (a[:, None] * torch.stack(values)).sum(0)
    return out
