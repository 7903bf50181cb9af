"""Forward + backward time and peak memory of the ACmix attention op and its neighbours (``acmix bench op``).

For every shape (B, C, H = W, stride) it measures, in one process and with interleaved repeats so that ratios are
fair on a shared machine:

* ``attention`` rows, one per local-attention backend (``reference`` is the official-style unfold formulation):
  the op alone on q, k, v of (B, heads, C / heads, H, W) and a (C / heads, H, W) position map, all requiring grad;
* ``conv3x3``: a 3 x 3 convolution C -> C (stride, padding 1, no bias), what ACmix replaces in a ResNet;
* ``proj1x1``: the layer's own three 1 x 1 projections (``ACmix.qkv``, C -> 3C with bias: Stage I);
* ``acmix``: the whole ACmix layer with its defaults (automatic backend, fused conv path);
* ``acmix-official``: the whole layer in the official formulation (unfold reference, FC + permute + group conv);
* ``acmix-recompute``: ``acmix`` with ``recompute=True`` (only the input kept for backward, the rest recomputed).

Method: one step = forward, then backward of the output against a fixed random gradient (all input and parameter
gradients), after ``warmup`` steps; ``repeats`` timed steps per subject, interleaved across subjects, device
synchronised around each; the row reports the median (and minimum) in milliseconds.

Peak memory (``peak_mib``) is the memory held above the level after the inputs and parameters exist, during one
step. On CUDA: ``torch.cuda.max_memory_allocated`` (``cuda_max_allocated``). On a Linux CPU: the peak resident set
size (``VmHWM`` after resetting it) of the **first** step in a **fresh interpreter** (``rss_hwm_subprocess``), because
a process that has already run steps keeps freed pages and hides new growth; ``--memory inprocess`` measures in
the benchmark process instead (``rss_hwm``, an underestimate after earlier rows).
"""

from __future__ import annotations

import json
import logging
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn

from ..layers import ACmix
from ..ops import available_backends, choose_backend, get_backend, local_attention
from . import report
from .env import PeakMemory, environment, num_threads, run_json_child, synchronize
from .memory import MEMORY_MODES, check_memory_mode, subprocess_method
from .report import columns, fmt, ratio, save_figure

_logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: the ResNet stages (channels, map side; docs/paper-numbers.md, Table 1): stage 1 to 4 of ACmix-ResNet-50 bottlenecks
RESNET_SHAPES = ((64, 56), (128, 28), (256, 14), (512, 7))
SUBJECTS = ("attention", "conv3x3", "proj1x1", "acmix", "acmix-official", "acmix-recompute")
__all__ = [
    "DTYPES",
    "MEMORY_MODES",
    "RESNET_SHAPES",
    "ROW_FIELDS",
    "SUBJECTS",
    "OpRow",
    "OpSpec",
    "ShapeSummary",
    "default_backend",
    "format_environment",
    "format_summary",
    "format_table",
    "measure_group",
    "measure_memory",
    "parse_shapes",
    "plot",
    "run",
    "runnable_backends",
    "specs_for",
    "summarize",
    "write_csv",
    "write_json",
]


@dataclass(frozen=True)
class OpSpec:
    """One measured configuration. ``backend`` is only used by ``attention`` rows."""

    subject: str
    backend: str
    batch: int
    channels: int
    size: int
    stride: int
    heads: int = 4
    kernel: int = 7
    dtype: str = "float32"
    device: str = "cpu"


@dataclass
class OpRow:
    """One result row (CSV/JSON record)."""

    subject: str
    backend: str
    batch: int
    channels: int
    height: int
    width: int
    stride: int
    heads: int
    kernel: int
    dtype: str
    median_ms: float
    min_ms: float
    repeats: int
    peak_mib: float | None
    mem_method: str
    device: str
    device_name: str
    torch: str
    acmix: str
    threads: int
    note: str = ""

    @property
    def shape(self) -> str:
        return f"{self.batch}x{self.channels}x{self.height}x{self.width}/s{self.stride}"


