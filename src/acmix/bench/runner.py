"""Timing and peak memory of whole models: inference and one training step, with out-of-memory halving.

Method (the same for every row):

* **Warm-up** ``warmup`` steps (allocator, autotuning, ``torch.compile`` happen here), then ``repeats`` timed
  repeats of ``steps_per_repeat`` steps each. The device is synchronised before and after each repeat
  (``torch.cuda.synchronize``; a no-op on CPU), wall time by ``time.perf_counter``. The reported latency is the
  **median** repeat divided by its steps; ``images_per_s = batch / latency``.
* A **training step** is forward, cross-entropy against random labels, backward, ``SGD(momentum=0.9).step()`` and
  ``zero_grad(set_to_none=True)`` (so no gradient outlives its step). **Inference** runs in ``eval()`` under
  ``torch.inference_mode()``.
* ``dtype`` is the compute dtype: ``float32`` runs as is; ``bfloat16``/``float16`` run under ``torch.autocast``
  (parameters stay float32, as in mixed-precision training).
* **Out of memory**: a step that raises ``torch.OutOfMemoryError`` (or the CPU allocator's "can't allocate memory")
  during warm-up halves the batch and starts again; the row records ``requested_batch``, the batch that ran and
  the number of halvings, and a warning is logged. Never silent.
* **Peak memory** (``peak_mem_mib``): memory held above the level reached right after the model and the input
  batch exist, over the warm-up and timed steps (activations, gradients, optimizer state, workspaces).
  ``mem_method`` says how it was measured (the probe is :class:`acmix.bench.env.PeakMemory`):

  - ``cuda_max_allocated``: ``torch.cuda.max_memory_allocated`` minus ``memory_allocated`` at the start (tensors
    only; the caching allocator's reserve is not counted);
  - ``rss_hwm``: Linux peak resident set size (``VmHWM`` of ``/proc/self/status``) minus ``VmRSS`` at the start,
    after resetting the high-water mark (``echo 5 > /proc/self/clear_refs``). In a long process earlier models
    may leave freed pages mapped that later allocations reuse, which hides growth;
    :func:`acmix.bench.memory.measure_memory_subprocess` measures in a fresh interpreter instead
    (``rss_hwm_subprocess``), which is what the comparison mode uses on CPU;
  - ``none``: not available here (non-Linux CPU, other devices); the field is empty.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn

from ..models import create_model
from ..version import __version__
from .config import MODES, BenchConfig, BenchResult, ModelFactory
from .env import PeakMemory, device_name, num_threads, synchronize
from .switch import backend_context, describe_backend, set_host_attention

__all__ = [
    "BenchCase",
    "PreparedCase",
    "is_oom_error",
    "prepare_with_oom_halving",
    "time_inference",
    "time_interleaved",
    "time_train_step",
]

_logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ helpers


def _free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def is_oom_error(exc: BaseException) -> bool:
    """True for an out-of-memory error of any device (CUDA's, or the CPU allocator's RuntimeError)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and (
        "can't allocate memory" in str(exc) or "out of memory" in str(exc).lower()
    )


# ------------------------------------------------------------------------------------------- one prepared case


