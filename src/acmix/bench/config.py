"""What a model benchmark measures (:class:`BenchConfig`) and what one measured row holds (:class:`BenchResult`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn as nn

__all__ = ["DTYPES", "MEMORY_FORMATS", "MODES", "RESULT_FIELDS", "BenchConfig", "BenchResult", "ModelFactory"]

MODES = ("train", "infer")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
MEMORY_FORMATS = ("contiguous", "channels_last")

#: builds a module from a model name
ModelFactory = Callable[[str], nn.Module]


@dataclass(frozen=True)
class BenchConfig:
    """What to measure and how; one config gives one row per model and mode.

    Args:
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
        dtype: compute dtype ``float32``, ``bfloat16`` or ``float16`` (aliases fp32/bf16/fp16).
        batch: requested batch (halved on out-of-memory).
        resolution: square input side; inputs are (batch, in_chans, resolution, resolution).
        memory_format: ``contiguous`` (NCHW) or ``channels_last`` (model and input).
        compile: wrap the model in ``torch.compile``.
        backend: local-attention backend forced on every ACmix layer (``None``: the layers' automatic choice);
            ``"reference"`` also selects the official-style convolution path (``conv_impl="reference"``).
        warmup: untimed steps before timing (at least 1).
        repeats: timed repeats; the median is reported.
        steps_per_repeat: steps inside one timed repeat (raise it when a step is short, e.g. on a GPU).
        threads: ``torch.set_num_threads`` before measuring (``None``: leave as is).
        in_chans, num_classes: input channels and classes of the random batch and labels.
    """

    device: str = "cpu"
    dtype: str = "float32"
    batch: int = 8
    resolution: int = 224
    memory_format: str = "contiguous"
    compile: bool = False
    backend: str | None = None
    warmup: int = 2
    repeats: int = 5
    steps_per_repeat: int = 1
    threads: int | None = None
    in_chans: int = 3
    num_classes: int = 1000

    def __post_init__(self) -> None:
        dtype = _DTYPE_ALIASES.get(self.dtype, self.dtype)
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)} (or fp32/bf16/fp16), got {self.dtype!r}")
        object.__setattr__(self, "dtype", dtype)
        if self.memory_format not in MEMORY_FORMATS:
            raise ValueError(f"memory_format must be one of {MEMORY_FORMATS}, got {self.memory_format!r}")
        for name in ("batch", "resolution", "warmup", "repeats", "steps_per_repeat", "in_chans", "num_classes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"threads must be a positive int or None, got {self.threads!r}")
        torch.device(self.device)  # raises on a malformed device string

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


@dataclass
class BenchResult:
    """One measured row. Times in milliseconds, memory in MiB (2**20 bytes); ``None`` when not measured."""

    model: str
    mode: str
    variant: str
    group: str
    device: str
    device_name: str
    torch_version: str
    acmix_version: str
    threads: int
    dtype: str
    batch: int
    requested_batch: int
    oom_halvings: int
    resolution: int
    backend: str
    memory_format: str
    compiled: bool
    images_per_s: float
    latency_ms: float
    latency_min_ms: float
    latency_max_ms: float
    repeats: int
    steps_per_repeat: int
    warmup: int
    peak_mem_mib: float | None
    mem_method: str
    params_m: float
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: column order of CSV output (the dataclass order)
RESULT_FIELDS = tuple(f.name for f in fields(BenchResult))
