"""Timing and peak memory of whole models: inference and one training step.

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
    may leave freed pages mapped that later allocations reuse, which hides growth; :func:`measure_memory_subprocess`
    measures in a fresh interpreter instead (``rss_hwm_subprocess``), which is what the comparison mode uses on CPU;
  - ``none``: not available here (non-Linux CPU, other devices); the field is empty.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import torch
import torch.nn as nn

from ..layers import ConvPathMixin
from ..ops import choose_aggregate_backend, choose_backend, use_backend
from ..version import __version__
from .env import PeakMemory, device_name, run_json_child, synchronize

_logger = logging.getLogger(__name__)

MODES = ("train", "infer")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
MEMORY_FORMATS = ("contiguous", "channels_last")

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


# ------------------------------------------------------------------------------------------------ models


def _acmix_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if type(m).__module__.startswith("acmix.")]


def acmix_layers(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` defined by acmix whose formulation can be switched.

    That is, modules with a local-attention ``backend`` attribute, a convolution-path ``conv_impl`` or a SAN
    aggregation (``sa_type``).
    """
    return [m for m in _acmix_modules(model) if any(hasattr(m, a) for a in ("backend", "conv_impl", "sa_type"))]


def backend_context(backend: str | None) -> use_backend:
    """The ops' implementations for a row's ``backend``: ``None`` automatic; ``"reference"`` the official-style
    formulation of every op (unfold local attention and SAN aggregation, FC + permute + group-conv convolution path);
    any other name that local-attention backend. Entered around every step of a :class:`PreparedCase`."""
    if backend == "reference":
        return use_backend(attention="reference", aggregate="reference", conv="reference")
    return use_backend(attention=backend)


def set_host_attention(model: nn.Module, backend: str | None) -> int:
    """For ``backend="reference"``, run acmix's host attention as the official code does (explicit softmax(q k^T) v,
    ``fused_attn=False``, as the official Swin); returns how many acmix layers can be switched at all.

    The local-attention, aggregation and convolution-path implementations are not module state: they follow
    :func:`backend_context`.
    """
    if backend == "reference":
        for m in _acmix_modules(model):
            if getattr(m, "fused_attn", None) is True:
                setattr(m, "fused_attn", False)  # noqa: B010  (timm's attribute on acmix's window attention)
    return len(acmix_layers(model))


def describe_backend(model: nn.Module, backend: str | None, device: torch.device, dtype: torch.dtype) -> str:
    """The row's ``backend`` column: ``none`` (nothing switchable), the forced name, or what runs automatically.

    Automatic choices read ``attn:<local-attention backend>``, ``agg:<SAN aggregation backend>``,
    ``conv:<conv path impl>`` joined by ``+``.
    """
    layers = acmix_layers(model)
    if not layers:
        return "none"
    if backend is not None:
        return backend
    sample = torch.empty(1, 1, 1, 1, 1, device=device, dtype=dtype)
    parts = []
    try:
        if any(hasattr(m, "backend") for m in layers):
            parts.append(f"attn:{choose_backend(sample).name}")
        if any(hasattr(m, "sa_type") for m in layers):
            parts.append(f"agg:{choose_aggregate_backend(sample[0]).name}")
    except (ValueError, RuntimeError) as exc:  # e.g. an ACMIX_BACKEND that cannot run here
        parts.append(f"?({exc})")
    impls = sorted({m.resolved_conv_impl() for m in layers if isinstance(m, ConvPathMixin)})
    if impls:
        parts.append("conv:" + "/".join(impls))
    return "+".join(parts)


def create_model(name: str, num_classes: int = 1000, in_chans: int = 3, **kwargs: Any) -> nn.Module:
    """Build a registered model by name (timm's registry; ``import acmix`` registers the ACmix zoo)."""
    import timm

    if not timm.is_model(name):
        raise ValueError(f"unknown model {name!r}; see `acmix list` or timm.list_models()")
    return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)


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


@contextlib.contextmanager
def _threads(threads: int | None) -> Iterator[None]:
    old = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _as_model(model: nn.Module | str, config: BenchConfig, factory: ModelFactory | None) -> tuple[nn.Module, str]:
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
    with _threads(config.threads):
        module, default_name = _as_model(model, config, factory)
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
        with _threads(c.config.threads):
            set_host_attention(c.module, c.config.backend)
            _logger.info("warming up %s (%s, %s)", c.name, c.variant or "-", mode)
            warms.append(prepare_with_oom_halving(c.module, mode, c.config, measure_memory=measure_memory))
    for r in range(repeats.pop()):
        order = list(range(len(warms)))
        order = order[r % len(order) :] + order[: r % len(order)]
        for i in order:
            with _threads(cases[i].config.threads):
                warms[i].times.append(warms[i].case.time_once())
    return [_result(c.name, c.variant, w, group=c.group) for c, w in zip(cases, warms)]


# ---------------------------------------------------------------------------------- memory in a fresh process


def measure_memory_subprocess(
    model_name: str, mode: str, config: BenchConfig, *, timeout: float = 900.0
) -> tuple[float | None, str]:
    """Peak memory of ``warmup`` steps of a registered model, measured in a fresh Python interpreter.

    Returns ``(peak MiB or None, method)``; the method is ``rss_hwm_subprocess`` on a Linux CPU,
    ``cuda_max_allocated`` on CUDA. A failing child (killed for memory, for instance) gives ``(None, reason)``.
    """
    spec = {"model": model_name, "mode": mode, "config": asdict(config)}
    out, reason = run_json_child("acmix.bench.runner:_memory_child", json.dumps(spec), timeout)
    if out is None:
        return None, reason
    return out["peak_mib"], out["method"]


def _memory_child() -> int:
    """Entry point of :func:`measure_memory_subprocess`'s child: reads a JSON spec on stdin, prints JSON."""
    import acmix  # noqa: F401  (registers the model zoo with timm)

    spec = json.loads(sys.stdin.read())
    config = BenchConfig(**spec["config"])
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    module = create_model(spec["model"], num_classes=config.num_classes, in_chans=config.in_chans)
    set_host_attention(module, config.backend)
    warm = prepare_with_oom_halving(module, spec["mode"], config, measure_memory=True)
    method = "rss_hwm_subprocess" if warm.mem_method == "rss_hwm" else warm.mem_method
    sys.stdout.write(json.dumps({"peak_mib": warm.peak_mib, "method": method, "batch": warm.case.config.batch}) + "\n")
    return 0


# ------------------------------------------------------------------------------------------------- profiling


def profile_step(
    model: nn.Module | str,
    mode: str,
    config: BenchConfig | None = None,
    *,
    steps: int = 1,
    row_limit: int = 20,
    factory: ModelFactory | None = None,
) -> str:
    """Where the time of a step goes: ``torch.profiler`` table of the top ops by self time (after warm-up).

    Args:
        model: a module or a registered model name.
        mode: ``"train"`` or ``"infer"``.
        config: settings (``config.backend`` is forced on the ACmix layers).
        steps: profiled steps.
        row_limit: rows of the table.
    """
    from torch.profiler import ProfilerActivity, profile

    config = config or BenchConfig()
    with _threads(config.threads):
        module, _ = _as_model(model, config, factory)
        set_host_attention(module, config.backend)
        warm = prepare_with_oom_halving(module, mode, config, measure_memory=False)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if warm.case.device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(steps):
                warm.case.step()
            synchronize(warm.case.device)
    sort = "self_cuda_time_total" if warm.case.device.type == "cuda" else "self_cpu_time_total"
    return str(prof.key_averages().table(sort_by=sort, row_limit=row_limit))
