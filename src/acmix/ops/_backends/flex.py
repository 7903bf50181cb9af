"""FlexAttention backend (CUDA): the local window as a 2-D neighbourhood ``mask_mod``, the border as a ``score_mod``.

The map is flattened: query index ``i = y * Wo + x`` (output grid), key index ``j = r * W + c`` (input grid). A key
belongs to the query's window when its row and its column do (``mask_mod``); a key that the reflection border
repeats gets ``log(multiplicity)`` added to its logit (``score_mod``; docs/derived-facts.md). Both are lookups into two
small per-axis tables, so nothing of size k^2 x map is ever built, and the block mask skips every block of the
(Ho*Wo) x (H*W) score matrix that no window touches. Fast only when compiled (Triton, CUDA); the eager form runs on
CPU (dense math, used by the tests).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, cast

import torch

from .._indexing import multiplicity
from .._window import Window, attention_backend
from .offset import offset_keys

_logger = logging.getLogger(__name__)


def flex_available() -> tuple[bool, str]:
    """Whether ``torch.nn.attention.flex_attention`` can be imported in this torch."""
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError as exc:  # pragma: no cover - torch < 2.5
        return False, f"torch {torch.__version__} has no FlexAttention ({exc})"
    return True, ""


@functools.lru_cache(maxsize=32)
def _tables(
    h: int, w: int, kernel_size: int, stride: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-axis (n_out, n) tables: window membership (bool) and log multiplicity (float32, 0 where absent)."""
    out = []
    for n in (h, w):
        counts = multiplicity(n, kernel_size, stride).to(device)
        out.append(counts > 0)
        out.append(torch.where(counts > 0, counts.float().log(), torch.zeros((), dtype=torch.float32, device=device)))
    return out[0], out[1], out[2], out[3]


def _mods(
    h: int, w: int, kernel_size: int, stride: int, device: torch.device
) -> tuple[Callable[..., Any], Callable[..., Any]]:
    in_y, log_y, in_x, log_x = _tables(h, w, kernel_size, stride, device)
    wo = -(-w // stride)

    def mask_mod(b: Any, hd: Any, q_idx: Any, kv_idx: Any) -> Any:
        return in_y[q_idx // wo, kv_idx // w] & in_x[q_idx % wo, kv_idx % w]

    def score_mod(score: Any, b: Any, hd: Any, q_idx: Any, kv_idx: Any) -> Any:
        return score + log_y[q_idx // wo, kv_idx // w] + log_x[q_idx % wo, kv_idx % w]

    return mask_mod, score_mod


@functools.lru_cache(maxsize=32)
def _block_mask(h: int, w: int, kernel_size: int, stride: int, device: torch.device) -> Any:
    from torch.nn.attention.flex_attention import create_block_mask

    mask_mod, _ = _mods(h, w, kernel_size, stride, device)
    ho, wo = -(-h // stride), -(-w // stride)
    return create_block_mask(mask_mod, None, None, ho * wo, h * w, device=device)


@functools.lru_cache(maxsize=1)
def _compiled_flex() -> Callable[..., Any]:
    from torch.nn.attention.flex_attention import flex_attention

    _logger.debug("flex backend: compiling flex_attention (first call per shape takes seconds)")
    return torch.compile(flex_attention, dynamic=False)


@attention_backend
def local_attention_flex(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, win: Window, *, compiled: bool | None = None
) -> torch.Tensor:
    """FlexAttention backend (contract: :mod:`acmix.ops._window`).

    ``compiled`` defaults to True on CUDA (Triton kernels) and False elsewhere (eager dense math: for tests only).
    """
    from torch.nn.attention.flex_attention import flex_attention

    b, n, d, h, w = q.shape
    kernel_size, stride, scale = win.kernel_size, win.stride, win.scale
    ho, wo = -(-h // stride), -(-w // stride)
    qf = q[..., ::stride, ::stride].flatten(3).transpose(-1, -2)  # (B, N, Ho*Wo, D)
    kf = offset_keys(k, win.rel_pos).flatten(3).transpose(-1, -2)  # (B, N, H*W, D)
    vf = v.flatten(3).transpose(-1, -2)
    if compiled is None:
        compiled = q.device.type == "cuda"
    fn = _compiled_flex() if compiled else cast(Callable[..., Any], flex_attention)
    _, score_mod = _mods(h, w, kernel_size, stride, q.device)
    block_mask = _block_mask(h, w, kernel_size, stride, q.device)
    out = fn(qf.contiguous(), kf.contiguous(), vf.contiguous(), score_mod=score_mod, block_mask=block_mask, scale=scale)
    assert isinstance(out, torch.Tensor)
    return out.transpose(-1, -2).reshape(b, n, d, ho, wo)


def can_run_flex(q: torch.Tensor) -> tuple[bool, str]:
    """FlexAttention is fast only as a compiled Triton kernel: CUDA, fp32/fp16/bf16, head_dim >= 16."""
    ok, reason = flex_available()
    if not ok:
        return ok, reason
    if q.device.type != "cuda":
        return False, f"flex needs a CUDA tensor for speed (got {q.device.type}; the eager form is test-only)"
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return False, f"flex supports float32/float16/bfloat16, got {q.dtype}"
    if q.dim() == 5 and q.shape[2] < 16:
        return False, f"flex needs head_dim >= 16, got {q.shape[2]}"
    from torch.utils._triton import has_triton

    if not has_triton():
        return False, "flex needs Triton (not installed)"
    return True, ""