class PreparedCase:
    """A model, its input batch and its step function, ready to be warmed up and timed.

    Args:
        model: the module (moved to the device and memory format here; wrapped by ``torch.compile`` if asked).
        mode: ``"train"`` or ``"infer"``.
        config: the measurement settings; ``config.batch`` is the batch of this case.

    Shape:
        input (batch, in_chans, resolution, resolution), labels (batch,) int64 in [0, num_classes).
    """

    def __init__(self, model: nn.Module, mode: str, config: BenchConfig) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode, self.config = mode, config
        self.device = torch.device(config.device)
        fmt = torch.channels_last if config.memory_format == "channels_last" else torch.contiguous_format
        self.model = model.to(self.device, memory_format=fmt)  # type: ignore[call-overload]
        self.model.train(mode == "train")
        self.runner: Callable[[torch.Tensor], torch.Tensor] = (
            torch.compile(self.model) if config.compile else self.model  # type: ignore[assignment]
        )
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-4, momentum=0.9) if mode == "train" else None
        amp = config.torch_dtype != torch.float32
        self.autocast = (
            (lambda: torch.autocast(self.device.type, dtype=config.torch_dtype)) if amp else contextlib.nullcontext
        )
        self.scaler = torch.amp.GradScaler(self.device.type) if mode == "train" and config.dtype == "float16" else None
        self.x = torch.randn(
            config.batch, config.in_chans, config.resolution, config.resolution, device=self.device
        ).contiguous(memory_format=fmt)
        self.y = torch.randint(0, config.num_classes, (config.batch,), device=self.device)
        self.backends = backend_context(config.backend)

    def step(self) -> None:
        """One inference forward, or one full training step (forward, loss, backward, update, free grads)."""
        with self.backends:
            self._step()

    def _step(self) -> None:
        if self.optimizer is None:
            with torch.inference_mode(), self.autocast():
                self.runner(self.x)
            return
        with self.autocast():
            loss = nn.functional.cross_entropy(self.runner(self.x).float(), self.y)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def time_once(self) -> float:
        """Seconds per step over one repeat of ``steps_per_repeat`` steps (device synchronised)."""
        synchronize(self.device)
        start = time.perf_counter()
        for _ in range(self.config.steps_per_repeat):
            self.step()
        synchronize(self.device)
        return (time.perf_counter() - start) / self.config.steps_per_repeat


@dataclass
class _Warm:
    """A warmed-up case and what was learnt while preparing it."""

    case: PreparedCase
    requested_batch: int
    halvings: int
    peak_mib: float | None
    mem_method: str
    threads: int
    times: list[float] = field(default_factory=list)