ROW_FIELDS = tuple(f.name for f in fields(OpRow))


# ------------------------------------------------------------------------------------------------- the subjects
class _Case:
    """Leaves, parameters and a closure that runs one forward; ``step()`` runs forward + backward."""

    def __init__(self, spec: OpSpec) -> None:
        self.spec = spec
        dev, dt = torch.device(spec.device), DTYPES[spec.dtype]
        g = torch.Generator().manual_seed(0)
        b, c, h, s = spec.batch, spec.channels, spec.size, spec.stride

        def leaf(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=g).to(dev, dt).requires_grad_(True)

        self.module: nn.Module | None = None
        if spec.subject == "attention":
            d = c // spec.heads
            q, k, v = (leaf(b, spec.heads, d, h, h) for _ in range(3))
            pos = leaf(d, h, h)
            self.leaves = [q, k, v, pos]
            self.forward: Callable[[], torch.Tensor] = lambda: local_attention(
                q, k, v, spec.kernel, s, pos, backend=spec.backend
            )
        else:
            x = leaf(b, c, h, h)
            self.leaves = [x]
            if spec.subject == "conv3x3":
                self.module = nn.Conv2d(c, c, 3, s, 1, bias=False)
            elif spec.subject == "proj1x1":
                self.module = ACmix(c, stride=s, num_heads=spec.heads, attn_kernel_size=spec.kernel).qkv
            elif spec.subject in ("acmix", "acmix-recompute"):
                self.module = ACmix(
                    c,
                    stride=s,
                    num_heads=spec.heads,
                    attn_kernel_size=spec.kernel,
                    recompute=spec.subject == "acmix-recompute",
                )
            elif spec.subject == "acmix-official":
                self.module = ACmix(
                    c,
                    stride=s,
                    num_heads=spec.heads,
                    attn_kernel_size=spec.kernel,
                    backend="reference",
                    conv_impl="reference",
                )
            else:
                raise ValueError(f"unknown subject {spec.subject!r}; valid subjects: {', '.join(SUBJECTS)}")
            module = self.module.to(dev, dt)
            self.forward = lambda: module(x)
        self.grad: torch.Tensor | None = None

    def step(self) -> None:
        for t in self.leaves:
            t.grad = None
        if self.module is not None:
            self.module.zero_grad(set_to_none=True)
        out = self.forward()
        if self.grad is None:
            self.grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device, out.dtype)
        out.backward(self.grad)


