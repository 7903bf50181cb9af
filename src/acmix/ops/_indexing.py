"""Border handling shared by every backend: generalised reflection.

The official operator pads keys, values and positions with ``ReflectionPad2d(k // 2)``, which only exists while
``k // 2 < H``. We define the border for every size as reflection repeated until the index lands inside the map
(numpy's ``mode="reflect"`` applied periodically, period ``2 (n - 1)``); for ``n == 1`` every index maps to 0. Where
``ReflectionPad2d`` is defined the two agree exactly (tested).
"""

from __future__ import annotations

import torch


def reflect_index(i: torch.Tensor, n: int) -> torch.Tensor:
    """Map integer positions ``i`` (any range) into ``[0, n)`` by repeated reflection without edge repeat."""
    if n == 1:
        return torch.zeros_like(i)
    period = 2 * (n - 1)
    # i mod period (floor), spelled with a floor division: exports with a symbolic n (ONNX has no Mod by a
    # symbolic scalar); the same integers as torch.remainder
    i = i - torch.div(i, period, rounding_mode="floor") * period
    return torch.where(i >= n, period - i, i)


def padded_indices(n: int, pad: int, device: torch.device | None = None) -> torch.Tensor:
    """Indices (n + 2 pad,) into a length-n axis that realise a reflection pad of ``pad`` on both sides."""
    return reflect_index(torch.arange(-pad, n + pad, device=device), n)


def window_indices(n: int, kernel_size: int, stride: int, device: torch.device | None = None) -> torch.Tensor:
    """Key positions (n_out, kernel_size) of the window of every output position along one axis.

    Output position ``y`` queries input position ``y * stride``; its window covers
    ``reflect(y * stride - k // 2 + t)`` for ``t in range(k)``. ``n_out = ceil(n / stride)``.
    """
    n_out = -(-n // stride)
    base = torch.arange(n_out, device=device) * stride - kernel_size // 2
    return reflect_index(base[:, None] + torch.arange(kernel_size, device=device)[None, :], n)


def reflect_pad2d(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Generalised reflection pad of the last two dims of ``x`` (..., H, W) -> (..., H + 2 pad, W + 2 pad)."""
    h, w = x.shape[-2:]
    x = x.index_select(-2, padded_indices(h, pad, x.device))
    return x.index_select(-1, padded_indices(w, pad, x.device))


def multiplicity(n: int, kernel_size: int, stride: int, device: torch.device | None = None) -> torch.Tensor:
    """How often input position j appears in the window of output position y: (n_out, n) integer counts.

    Softmax over a reflection-padded window equals softmax over distinct in-bounds keys with an additive
    ``log(multiplicity)`` bias (docs/derived-facts.md); backends that do not materialise padded copies use this.
    """
    idx = window_indices(n, kernel_size, stride, device)
    counts = torch.zeros(idx.shape[0], n, dtype=torch.int64, device=device)
    counts.scatter_add_(1, idx, torch.ones_like(idx))
    return counts
