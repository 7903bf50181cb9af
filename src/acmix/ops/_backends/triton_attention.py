"""Fused local attention in Triton (``backend="triton"``): one kernel forward, two kernels backward.

The op is ACmix's window attention with the relative position term as a key offset (``q_i . (k_j - p_j)``; the
``q_i . p_i`` term is the same for every key of a query and cancels in the softmax, docs/derived-facts.md) and the
reflection border as an additive ``log(multiplicity)`` bias (a reflected key is a real key counted again).

Forward (:func:`_triton_kernels._attn_fwd`): a program owns a tile of queries of one (batch, head) (4 x 4, or the
whole map up to 8 x 8; :data:`QUERY_TILES`); it streams the tile's *halo* (every real key within k // 2 of one of
its query centres, ``((T - 1) s + k)^2`` keys at most) in chunks of ``BLOCK_N`` straight from q, k, v and the
position map in their own strides, computes the logits
with ``tl.dot`` over head_dim, adds the per-(query, key) log multiplicity computed from the indices (``-inf`` for keys
outside a query's window, so every query sees exactly its own window), keeps an online softmax and accumulates the
values. It stores the output and the log-sum-exp only: nothing of size k^2 x map is ever written.

Backward: a query-centric kernel recomputes the weights from the log-sum-exp and forms ``dq`` (and
``delta = dO . O``); a key-centric kernel owns a tile of keys, visits every query whose window can contain them
(centres within k // 2: the forward halo bound read the other way) and forms ``dk'`` and ``dv`` without atomics,
so the result is deterministic. ``d rel_pos = -sum dk'`` over the broadcast dimensions.

Registered through :mod:`torch.library` (``acmix::local_attention_triton`` and its backward op, with fake
implementations), so ``torch.compile`` keeps the op in the graph without a break. Storage float32 / float16 /
bfloat16; every product is accumulated in float32; float32 dots honour ``torch.backends.cuda.matmul.allow_tf32``.
Any head_dim up to 128 (padded to a power of two >= 16 inside the kernel), any odd window, stride >= 1 and maps down
to 1 x 1. Runs on CUDA, or on the CPU in Triton's interpreter when ``TRITON_INTERPRET=1`` was set before the first
launch (slow; used by the test suite).
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
from types import ModuleType
from typing import Any

import torch

from .._window import Window, attention_backend

#: storage dtypes the kernels accept
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: largest head_dim (the accumulators of one tile live in registers)
MAX_HEAD_DIM = 128
_LOG2E = 1.4426950408889634
_KERNELS_MODULE = "acmix.ops._backends._triton_kernels"


def interpreter_requested() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for Triton's CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on")


def _kernels_interpreted() -> bool | None:
    """None before the kernels are imported; afterwards whether they were decorated for the interpreter."""
    mod = sys.modules.get(_KERNELS_MODULE)
    if mod is None:
        return None
    return type(mod._attn_fwd).__name__ == "InterpretedFunction"


def triton_status() -> tuple[bool, str]:
    """Whether Triton is installed at all (without importing it)."""
    if importlib.util.find_spec("triton") is None:
        return False, "Triton is not installed (it ships with CUDA builds of torch on Linux)"
    return True, ""


def can_run_on(x: torch.Tensor) -> tuple[bool, str]:
    """Device and dtype rules shared by both Triton ops: CUDA, or CPU under ``TRITON_INTERPRET=1``."""
    ok, reason = triton_status()
    if not ok:
        return ok, reason
    interpreted = _kernels_interpreted()
    if x.device.type == "cuda":
        if interpreted:
            return False, "the Triton kernels were loaded for the CPU interpreter (TRITON_INTERPRET=1)"
    elif x.device.type == "cpu":
        if not interpreter_requested():
            return False, "triton needs a CUDA tensor (or TRITON_INTERPRET=1 for Triton's slow CPU interpreter)"
        if interpreted is False:
            return False, "TRITON_INTERPRET=1 was set after the Triton kernels were compiled for the GPU"
    else:
        return False, f"triton needs a CUDA tensor, got a {x.device.type} tensor"
    if x.dtype not in TRITON_DTYPES:
        return False, f"triton supports float32/float16/bfloat16, got {x.dtype}"
    if x.device.type == "cuda" and x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) < (8, 0):
        return False, "triton bfloat16 needs a GPU of compute capability >= 8.0 (Ampere or newer)"
    return True, ""


def can_run_triton(q: torch.Tensor) -> tuple[bool, str]:
    """The local-attention backend's predicate: :func:`can_run_on` plus head_dim <= 128."""
    ok, reason = can_run_on(q)
    if ok and q.dim() == 5 and q.shape[2] > MAX_HEAD_DIM:
        return False, f"triton supports head_dim <= {MAX_HEAD_DIM}, got {q.shape[2]}"
    return ok, reason