def default_backend(device: str, dtype: str, channels: int = 64, heads: int = 4) -> str:
    """The backend the automatic choice takes for an op input of this device and dtype."""
    sample = torch.empty(1, heads, channels // heads, 1, 1, dtype=DTYPES[dtype], device=device)
    return choose_backend(sample, "auto").name


def runnable_backends(device: str, dtype: str, channels: int = 64, heads: int = 4) -> list[str]:
    """Every registered backend that can run on this device/dtype, best first (``reference`` included)."""
    sample = torch.empty(1, heads, channels // heads, 1, 1, dtype=DTYPES[dtype], device=device)
    return [name for name in available_backends() if get_backend(name).can_run(sample)[0]]


def specs_for(
    shapes: Sequence[tuple[int, int]],
    strides: Sequence[int],
    *,
    batch: int = 8,
    heads: int = 4,
    kernel: int = 7,
    dtype: str = "float32",
    device: str = "cpu",
    backends: Sequence[str] | None = None,
    subjects: Sequence[str] = SUBJECTS,
) -> list[list[OpSpec]]:
    """Groups of specs, one group per (shape, stride); rows of a group are timed interleaved."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    for s in subjects:
        if s not in SUBJECTS:
            raise ValueError(f"unknown subject {s!r}; valid subjects: {', '.join(SUBJECTS)}")
    if backends is None:
        backends = runnable_backends(device, dtype, shapes[0][0] if shapes else 64, heads)
    else:
        for name in backends:
            get_backend(name)  # unknown names raise with the valid list
    groups = []
    for c, h in shapes:
        if c % heads:
            raise ValueError(f"channels ({c}) must be divisible by heads ({heads})")
        for stride in strides:
            group = []
            for subject in subjects:
                names = list(backends) if subject == "attention" else [_layer_backend(subject, device, dtype, c, heads)]
                for name in names:
                    group.append(OpSpec(subject, name, batch, c, h, stride, heads, kernel, dtype, device))
            groups.append(group)
    return groups


def _layer_backend(subject: str, device: str, dtype: str, channels: int, heads: int) -> str:
    if subject in ("acmix", "acmix-recompute"):
        return default_backend(device, dtype, channels, heads)
    if subject == "acmix-official":
        return "reference"
    return "-"


# ------------------------------------------------------------------------------------------------- measuring
def measure_group(group: Sequence[OpSpec], *, warmup: int = 2, repeats: int = 5, memory: str = "auto") -> list[OpRow]:
    """Time every spec of a group (interleaved repeats), then measure its peak memory."""
    if warmup < 0 or repeats < 1:
        raise ValueError(f"warmup must be >= 0 and repeats >= 1, got {warmup}, {repeats}")
    check_memory_mode(memory)
    if not group:
        return []
    device = torch.device(group[0].device)
    cases = [_Case(spec) for spec in group]
    for case in cases:
        for _ in range(warmup):
            case.step()
    times: list[list[float]] = [[] for _ in cases]
    for _ in range(repeats):
        for i, case in enumerate(cases):
            synchronize(device)
            t0 = time.perf_counter()
            case.step()
            synchronize(device)
            times[i].append((time.perf_counter() - t0) * 1e3)
    del cases
    env = environment(device)
    rows = []
    for spec, ts in zip(group, times):
        peak, method = measure_memory(spec, memory)
        ho = -(-spec.size // spec.stride)
        note = f"out {ho}x{ho}"
        rows.append(
            OpRow(
                spec.subject,
                spec.backend,
                spec.batch,
                spec.channels,
                spec.size,
                spec.size,
                spec.stride,
                spec.heads,
                spec.kernel,
                spec.dtype,
                statistics.median(ts),
                min(ts),
                repeats,
                peak,
                method,
                env["device"],
                env["device_name"],
                env["torch"],
                env["acmix"],
                env["threads"],
                note,
            )
        )
    return rows


def measure_memory(spec: OpSpec, memory: str = "auto") -> tuple[float | None, str]:
    """Peak memory of one step of ``spec``; see the module docstring. Returns (MiB or None, method)."""
    if memory == "off":
        return None, "off"
    device = torch.device(spec.device)
    if memory == "subprocess" or (memory == "auto" and device.type == "cpu"):
        return _memory_subprocess(spec)
    return _memory_inprocess(spec, warm=device.type == "cuda")


def _memory_inprocess(spec: OpSpec, warm: bool) -> tuple[float | None, str]:
    case = _Case(spec)
    if warm:  # CUDA: exact tensor accounting, so a warm step (autotuning, caches) is excluded fairly
        case.step()
    probe = PeakMemory(torch.device(spec.device))
    probe.start()
    case.step()
    return probe.peak_mib(), probe.method


def _memory_subprocess(spec: OpSpec, timeout: float = 600.0) -> tuple[float | None, str]:
    payload = json.dumps({"spec": asdict(spec), "threads": torch.get_num_threads()})
    out, reason = run_json_child("acmix.bench.op:_memory_child", payload, timeout)
    if out is None:
        _logger.warning("memory subprocess failed for %s: %s", spec, reason)
        return None, reason
    return out["peak_mib"], subprocess_method(out["method"])


def _memory_child() -> int:
    """Child of :func:`_memory_subprocess`: reads {"spec", "threads"} JSON on stdin, prints {"peak_mib", "method"}."""
    payload = json.loads(sys.stdin.read())
    torch.set_num_threads(int(payload["threads"]))
    spec = OpSpec(**payload["spec"])
    peak, method = _memory_inprocess(spec, warm=spec.device.startswith("cuda"))
    sys.stdout.write(json.dumps({"peak_mib": peak, "method": method}) + "\n")
    return 0


def run(
    groups: Sequence[Sequence[OpSpec]],
    *,
    warmup: int = 2,
    repeats: int = 5,
    memory: str = "auto",
    threads: int | None = 2,
    progress: Callable[[str], None] | None = None,
) -> list[OpRow]:
    """Measure every group; ``threads`` sets ``torch.set_num_threads`` for the run (restored afterwards)."""
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    with num_threads(threads):
        rows: list[OpRow] = []
        for group in groups:
            if progress and group:
                g = group[0]
                progress(f"B={g.batch} C={g.channels} {g.size}x{g.size} stride {g.stride} ({len(group)} subjects)")
            done = measure_group(group, warmup=warmup, repeats=repeats, memory=memory)
            if progress:
                parts = [f"{_label(r)} {r.median_ms:.1f} ms / {fmt(r.peak_mib, '.0f')} MiB" for r in done]
                progress("  " + ", ".join(parts))
            rows.extend(done)
        return rows


# ------------------------------------------------------------------------------------------------- reporting
@dataclass(frozen=True)
class ShapeSummary:
    """Ratios of one shape: the issue's targets are speedup >= 10, memory ratio <= 0.1, layer / proj <= 3."""

    shape: str
    default_backend: str
    speedup_vs_reference: float | None  # reference time / default backend time (attention op)
    memory_vs_reference: float | None  # default backend peak / reference peak
    layer_vs_proj: float | None  # whole ACmix layer time / its three 1x1 projections
    official_layer_vs_proj: float | None
    conv3x3_vs_proj: float | None
    layer_memory_vs_official: float | None = None  # whole layer peak / the official formulation's
    recompute_memory_vs_official: float | None = None  # the layer with recompute=True, same
    recompute_vs_layer: float | None = None  # time of recompute=True / the plain layer


def _find(rows: Sequence[OpRow], subject: str, backend: str | None = None) -> OpRow | None:
    for r in rows:
        if r.subject == subject and (backend is None or r.backend == backend):
            return r
    return None


def _ms(r: OpRow | None) -> float | None:
    return r.median_ms if r else None


def _mem(r: OpRow | None) -> float | None:
    return r.peak_mib if r else None


def summarize(rows: Sequence[OpRow]) -> list[ShapeSummary]:
    """One :class:`ShapeSummary` per shape, in row order."""
    out = []
    for shape in dict.fromkeys(r.shape for r in rows):
        grp = [r for r in rows if r.shape == shape]
        layer = _find(grp, "acmix")
        default = layer.backend if layer else default_backend(grp[0].device, grp[0].dtype, grp[0].channels)
        ref, fast = _find(grp, "attention", "reference"), _find(grp, "attention", default)
        proj = _find(grp, "proj1x1")
        official, conv = _find(grp, "acmix-official"), _find(grp, "conv3x3")
        recompute = _find(grp, "acmix-recompute")
        out.append(
            ShapeSummary(
                shape,
                default,
                ratio(_ms(ref), _ms(fast)),
                ratio(_mem(fast), _mem(ref)),
                ratio(_ms(layer), _ms(proj)),
                ratio(_ms(official), _ms(proj)),
                ratio(_ms(conv), _ms(proj)),
                ratio(_mem(layer), _mem(official)),
                ratio(_mem(recompute), _mem(official)),
                ratio(_ms(recompute), _ms(layer)),
            )
        )
    return out


def format_table(rows: Sequence[OpRow]) -> str:
    """Plain-text table of the rows."""
    head = ["shape B x C x H x W / stride", "subject", "backend", "fwd+bwd ms", "min ms", "peak MiB", "memory method"]
    body = [
        [r.shape, r.subject, r.backend, f"{r.median_ms:.1f}", f"{r.min_ms:.1f}", fmt(r.peak_mib, ".0f"), r.mem_method]
        for r in rows
    ]
    return columns(head, body)


#: the ratio columns of :func:`format_summary`: header (with the issue's target), ShapeSummary field, number format
_SUMMARY_COLUMNS = (
    ("ref / default time (>= 10)", "speedup_vs_reference", ".1f"),
    ("default / ref memory (<= 0.1)", "memory_vs_reference", ".3f"),
    ("layer / 1x1 proj (<= 3)", "layer_vs_proj", ".2f"),
    ("official layer / 1x1 proj", "official_layer_vs_proj", ".1f"),
    ("conv3x3 / 1x1 proj", "conv3x3_vs_proj", ".2f"),
    ("layer / official memory (<= 0.1)", "layer_memory_vs_official", ".3f"),
    ("recompute / official memory", "recompute_memory_vs_official", ".3f"),
    ("recompute / layer time", "recompute_vs_layer", ".2f"),
)


def format_summary(summaries: Sequence[ShapeSummary]) -> str:
    """Ratios per shape against the issue's targets."""
    head = ["shape", "default", *(header for header, _, _ in _SUMMARY_COLUMNS)]
    body = [
        [s.shape, s.default_backend, *(fmt(getattr(s, field), spec) for _, field, spec in _SUMMARY_COLUMNS)]
        for s in summaries
    ]
    return columns(head, body)


def format_environment(rows: Sequence[OpRow]) -> str:
    if not rows:
        return "no rows"
    r = rows[0]
    return (
        f"device: {r.device} ({r.device_name}), torch {r.torch}, acmix {r.acmix}, threads {r.threads}, "
        f"dtype {r.dtype}, heads {r.heads}, kernel {r.kernel}"
    )


def write_csv(rows: Sequence[OpRow], path: str | Path) -> Path:
    """Write the rows as CSV (one column per :class:`OpRow` field), atomically."""
    return report.write_csv(rows, path, ROW_FIELDS)


def write_json(rows: Sequence[OpRow], path: str | Path) -> Path:
    """Write ``{"rows": [...], "summary": [...]}`` as JSON, atomically."""
    return report.write_json({"rows": [asdict(r) for r in rows], "summary": [asdict(s) for s in summarize(rows)]}, path)


def plot(rows: Sequence[OpRow], path: str | Path) -> Path:
    """Grouped bars (log scale) of time and peak memory per shape and subject, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r.shape for r in rows))
    labels = list(dict.fromkeys(_label(r) for r in rows))
    fig, axes = plt.subplots(2, 1, figsize=(max(8.0, 1.6 * len(shapes)), 8), sharex=True)
    width = 0.8 / max(1, len(labels))
    for j, label in enumerate(labels):
        xs, ts, ms = [], [], []
        for i, shape in enumerate(shapes):
            match = [r for r in rows if r.shape == shape and _label(r) == label]
            if match:
                xs.append(i + (j - (len(labels) - 1) / 2) * width)
                ts.append(match[0].median_ms)
                ms.append(match[0].peak_mib if match[0].peak_mib is not None else float("nan"))
        axes[0].bar(xs, ts, width, label=label)
        axes[1].bar(xs, ms, width, label=label)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("forward + backward (ms, median)")
    if any(r.peak_mib for r in rows):  # a log axis needs a positive value (none with --memory off)
        axes[1].set_yscale("log")
    axes[1].set_ylabel("peak memory (MiB)")
    axes[1].set_xticks(range(len(shapes)))
    axes[1].set_xticklabels(shapes, rotation=20, fontsize=8)
    axes[0].legend(fontsize=8, ncol=2)
    if rows:
        axes[0].set_title(format_environment(rows), fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def _label(r: OpRow) -> str:
    return f"attention:{r.backend}" if r.subject == "attention" else r.subject


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """``"64x56,128x28"`` -> [(64, 56), (128, 28)] (channels x map side)."""
    out = []
    for item in text.split(","):
        item = item.strip()
        parts = item.lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"shapes must be CxH items like 64x56,128x28; got {item!r}")
        out.append((int(parts[0]), int(parts[1])))
    if not out:
        raise ValueError("shapes must name at least one CxH item")
    return out