def prepare_with_oom_halving(model: nn.Module, mode: str, config: BenchConfig, measure_memory: bool = True) -> _Warm:
    """Build the case and run its warm-up, halving the batch after each out-of-memory error.

    The peak memory of the warm-up steps is recorded (see the module docstring). Raises the last
    out-of-memory error when even batch 1 does not fit.
    """
    batch, halvings = config.batch, 0
    device = torch.device(config.device)
    while True:
        cfg = replace(config, batch=batch)
        case = None
        try:
            case = PreparedCase(model, mode, cfg)
            probe = PeakMemory(device)
            if measure_memory:
                probe.start()
            for _ in range(cfg.warmup):
                case.step()
            synchronize(device)
            peak = probe.peak_mib() if measure_memory else None
            method = probe.method if measure_memory else "none"
            return _Warm(case, config.batch, halvings, peak, method, torch.get_num_threads())
        except Exception as exc:
            if not is_oom_error(exc):
                raise
            if batch == 1:
                raise
            del case
            _free_memory(device)
            _logger.warning("%s %s: out of memory at batch %d; retrying with batch %d", mode, device, batch, batch // 2)
            batch //= 2
            halvings += 1


def _result(name: str, variant: str, warm: _Warm, group: str = "", extra_note: str = "") -> BenchResult:
    case, cfg = warm.case, warm.case.config
    times = sorted(warm.times)
    median = statistics.median(times)
    notes = []
    if warm.halvings:
        notes.append(f"batch halved {warm.halvings}x after out-of-memory (requested {warm.requested_batch})")
    if extra_note:
        notes.append(extra_note)
    return BenchResult(
        model=name,
        mode=case.mode,
        variant=variant,
        group=group,
        device=str(case.device),
        device_name=device_name(case.device),
        torch_version=torch.__version__,
        acmix_version=__version__,
        threads=warm.threads,
        dtype=cfg.dtype,
        batch=cfg.batch,
        requested_batch=warm.requested_batch,
        oom_halvings=warm.halvings,
        resolution=cfg.resolution,
        backend=describe_backend(case.model, cfg.backend, case.device, cfg.torch_dtype),
        memory_format=cfg.memory_format,
        compiled=cfg.compile,
        images_per_s=cfg.batch / median,
        latency_ms=median * 1e3,
        latency_min_ms=times[0] * 1e3,
        latency_max_ms=times[-1] * 1e3,
        repeats=len(times),
        steps_per_repeat=cfg.steps_per_repeat,
        warmup=cfg.warmup,
        peak_mem_mib=warm.peak_mib,
        mem_method=warm.mem_method,
        params_m=sum(p.numel() for p in case.model.parameters()) / 1e6,
        note="; ".join(notes),
    )


def resolve_model(model: nn.Module | str, config: BenchConfig, factory: ModelFactory | None) -> tuple[nn.Module, str]:
    """The module to measure and its default row name: ``model`` itself, or built from a name by ``factory`` or
    :func:`acmix.models.create_model` (with the config's classes and input channels)."""
    if isinstance(model, nn.Module):
        return model, type(model).__name__
    if factory is not None:
        return factory(model), model
    return create_model(model, num_classes=config.num_classes, in_chans=config.in_chans), model


def _time(
    model: nn.Module | str,
    mode: str,
    config: BenchConfig,
    name: str | None,
    factory: ModelFactory | None,
    measure_memory: bool,
) -> BenchResult:
    with num_threads(config.threads):
        module, default_name = resolve_model(model, config, factory)
        set_host_attention(module, config.backend)
        warm = prepare_with_oom_halving(module, mode, config, measure_memory=measure_memory)
        warm.times = [warm.case.time_once() for _ in range(config.repeats)]
        return _result(name or default_name, "", warm)


def time_inference(
    model: nn.Module | str,
    config: BenchConfig | None = None,
    *,
    name: str | None = None,
    factory: ModelFactory | None = None,
    measure_memory: bool = True,
) -> BenchResult:
    """Inference throughput, latency and peak memory of one model (forward under ``inference_mode``).

    Args:
        model: a module, or a registered model name (built with ``factory`` or :func:`create_model`).
        config: measurement settings (default :class:`BenchConfig`).
        name: the row's model name (default: the name given, or the module's class name).
        factory: builds a module from a name.
        measure_memory: record the peak memory of the warm-up steps.

    Shape:
        input (batch, in_chans, resolution, resolution).
    """
    return _time(model, "infer", config or BenchConfig(), name, factory, measure_memory)


def time_train_step(
    model: nn.Module | str,
    config: BenchConfig | None = None,
    *,
    name: str | None = None,
    factory: ModelFactory | None = None,
    measure_memory: bool = True,
) -> BenchResult:
    """Training-step throughput (forward, backward, SGD update), step latency and peak memory of one model.

    Arguments as :func:`time_inference`.

    Shape:
        input (batch, in_chans, resolution, resolution), labels (batch,).
    """
    return _time(model, "train", config or BenchConfig(), name, factory, measure_memory)


@dataclass
class BenchCase:
    """One model to time inside :func:`time_interleaved`.

    Args:
        name: the row's model name.
        module: the model.
        config: its settings (``config.backend`` is forced on its ACmix layers).
        variant: label within a comparison (``baseline``, ``acmix``, ``acmix-reference``).
        group: the comparison the row belongs to (the ACmix model's name).
    """

    name: str
    module: nn.Module
    config: BenchConfig
    variant: str = ""
    group: str = ""


def time_interleaved(cases: list[BenchCase], mode: str, *, measure_memory: bool = True) -> list[BenchResult]:
    """Time several models in one process with their repeats interleaved (fair under a shared, noisy machine).

    Every case is built and warmed up first (each with its own out-of-memory halving and peak memory), then
    round r runs one timed repeat of every case, the order rotated by r so that no case always runs first.

    Args:
        cases: the models; their configs must share ``repeats``.
        mode: ``"train"`` or ``"infer"``.
        measure_memory: record each case's peak memory during its own warm-up (in this process).
    """
    if not cases:
        return []
    repeats = {c.config.repeats for c in cases}
    if len(repeats) != 1:
        raise ValueError(f"interleaved cases must share repeats, got {sorted(repeats)}")
    warms = []
    for c in cases:
        with num_threads(c.config.threads):
            set_host_attention(c.module, c.config.backend)
            _logger.info("warming up %s (%s, %s)", c.name, c.variant or "-", mode)
            warms.append(prepare_with_oom_halving(c.module, mode, c.config, measure_memory=measure_memory))
    for r in range(repeats.pop()):
        order = list(range(len(warms)))
        order = order[r % len(order) :] + order[: r % len(order)]
        for i in order:
            with num_threads(cases[i].config.threads):
                warms[i].times.append(warms[i].case.time_once())
    return [_result(c.name, c.variant, w, group=c.group) for c, w in zip(cases, warms)]
