"""Fast local-attention backends, registered with :mod:`acmix.ops._dispatch` on import.

| name       | where                | idea                                                                      |
|------------|----------------------|---------------------------------------------------------------------------|
| ``triton`` | CUDA (opt-in until   | fused Triton kernels: query tiles stream their key halo, log-multiplicity |
|            | measured on a GPU)   | bias from indices, online softmax; LSE-only backward (triton_attention)   |
| ``flex``   | CUDA (opt-in)        | FlexAttention over the flattened map: 2-D window ``mask_mod``,            |
|            |                      | ``log(multiplicity)`` ``score_mod``                                       |
| ``cpp``    | CPU (default there;  | C++ kernel over each query's window only, vectorised over the head dim,   |
|            | built on first use)  | recomputing backward; falls back to ``tiled`` when it cannot build (cpp)  |
| ``tiled``  | any device (default  | halo tiles of queries + one fused SDPA call with a log-multiplicity bias  |
|            | on CUDA)             |                                                                           |
| ``offset`` | any device           | offset-by-offset loop, recomputing backward (leanest memory)              |

SAN's patchwise aggregation has its own registry (``triton`` (opt-in), ``offset``, then the unfold ``reference``).
The ``triton`` backends also run on CPU tensors in Triton's interpreter when ``TRITON_INTERPRET=1`` is set (tests).

The unfold ``reference`` (priority 0) is registered by :mod:`acmix.ops.local_attention`. ``torch.compile`` of the
offset loop was measured and dropped: on the 2-core CPU at B = 8, C = 64, 56 x 56 it compiled for ~170 s and then
ran forward + backward in ~405 ms, against ~170 ms for ``tiled`` with no compile step (docs/deviations.md).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .._dispatch import AGGREGATE, Backend, register_backend
from .aggregate import local_aggregate_offset
from .cpp import can_run_cpp, local_attention_cpp
from .flex import can_run_flex, local_attention_flex
from .offset import local_attention_offset
from .tiled import local_attention_tiled
from .triton_aggregate import can_run_triton_aggregate, local_aggregate_triton
from .triton_attention import can_run_triton, local_attention_triton

#: measured on an H100 (torch 2.11, benchmarks/gpu_all.sh): correct, but slower than ``tiled`` at every ResNet shape
#: (fp32 stage 1: 3.9 vs 1.6 ms forward+backward; bf16: 45-57 ms vs 1.3-1.8 ms), and its Triton kernel exceeds
#: shared memory at head_dim 128 (ResNet-50 stage 4)
_FLEX_OPT_IN = "measured 2-40x slower than 'tiled' on an H100; fails to compile at head_dim 128"
#: the Triton kernels are tested (CPU interpreter) but not yet timed on a GPU: automatic selection waits for
#: benchmarks/gpu_all.sh; clear this (``opt_in=None``) once it shows them faster than 'tiled' / 'offset'
_TRITON_OPT_IN = "not yet timed on a GPU (benchmarks/gpu_all.sh decides)"


def _any(q: torch.Tensor) -> tuple[bool, str]:
    return True, ""


def _exportable(q: torch.Tensor) -> tuple[bool, str]:
    """Step aside while TorchScript traces (``torch.jit.trace``; ``torch.onnx.export(dynamo=False)``, which ultralytics'
    export uses) or an ONNX export runs: the tracer cannot record custom autograd Functions and ONNX has no operator
    for the C++ kernels; the ``reference`` backend exports with standard operators."""
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return False, "TorchScript tracing / ONNX export: standard operators only (the 'reference' backend)"
    return True, ""


def _when_exportable(can_run: Callable[[torch.Tensor], tuple[bool, str]]) -> Callable[[torch.Tensor], tuple[bool, str]]:
    def check(q: torch.Tensor) -> tuple[bool, str]:
        ok, reason = _exportable(q)
        return can_run(q) if ok else (ok, reason)

    return check


register_backend(
    Backend(
        "triton",
        local_attention_triton,
        can_run_triton,
        priority=50,
        description="fused Triton kernels: halo-streaming online softmax, LSE-only backward (CUDA; opt-in)",
        opt_in=_TRITON_OPT_IN,
    )
)
register_backend(
    Backend(
        "flex",
        local_attention_flex,
        can_run_flex,
        priority=40,
        description="FlexAttention, 2-D window mask_mod + log-multiplicity score_mod (compiled, CUDA; opt-in)",
        opt_in=_FLEX_OPT_IN,
    )
)
register_backend(
    Backend(
        "cpp",
        local_attention_cpp,
        _when_exportable(can_run_cpp),
        priority=35,
        description="C++ kernel over each query's window only, recomputing backward (CPU; built on first use)",
    )
)
register_backend(
    Backend(
        "tiled",
        local_attention_tiled,
        _exportable,
        priority=30,
        description="halo tiles + fused SDPA with a log-multiplicity bias (default on CUDA; CPU without cpp)",
    )
)
register_backend(
    Backend(
        "offset",
        local_attention_offset,
        _exportable,
        priority=10,
        description="offset-by-offset loop with a recomputing backward (leanest memory, slow)",
    )
)

AGGREGATE.register(
    Backend(
        "triton",
        local_aggregate_triton,
        can_run_triton_aggregate,
        priority=50,
        description="Triton kernels, reflected indices, no unfold and no atomics (CUDA; opt-in)",
        opt_in=_TRITON_OPT_IN,
    )
)
AGGREGATE.register(
    Backend(
        "offset",
        local_aggregate_offset,
        _any,
        priority=10,
        description="offset-by-offset fused multiply-add, no k^2 unfold (default)",
    )
)

__all__ = [
    "local_aggregate_offset",
    "local_aggregate_triton",
    "local_attention_cpp",
    "local_attention_flex",
    "local_attention_offset",
    "local_attention_tiled",
    "local_attention_triton",
]
