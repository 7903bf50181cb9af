"""Halo-tiled local attention on fused scaled-dot-product attention (SDPA) kernels.

The output map is cut into T x T tiles of queries. All queries of a tile attend to one shared rectangle of real
(in-bounds) keys, the *halo*, that covers every window of the tile. Inside the halo each query keeps exactly its own
window through an additive bias: ``log(multiplicity)`` of the key in the query's reflection-padded window, and
``-inf`` outside it (paper.md section 8: reflection padding is a multiplicity, not new keys). The bias is a product
of a row factor and a column factor, depends only on the map size, kernel, stride and tile, and is shared over batch
and heads, so it is built once per shape and cached.

Every tile is then one dense attention problem, ``(T*T queries) x (L_y*L_x keys)``, batched over (batch x heads) and
tiles and handed to :func:`torch.nn.functional.scaled_dot_product_attention`. Its fused kernels (flash attention
on CPU and CUDA) keep only the log-sum-exp for the backward and recompute the weights, so the memory cost is the
gathered halo keys/values (about ``(L/T)^2`` times the map: ~3x at T = 8, k = 7) instead of k^2 = 49x.
The price is wasted multiply-adds on halo keys outside a query's window; matrix-multiply throughput pays that back.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .._indexing import multiplicity
from .offset import offset_keys


def tile_size(n_out: int, stride: int) -> int:
    """Query tile edge for an output axis of ``n_out``.

    Measured on a 2-core CPU at k = 7 (B = 8, C = 64, 56 x 56): 8 x 8 tiles are fastest at stride 1 (halo 14 x 14)
    and 7 x 7 at stride 2 (halo 19 x 19); much smaller tiles waste the matrix kernels, larger ones add halo keys.
    Small axes are one tile. Among the preferred sizes the one that divides ``n_out`` (or pads least) wins.
    """
    prefs = (8, 7) if stride == 1 else (7, 8)
    if n_out <= prefs[0] + 4:
        return n_out
    return min(prefs, key=lambda t: (-(-n_out // t) * t - n_out, prefs.index(t)))


@functools.lru_cache(maxsize=64)
def _axis_plan(n: int, kernel_size: int, stride: int, tile: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Per-axis gather plan.

    Returns:
        q_idx (n_tiles * tile,): input positions of the (padded) queries, clamped to the last real query;
        k_idx (n_tiles * halo,): input positions of each tile's halo keys;
        log_mult (n_tiles, tile, halo): float64 log multiplicity of each halo key in each query's window (-inf: none).
    """
    n_out = -(-n // stride)
    n_tiles = -(-n_out // tile)
    rows = torch.arange(n_tiles * tile).clamp(max=n_out - 1)  # output positions, tail padded by repetition
    counts = multiplicity(n, kernel_size, stride)[rows].reshape(n_tiles, tile, n)  # (n_tiles, tile, n)
    present = counts.sum(1) > 0  # (n_tiles, n): keys any query of the tile needs
    idx = torch.arange(n)
    lo = torch.where(present, idx, n).min(1).values
    hi = torch.where(present, idx, -1).max(1).values
    halo = int((hi - lo + 1).max())
    start = lo.clamp(max=n - halo)  # keep the halo inside [0, n)
    k_idx = start[:, None] + torch.arange(halo)  # (n_tiles, halo)
    sel = torch.gather(counts, 2, k_idx[:, None, :].expand(n_tiles, tile, halo)).double()
    log_mult = torch.where(sel > 0, sel.log(), torch.full_like(sel, -math.inf))
    return (rows * stride).to(device), k_idx.reshape(-1).to(device), log_mult.to(device)


@dataclass(frozen=True)
class TilePlan:
    """Everything the tiled backend needs for one (H, W, k, stride) problem; built once and cached."""

    tiles: tuple[int, int]  # (n_tiles_y, n_tiles_x)
    tile: tuple[int, int]  # (T_y, T_x) queries per tile edge
    halo: tuple[int, int]  # (L_y, L_x) keys per halo edge
    out: tuple[int, int]  # (Ho, Wo)
    q_rows: torch.Tensor  # (n_tiles_y * T_y,) input rows of the queries
    q_cols: torch.Tensor  # (n_tiles_x * T_x,)
    k_rows: torch.Tensor  # (n_tiles_y * L_y,) input rows of the halo keys
    k_cols: torch.Tensor  # (n_tiles_x * L_x,)
    bias: torch.Tensor  # (n_tiles, T_y * T_x, L_y * L_x) log multiplicity, -inf outside the window


@functools.lru_cache(maxsize=32)
def tile_plan(h: int, w: int, kernel_size: int, stride: int, device: torch.device, dtype: torch.dtype) -> TilePlan:
    """Gather indices and the additive bias of the whole map (cached per shape, device and dtype)."""
    ho, wo = -(-h // stride), -(-w // stride)
    ty, tx = tile_size(ho, stride), tile_size(wo, stride)
    qy, ky, by = _axis_plan(h, kernel_size, stride, ty, device)
    qx, kx, bx = _axis_plan(w, kernel_size, stride, tx, device)
    nty, ly = by.shape[0], by.shape[2]
    ntx, lx = bx.shape[0], bx.shape[2]
    bias = by[:, None, :, None, :, None] + bx[None, :, None, :, None, :]  # (nty, ntx, Ty, Tx, Ly, Lx)
    bias = bias.reshape(nty * ntx, ty * tx, ly * lx).to(dtype)
    return TilePlan((nty, ntx), (ty, tx), (ly, lx), (ho, wo), qy, qx, ky, kx, bias)


def to_tiles(
    x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, ny: int, ty: int, nx: int, tx: int
) -> torch.Tensor:
    """Gather (B, N, D, H, W) at rows x cols and lay it out as (B*N, ny*nx, ty*tx, D) (one copy)."""
    b, n, d = x.shape[:3]
    g = x.index_select(3, rows).index_select(4, cols)  # (B, N, D, ny*ty, nx*tx)
    g = g.reshape(b, n, d, ny, ty, nx, tx).permute(0, 1, 3, 5, 4, 6, 2)  # (B, N, ny, nx, ty, tx, D)
    return g.reshape(b * n, ny * nx, ty * tx, d)


def local_attention_tiled(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: int,
    stride: int = 1,
    rel_pos: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Halo-tiled SDPA backend; same contract as :func:`acmix.ops._reference.local_attention_reference`.

    Shape:
        q, k, v: (B, N, D, H, W); rel_pos: (D, H, W) or broadcastable 5-D; returns (B, N, D, ceil(H/s), ceil(W/s)).
    """
    b, n, d, h, w = q.shape
    scale = d**-0.5 if scale is None else scale
    plan = tile_plan(h, w, kernel_size, stride, q.device, q.dtype)
    (nty, ntx), (ty, tx), (ly, lx), (ho, wo) = plan.tiles, plan.tile, plan.halo, plan.out
    qt = to_tiles(q, plan.q_rows, plan.q_cols, nty, ty, ntx, tx)  # (B*N, tiles, Ty*Tx, D)
    kt = to_tiles(offset_keys(k, rel_pos), plan.k_rows, plan.k_cols, nty, ly, ntx, lx)  # (B*N, tiles, Ly*Lx, D)
    vt = to_tiles(v, plan.k_rows, plan.k_cols, nty, ly, ntx, lx)
    ot = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=plan.bias.unsqueeze(0), scale=float(scale))
    out = ot.reshape(b, n, nty, ntx, ty, tx, d).permute(0, 1, 6, 2, 4, 3, 5).reshape(b, n, d, nty * ty, ntx * tx)
    return out[..., :ho, :wo]