def kernels() -> ModuleType:
    """The Triton kernel module (imported on first use; see the module docstring of ``_triton_kernels``)."""
    from . import _triton_kernels

    return _triton_kernels


def axis_reflection(n: int, pad: int) -> tuple[int, int, bool]:
    """(period P, non-negative offset OFF (a multiple of P), reflect-at-most-once) of an axis of length n."""
    period = max(2 * (n - 1), 1)
    off = period * (-(-(pad + n + 2) // period))
    return period, off, pad <= n - 1


def empty_like_layout(q: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> torch.Tensor:
    """A new (B, N, D, h, w) tensor in q's memory layout: channels-last-like (head_dim fastest) or contiguous.

    Either way ``reshape(B, N * D, h, w)`` of the result is a view (NCHW or channels_last).
    """
    dtype = q.dtype if dtype is None else dtype
    b, n, d, h, w = shape
    s = q.stride()
    if q.shape[2] > 1 and s[2] < s[3] and s[2] < s[4] and s[1] >= s[2] * q.shape[2]:
        return torch.empty(b, h, w, n, d, dtype=dtype, device=q.device).permute(0, 3, 4, 1, 2)
    return torch.empty(shape, dtype=dtype, device=q.device)


def _precision(x: torch.Tensor) -> str:
    if x.dtype == torch.float32 and x.device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _block_d(d: int) -> int:
    return max(16, 1 << (d - 1).bit_length())


def _warps(block_d: int) -> int:
    return 8 if block_d >= 128 else 4


#: tile edges (rows, columns; each a power of two, product >= 16) per stride: the forward and dq kernels tile the
#: queries, the dk/dv kernel the keys. Chosen on paper, NOT yet tuned on a GPU (``benchmarks/gpu_check.py`` times
#: the alternatives): a T x T query tile scans ((T - 1) s + k)^2 keys per query in 64-key chunks, so at k = 7 a 4 x 4
#: tile computes 128 (stride 1) / 192 (stride 2) logits per query against 256 / 448 for 8 x 8, at the price of
#: reading each key from L2 about twice as often; a key tile sees ((T - 1) + 2p) / s query rows.
QUERY_TILES: dict[int, tuple[int, int]] = {1: (4, 4), 2: (4, 4)}
KEY_TILES: dict[int, tuple[int, int]] = {1: (4, 4), 2: (8, 8)}
#: maps that fit in this tile are one tile (every query of the map shares one halo: the whole map)
SMALL_MAP_TILE = (8, 8)


def query_tile(stride: int, ho: int, wo: int) -> tuple[int, int]:
    """Query tile (rows, columns) for an output map of ho x wo (see :data:`QUERY_TILES`)."""
    if ho <= SMALL_MAP_TILE[0] and wo <= SMALL_MAP_TILE[1]:
        return SMALL_MAP_TILE
    return QUERY_TILES.get(stride, QUERY_TILES[2])


def key_tile(stride: int, h: int, w: int) -> tuple[int, int]:
    """Key tile (rows, columns) of the dk/dv kernel for an input map of h x w (see :data:`KEY_TILES`)."""
    if h <= SMALL_MAP_TILE[0] and w <= SMALL_MAP_TILE[1]:
        return SMALL_MAP_TILE
    return KEY_TILES.get(stride, KEY_TILES[2])


def _pos5(pos: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor:
    """rel_pos as a (B, N, D, H, W) view of q's shape (zero strides where broadcast); q itself when absent."""
    if pos is None:
        return q  # never read (HAS_POS=False); any valid pointer will do
    p = pos[None, None] if pos.dim() == 3 else pos
    return p.expand(q.shape)


def _kernel_args(q: torch.Tensor, pos: torch.Tensor | None, kernel_size: int, stride: int) -> dict[str, Any]:
    """Constexpr, scalar and launch arguments shared by the three attention kernels (imports the kernels first)."""
    kernels()
    h, w = q.shape[-2:]
    pad = kernel_size // 2
    py, offy, oncey = axis_reflection(h, pad)
    px, offx, oncex = axis_reflection(w, pad)
    block_d = _block_d(q.shape[2])
    return {
        "Py": py,
        "OFFy": offy,
        "Px": px,
        "OFFx": offx,
        "PAD": pad,
        "STRIDE": stride,
        "ONCE_Y": oncey,
        "ONCE_X": oncex,
        "PRECISION": _precision(q),
        "UPCAST": q.dtype == torch.bfloat16 and bool(_kernels_interpreted()),
        "BLOCK_D": block_d,
        "HAS_POS": pos is not None,
        "num_warps": _warps(block_d),
    }


def _launch(
    kernel: Any,
    tensors: tuple[torch.Tensor, ...],
    scales: tuple[float, ...],
    tile: tuple[int, int],
    extent: tuple[int, int],
    **kwargs: Any,
) -> None:
    """One program per (batch, head) and ``tile`` of an ``extent`` map.

    ``tensors``: q, k, v, p (B, N, D, H, W), then out or dO (B, N, D, HO, WO), then the kernel's others. The kernel
    takes them, the strides of their five-dimensional members in order (the (B N, HO WO) log-sum-exp and delta have
    none), the sizes N, H, W, HO, WO, D, ``scales``, the tile counts and ``kwargs``.
    """
    b, n, d, h, w = tensors[0].shape
    ho, wo = tensors[4].shape[-2:]
    nty, ntx = -(-extent[0] // tile[0]), -(-extent[1] // tile[1])
    strides = [s for t in tensors if t.dim() == 5 for s in t.stride()]
    kernel[(b * n * nty * ntx,)](
        *tensors, *strides, n, h, w, ho, wo, d, *scales, n_tiles=nty * ntx, n_tiles_x=ntx, **kwargs
    )


# ----------------------------------------------------------------------------------------------------------------
# torch.library registration: opaque to torch.compile (no graph break), autograd through the backward op
# ----------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("acmix::local_attention_triton", mutates_args=())
def _attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pos: torch.Tensor | None,
    kernel_size: int,
    stride: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Output (B, N, D, HO, WO) in q's layout and the base-2 log-sum-exp (B N, HO WO) float32."""
    b, n, d, h, w = q.shape
    ho, wo = -(-h // stride), -(-w // stride)
    out = empty_like_layout(q, (b, n, d, ho, wo))
    lse = torch.empty(b * n, ho * wo, dtype=torch.float32, device=q.device)
    tqy, tqx = query_tile(stride, ho, wo)
    _launch(
        kernels()._attn_fwd, (q, k, v, _pos5(pos, q), out, lse), (float(scale) * _LOG2E,), (tqy, tqx), (ho, wo),
        TQY=tqy, TQX=tqx, BLOCK_N=64, **_kernel_args(q, pos, kernel_size, stride),
    )  # fmt: skip
    return out, lse


@_attention_op.register_fake
def _attention_fake(q, k, v, pos, kernel_size, stride, scale):  # type: ignore[no-untyped-def]
    b, n, d, h, w = q.shape
    ho, wo = -(-h // stride), -(-w // stride)
    return empty_like_layout(q, (b, n, d, ho, wo)), q.new_empty(b * n, ho * wo, dtype=torch.float32)


@torch.library.custom_op("acmix::local_attention_triton_backward", mutates_args=())
def _attention_backward_op(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pos: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    kernel_size: int,
    stride: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk' and dv, each in q's shape and layout: the query-centric kernel (dq, delta), then the key-centric one."""
    dq = empty_like_layout(q, tuple(q.shape))
    if stride > 1:
        dq.zero_()  # only every stride-th position is a query
    dk = empty_like_layout(q, tuple(q.shape))
    dv = empty_like_layout(q, tuple(q.shape))
    delta = torch.empty_like(lse)
    p = _pos5(pos, q)
    args = _kernel_args(q, pos, kernel_size, stride)
    scales = (float(scale) * _LOG2E, float(scale))
    (h, w), (ho, wo) = q.shape[-2:], out.shape[-2:]
    mod = kernels()
    tqy, tqx = query_tile(stride, ho, wo)
    _launch(
        mod._attn_bwd_dq, (q, k, v, p, out, dout, lse, delta, dq), scales, (tqy, tqx), (ho, wo),
        TQY=tqy, TQX=tqx, BLOCK_N=64, **args,
    )  # fmt: skip
    tky, tkx = key_tile(stride, h, w)
    _launch(
        mod._attn_bwd_dkdv, (q, k, v, p, dout, lse, delta, dk, dv), scales, (tky, tkx), (h, w),
        TKY=tky, TKX=tkx, BLOCK_M=64, **args,
    )  # fmt: skip
    return dq, dk, dv


@_attention_backward_op.register_fake
def _attention_backward_fake(dout, q, k, v, pos, out, lse, kernel_size, stride, scale):  # type: ignore[no-untyped-def]
    return tuple(empty_like_layout(q, tuple(q.shape)) for _ in range(3))


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, torch.Tensor]) -> None:
    q, k, v, pos, kernel_size, stride, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, pos, out, lse)
    ctx.meta = (kernel_size, stride, scale)


def _attention_autograd(ctx: Any, dout: torch.Tensor, dlse: torch.Tensor | None) -> tuple[Any, ...]:
    q, k, v, pos, out, lse = ctx.saved_tensors
    kernel_size, stride, scale = ctx.meta
    dq, dk, dv = _attention_backward_op(dout, q, k, v, pos, out, lse, kernel_size, stride, scale)
    dpos = None
    if pos is not None and ctx.needs_input_grad[3]:
        shape5 = pos.shape if pos.dim() == 5 else (1, 1, *pos.shape)
        dpos = (-dk.float().sum_to_size(shape5)).reshape(pos.shape).to(pos.dtype)  # k' = k - p
    return dq, dk, dv, dpos, None, None, None


_attention_op.register_autograd(_attention_autograd, setup_context=_setup_context)


@attention_backend
def local_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: Window) -> torch.Tensor:
    """Triton backend (contract: :mod:`acmix.ops._window`).

    q, k, v may be any strided views (e.g. slices of one (B, 3C, H, W) projection, NCHW or channels_last); the
    output follows q's layout (channels-last-like when head_dim is q's fastest dimension, else contiguous).
    """
    pos = None if w.rel_pos is None else w.rel_pos.to(q.dtype)
    if not math.isfinite(w.scale):
        raise ValueError(f"scale must be finite, got {w.scale}")
    out, _ = _attention_op(q, k, v, pos, w.kernel_size, w.stride, w.scale)
    return out
