"""Halo-tiled local attention on fused scaled-dot-product attention (SDPA) kernels.

The output map is cut into T x T tiles of queries. All queries of a tile attend to one shared rectangle of real
(in-bounds) keys, the *halo*, that covers every window of the tile. Inside the halo each query keeps exactly its own
window through an additive bias: ``log(multiplicity)`` of the key in the query's reflection-padded window, and
``-inf`` outside it (docs/derived-facts.md: reflection padding is a multiplicity, not new keys). The bias is a product
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
from .._window import Window, attention_backend
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
    best = prefs[0]
    for t in prefs[1:]:  # a plain loop, not min(key=...): torch.compile traces it when n_out is symbolic
        if -(-n_out // t) * t < -(-n_out // best) * best:
            best = t
    return best


@dataclass(frozen=True)
class AxisPlan:
    """How one axis (length n) is cut into query tiles and key halos.

    Tile i holds output positions ``[i T, (i + 1) T)`` (queries at input ``y s``) and the keys at input positions
    ``[i T s - p, i T s - p + L)``, ``L = (T - 1) s + 2 p + 1``: every reflected window key lies in that range
    (a reflected index never leaves ``[y s - p, y s + p]``, and for ``p >= n - 1`` that range covers the whole
    axis). Positions outside ``[0, n)`` are zero padding with a ``-inf`` bias. The halos are therefore a regular
    ``unfold`` of the padded axis: no gather index is needed.
    """

    n: int
    n_out: int
    tiles: int
    tile: int
    halo: int
    pad_before: int  # p
    pad_after: int  # may be negative (the last keys are then never needed)
    q_pad: int  # queries appended to fill the last tile
    log_mult: torch.Tensor  # (tiles, tile, halo) float64 log multiplicity; -inf: not in the query's window


@functools.lru_cache(maxsize=64)
def axis_plan(n: int, kernel_size: int, stride: int, tile: int) -> AxisPlan:
    """The plan of one axis (see :class:`AxisPlan`); ``log_mult`` lives on the CPU."""
    p = kernel_size // 2
    n_out = -(-n // stride)
    tiles = -(-n_out // tile)
    halo = (tile - 1) * stride + 2 * p + 1
    step = tile * stride
    padded = (tiles - 1) * step + halo
    rows = torch.arange(tiles * tile).clamp(max=n_out - 1)  # padded queries copy the last real one's bias
    counts = multiplicity(n, kernel_size, stride)[rows].reshape(tiles, tile, n).double()  # (tiles, tile, n)
    pos = torch.arange(tiles)[:, None] * step - p + torch.arange(halo)  # (tiles, halo) input positions
    inside = (pos >= 0) & (pos < n)
    sel = torch.gather(counts, 2, pos.clamp(0, n - 1)[:, None, :].expand(tiles, tile, halo))
    sel = torch.where(inside[:, None, :], sel, torch.zeros_like(sel))
    log_mult = torch.where(sel > 0, sel.log(), torch.full_like(sel, -math.inf))
    return AxisPlan(n, n_out, tiles, tile, halo, p, padded - p - n, tiles * tile - n_out, log_mult)


@dataclass(frozen=True)
class TilePlan:
    """Both axes plus the (n_tiles, T_y*T_x, L_y*L_x) additive bias; built once per problem and cached."""

    y: AxisPlan
    x: AxisPlan
    bias: torch.Tensor


def build_tile_plan(
    h: int, w: int, kernel_size: int, stride: int, device: torch.device, dtype: torch.dtype, cached: bool = True
) -> TilePlan:
    """Tiles and the additive bias of the whole map; ``cached=False`` builds every tensor anew (for tracing)."""
    axis = axis_plan if cached else axis_plan.__wrapped__
    py = axis(h, kernel_size, stride, tile_size(-(-h // stride), stride))
    px = axis(w, kernel_size, stride, tile_size(-(-w // stride), stride))
    by, bx = py.log_mult, px.log_mult
    bias = by[:, None, :, None, :, None] + bx[None, :, None, :, None, :]  # (nty, ntx, Ty, Tx, Ly, Lx)
    bias = bias.reshape(py.tiles * px.tiles, py.tile * px.tile, py.halo * px.halo)
    return TilePlan(py, px, bias.to(device=device, dtype=dtype))


@functools.lru_cache(maxsize=32)
def tile_plan(h: int, w: int, kernel_size: int, stride: int, device: torch.device, dtype: torch.dtype) -> TilePlan:
    """:func:`build_tile_plan`, cached per shape, device and dtype (eager mode only)."""
    return build_tile_plan(h, w, kernel_size, stride, device, dtype)


def _plan_for(q: torch.Tensor, h: int, w: int, kernel_size: int, stride: int) -> TilePlan:
    """The cached plan in eager mode; while torch.compile / torch.export trace (fake tensors), a fresh one, so no
    traced tensor is ever stored in the cache and reused by a later eager call."""
    if torch.compiler.is_compiling() or torch._guards.detect_fake_mode(q) is not None:
        return build_tile_plan(h, w, kernel_size, stride, q.device, q.dtype, cached=False)
    return tile_plan(h, w, kernel_size, stride, q.device, q.dtype)


def query_tiles(q: torch.Tensor, plan: TilePlan, stride: int) -> torch.Tensor:
    """(B, N, D, H, W) -> (B*N, tiles, T_y*T_x, D): strided queries, padded to whole tiles (one copy)."""
    b, n, d = q.shape[:3]
    py, px = plan.y, plan.x
    qs = F.pad(q[..., ::stride, ::stride], (0, px.q_pad, 0, py.q_pad))  # (B, N, D, nty*Ty, ntx*Tx)
    qs = qs.reshape(b, n, d, py.tiles, py.tile, px.tiles, px.tile).permute(0, 1, 3, 5, 4, 6, 2)
    return qs.reshape(b * n, py.tiles * px.tiles, py.tile * px.tile, d)


class _HaloTiles(torch.autograd.Function):
    """pad + unfold + one copy forward; the backward sums overlapping halos with ``F.fold`` (col2im), about twice
    as fast on CPU as the autograd of two ``unfold`` calls (measured at B = 8, C = 64, 56 x 56)."""

    @staticmethod
    def forward(ctx, x, plan, stride):  # type: ignore[override]
        b, n, d = x.shape[:3]
        py, px = plan.y, plan.x
        xp = F.pad(x, (px.pad_before, px.pad_after, py.pad_before, py.pad_after))
        xt = xp.unfold(3, py.halo, py.tile * stride).unfold(4, px.halo, px.tile * stride)  # (B,N,D,nty,ntx,Ly,Lx)
        xt = xt.permute(0, 1, 3, 4, 5, 6, 2)  # (B, N, nty, ntx, Ly, Lx, D)
        ctx.meta = (plan, stride, x.shape)
        return xt.reshape(b * n, py.tiles * px.tiles, py.halo * px.halo, d)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        plan, stride, shape = ctx.meta
        b, n, d = shape[:3]
        py, px = plan.y, plan.x
        cols = grad.reshape(b * n, py.tiles * px.tiles, py.halo * px.halo, d).permute(0, 3, 2, 1)
        cols = cols.reshape(b * n, d * py.halo * px.halo, py.tiles * px.tiles)  # (B*N, D*Ly*Lx, tiles)
        size = ((py.tiles - 1) * py.tile * stride + py.halo, (px.tiles - 1) * px.tile * stride + px.halo)
        out = F.fold(cols, size, (py.halo, px.halo), stride=(py.tile * stride, px.tile * stride))
        out = F.pad(out, (-px.pad_before, -px.pad_after, -py.pad_before, -py.pad_after))  # crop (or zero-extend)
        return out.reshape(shape), None, None


def halo_tiles(x: torch.Tensor, plan: TilePlan, stride: int) -> torch.Tensor:
    """(B, N, D, H, W) -> (B*N, tiles, L_y*L_x, D): the zero-padded halo of every tile (one copy)."""
    out = _HaloTiles.apply(x, plan, stride)
    assert isinstance(out, torch.Tensor)
    return out


@attention_backend
def local_attention_tiled(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, win: Window) -> torch.Tensor:
    """Halo-tiled SDPA backend (contract: :mod:`acmix.ops._window`)."""
    b, n, d, h, w = q.shape
    stride = win.stride
    plan = _plan_for(q, h, w, win.kernel_size, stride)
    py, px = plan.y, plan.x
    qt = query_tiles(q, plan, stride)  # (B*N, tiles, Ty*Tx, D)
    kt = halo_tiles(offset_keys(k, win.rel_pos), plan, stride)  # (B*N, tiles, Ly*Lx, D)
    vt = halo_tiles(v, plan, stride)
    ot = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=plan.bias.unsqueeze(0), scale=win.scale)
    out = ot.reshape(b, n, py.tiles, px.tiles, py.tile, px.tile, d).permute(0, 1, 6, 2, 4, 3, 5)
    out = out.reshape(b, n, d, py.tiles * py.tile, px.tiles * px.tile)  # (B, N, D, Ho + pad, Wo + pad)
    return out[..., : py.n_out, : px.n_out]
