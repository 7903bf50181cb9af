"""Fast local-attention backends, registered with :mod:`acmix.ops._dispatch` on import.

| name       | where                | idea                                                                      |
|------------|----------------------|---------------------------------------------------------------------------|
| ``flex``   | CUDA (opt-in)        | FlexAttention over the flattened map: 2-D window ``mask_mod``,            |
|            |                      | ``log(multiplicity)`` ``score_mod``                                       |
| ``tiled``  | any device (default  | halo tiles of queries + one fused SDPA call with a log-multiplicity bias  |
|            | on CPU and CUDA)     |                                                                           |
| ``offset`` | any device           | offset-by-offset loop, recomputing backward (leanest memory)              |

SAN's patchwise aggregation has its own registry (``offset``, then the unfold ``reference``).

The unfold ``reference`` (priority 0) is registered by :mod:`acmix.ops.local_attention`. ``torch.compile`` of the
offset loop was measured and dropped: on the 2-core CPU at B = 8, C = 64, 56 x 56 it compiled for ~170 s and then
ran forward + backward in ~405 ms, against ~170 ms for ``tiled`` with no compile step (docs/deviations.md).
"""

from __future__ import annotations

import torch

from .._dispatch import AGGREGATE, Backend, register_backend
from .aggregate import local_aggregate_offset
from .cpp import can_run_cpp, local_attention_cpp
from .flex import can_run_flex, local_attention_flex
from .offset import local_attention_offset
from .tiled import local_attention_tiled

#: measured on an H100 (torch 2.11, benchmarks/gpu_all.sh): correct, but slower than ``tiled`` at every ResNet shape
#: (fp32 stage 1: 3.9 vs 1.6 ms forward+backward; bf16: 45-57 ms vs 1.3-1.8 ms), and its Triton kernel exceeds
#: shared memory at head_dim 128 (ResNet-50 stage 4)
_FLEX_OPT_IN = "measured 2-40x slower than 'tiled' on an H100; fails to compile at head_dim 128"


def _any(q: torch.Tensor) -> tuple[bool, str]:
    return True, ""


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
        can_run_cpp,
        priority=35,
        description="C++ kernel over each query's window only, recomputing backward (CPU; built on first use)",
    )
)
register_backend(
    Backend(
        "tiled",
        local_attention_tiled,
        _any,
        priority=30,
        description="halo tiles + fused SDPA with a log-multiplicity bias (default on CPU)",
    )
)
register_backend(
    Backend(
        "offset",
        local_attention_offset,
        _any,
        priority=10,
        description="offset-by-offset loop with a recomputing backward (leanest memory, slow)",
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
    "local_attention_cpp",
    "local_attention_flex",
    "local_attention_offset",
    "local_attention_tiled",
]
