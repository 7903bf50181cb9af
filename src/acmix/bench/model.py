"""Model-level comparison: each ACmix model beside its baseline and beside its own official-style formulation.

For every ACmix model and mode, three variants run **in the same process and the same run**, their timed repeats
interleaved (:func:`acmix.bench.runner.time_interleaved`), so that a shared, noisy machine affects all alike:

* ``baseline``: the model the paper compares with (``acmix.models.PAPER_TABLE``);
* ``acmix``: the ACmix model with the configured backend (default: automatic, the fastest runnable one);
* ``acmix-reference``: the same weights with the official-style formulation forced on every ACmix layer
  (``backend="reference"``: unfold local attention, unfold SAN aggregation, FC + permute + group conv for the
  convolution path, explicit softmax(q k^T) v for the Swin/PVT host attention; see
  :func:`acmix.bench.switch.backend_context`).

Ratios compare time per image (so a batch halved after out-of-memory stays comparable) and peak memory. On a CPU
the peak memory of each variant is measured in a fresh interpreter (``rss_hwm_subprocess``, see
:mod:`acmix.bench.memory`), on CUDA in-process with ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn

from ..models import PAPER_TABLE, create_model
from . import report
from .config import MODES, RESULT_FIELDS, BenchConfig, BenchResult, ModelFactory
from .memory import MEMORY_MODES, check_memory_mode, measure_memory_subprocess
from .report import columns, fmt, ratio, save_figure
from .runner import BenchCase, time_interleaved
from .switch import acmix_layers

__all__ = [
    "DEFAULT_MODELS",
    "MEMORY_MODES",
    "Ratio",
    "PEER_BASELINES",
    "baseline_of",
    "compare_models",
    "compute_ratios",
    "format_environment",
    "format_ratios",
    "format_table",
    "plot_bars",
    "write_csv",
    "write_json",
]

_logger = logging.getLogger(__name__)

#: the ACmix models measured when none are named (one per family, the paper's smallest)
DEFAULT_MODELS = ("acmix_resnet26", "acmix_san10", "acmix_pvt_tiny", "acmix_swin_tiny_patch4_window7_224")


#: timm's own local-attention ResNets and their convolutional twins: the reference ratio ACmix aims for
#: (``acmix bench model halonet26t --resolution 256``; HaloNet needs maps divisible by its block size 8)
PEER_BASELINES = {"halonet26t": "resnet26t", "botnet26t_256": "resnet26t", "lambda_resnet26t": "resnet26t"}


def baseline_of(name: str) -> str | None:
    """The baseline of a model: its paper row's (``acmix.models.PAPER_TABLE``), a timm peer's convolutional twin
    (:data:`PEER_BASELINES`), or None."""
    for row in PAPER_TABLE:
        if row.name == name:
            return str(row.baseline)
    return PEER_BASELINES.get(name)


@dataclass(frozen=True)
class Ratio:
    """Ratios of one comparison (one ACmix model, one mode); ``None`` where a side is missing.

    ``time_vs_baseline`` and ``memory_vs_baseline`` are ACmix / baseline (lower is better);
    ``reference_time_vs_acmix`` and ``reference_memory_vs_acmix`` are official-style / ACmix, the gain of this
    implementation over the official formulation (higher is better).
    """

    model: str
    baseline: str | None
    mode: str
    time_vs_baseline: float | None
    memory_vs_baseline: float | None
    reference_time_vs_acmix: float | None
    reference_memory_vs_acmix: float | None


def _ms_per_image(row: BenchResult) -> float:
    return row.latency_ms / row.batch


def compute_ratios(rows: Sequence[BenchResult]) -> list[Ratio]:
    """One :class:`Ratio` per (group, mode) of comparison rows, in the order the groups first appear."""
    keys: list[tuple[str, str]] = []
    by_key: dict[tuple[str, str], dict[str, BenchResult]] = {}
    for row in rows:
        if not row.group:
            continue
        key = (row.group, row.mode)
        if key not in by_key:
            keys.append(key)
            by_key[key] = {}
        by_key[key][row.variant] = row
    out = []
    for group, mode in keys:
        v = by_key[(group, mode)]
        base, mine, ref = v.get("baseline"), v.get("acmix"), v.get("acmix-reference")

        def t(r: BenchResult | None) -> float | None:
            return None if r is None else _ms_per_image(r)

        def m(r: BenchResult | None) -> float | None:
            return None if r is None else r.peak_mem_mib

        out.append(
            Ratio(
                model=group,
                baseline=None if base is None else base.model,
                mode=mode,
                time_vs_baseline=ratio(t(mine), t(base)),
                memory_vs_baseline=ratio(m(mine), m(base)),
                reference_time_vs_acmix=ratio(t(ref), t(mine)),
                reference_memory_vs_acmix=ratio(m(ref), m(mine)),
            )
        )
    return out


def compare_models(
    models: Sequence[str] = DEFAULT_MODELS,
    config: BenchConfig | None = None,
    modes: Sequence[str] = ("train",),
    *,
    baseline: bool = True,
    reference: bool = True,
    memory: str = "auto",
    factory: ModelFactory | None = None,
    baselines: dict[str, str] | None = None,
    progress: Callable[[str], None] | None = None,
    on_rows: Callable[[list[BenchResult]], None] | None = None,
    extra_backends: Sequence[str] = (),
) -> list[BenchResult]:
    """Measure each model beside its baseline and its official-style formulation, interleaved, one process.

    Args:
        models: ACmix model names (any registered name works; one without a baseline or without ACmix layers is
            measured alone).
        config: measurement settings shared by all variants (``config.backend`` applies to the ``acmix`` variant).
        modes: any of ``"train"`` and ``"infer"``.
        baseline: include each model's baseline.
        reference: include the ``acmix-reference`` variant (official-style formulation, same weights).
        memory: ``"auto"`` (a fresh subprocess per variant on CPU when the models come from the registry,
            in-process otherwise), ``"subprocess"``, ``"inprocess"`` or ``"off"``.
        factory: builds a module from a name (default: the timm registry); a custom factory implies in-process
            memory, since a fresh interpreter cannot rebuild its models.
        baselines: name -> baseline name, overriding ``PAPER_TABLE``.
        progress: called with a one-line message before each comparison (the CLI prints them).
        on_rows: called with the rows of each comparison as soon as it is measured (long runs keep partial results).
        extra_backends: more variants of each ACmix model, one per local-attention backend named here (variant
            ``acmix-<name>``, same weights), timed in the same interleaved run (e.g. ``triton`` against ``tiled``).

    Returns:
        one :class:`~acmix.bench.config.BenchResult` per model, variant and mode, with ``group`` set to the
        ACmix model's name; :func:`compute_ratios` turns them into ratios.
    """
    config = config or BenchConfig()
    _check_comparison(models, modes, memory, factory, baselines)
    build: ModelFactory = factory or (
        lambda n: create_model(n, num_classes=config.num_classes, in_chans=config.in_chans)
    )
    use_subprocess = memory == "subprocess" or (
        memory == "auto" and factory is None and torch.device(config.device).type == "cpu"
    )
    rows: list[BenchResult] = []
    for name in models:
        base_name = baselines[name] if baselines and name in baselines else baseline_of(name)
        for mode in modes:
            if progress is not None:
                progress(f"{name} ({mode}) vs {base_name or '-'}")
            module = build(name)
            base = build(base_name) if baseline and base_name is not None else None
            cases = _comparison_cases(name, module, config, base_name, base, reference, extra_backends)
            got = time_interleaved(cases, mode, measure_memory=memory != "off" and not use_subprocess)
            if use_subprocess:
                _memory_in_children(got, cases, mode)
            rows.extend(got)
            if on_rows is not None:
                on_rows(got)
            del cases, module, base
    return rows


def _check_comparison(
    models: Sequence[str],
    modes: Sequence[str],
    memory: str,
    factory: ModelFactory | None,
    baselines: dict[str, str] | None,
) -> None:
    """One-line errors for bad arguments of :func:`compare_models`, before minutes of measuring, not after."""
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    check_memory_mode(memory)
    if memory == "subprocess" and factory is not None:
        raise ValueError("memory='subprocess' needs registered model names; a custom factory measures in-process")
    if not models:
        raise ValueError("no models given")
    if factory is None:
        import timm

        unknown = [n for n in [*models, *(baselines or {}).values()] if not timm.is_model(n)]
        if unknown:
            raise ValueError(f"unknown model {unknown[0]!r}; see acmix.list_models() or `acmix models`")


def _comparison_cases(
    name: str,
    module: nn.Module,
    config: BenchConfig,
    base_name: str | None,
    base: nn.Module | None,
    reference: bool,
    extra_backends: Sequence[str],
) -> list[BenchCase]:
    """The variants of one comparison: baseline, ``acmix``, ``acmix-reference`` and ``acmix-<backend>``."""
    cases = []
    if base is not None and base_name is not None:
        cases.append(BenchCase(base_name, base, replace(config, backend=None), "baseline", name))
    has_layers = bool(acmix_layers(module))
    ref = copy.deepcopy(module) if reference and has_layers else None
    label = "acmix" if has_layers or len(cases) else ""
    cases.append(BenchCase(name, module, config, label, name))
    if ref is not None:
        cases.append(BenchCase(name, ref, replace(config, backend="reference"), "acmix-reference", name))
    switchable = any(hasattr(m, "backend") for m in acmix_layers(module))  # a local-attention path
    for extra in extra_backends if switchable else ():
        extra_cfg = replace(config, backend=extra)
        cases.append(BenchCase(name, copy.deepcopy(module), extra_cfg, f"acmix-{extra}", name))
    return cases


def _memory_in_children(rows: list[BenchResult], cases: list[BenchCase], mode: str) -> None:
    """Fill each row's peak memory from a fresh interpreter that runs the case's warm-up (at most 2 steps)."""
    for row, case in zip(rows, cases):
        mem_cfg = replace(case.config, batch=row.batch, warmup=min(case.config.warmup, 2))
        peak, method = measure_memory_subprocess(case.name, mode, mem_cfg)
        row.peak_mem_mib, row.mem_method = peak, method if peak is not None else "none"
        if peak is None:
            row.note = "; ".join(x for x in (row.note, f"memory: {method}") if x)


# ---------------------------------------------------------------------------------------------------- output


def format_table(rows: Sequence[BenchResult]) -> str:
    """A fixed-width text table of the rows (time per step, images/s, peak memory, batch and backend)."""
    head = ("model", "variant", "mode", "batch", "backend", "step ms", "img/s", "peak MiB", "note")
    body = [
        (
            r.model,
            r.variant or "-",
            r.mode,
            str(r.batch) if r.batch == r.requested_batch else f"{r.batch}/{r.requested_batch}",
            r.backend,
            f"{r.latency_ms:.1f}",
            f"{r.images_per_s:.2f}",
            fmt(r.peak_mem_mib, ".0f"),
            r.note,
        )
        for r in rows
    ]
    return columns(head, body)


#: the ratio columns of :func:`format_ratios`: header, Ratio field (each printed as ``1.23x``)
_RATIO_COLUMNS = (
    ("time/baseline", "time_vs_baseline"),
    ("mem/baseline", "memory_vs_baseline"),
    ("official-style/acmix time", "reference_time_vs_acmix"),
    ("mem", "reference_memory_vs_acmix"),
)


def format_ratios(ratios: Sequence[Ratio]) -> str:
    """A text table of the ratios (``x`` suffix; ``-`` where a side is missing)."""
    head = ["model", "baseline", "mode", *(header for header, _ in _RATIO_COLUMNS)]
    body = [
        [q.model, q.baseline or "-", q.mode, *(fmt(getattr(q, field), ".2f", "x") for _, field in _RATIO_COLUMNS)]
        for q in ratios
    ]
    return columns(head, body)


def format_environment(rows: Sequence[BenchResult]) -> str:
    """One line naming the device, versions, threads, dtype, resolution, memory format and compile flag."""
    if not rows:
        return ""
    r = rows[0]
    return (
        f"{r.device_name} ({r.device}), torch {r.torch_version}, acmix {r.acmix_version}, {r.threads} threads, "
        f"{r.dtype}, {r.resolution}x{r.resolution}, {r.memory_format}, compile={'on' if r.compiled else 'off'}, "
        f"median of {r.repeats} x {r.steps_per_repeat} steps after {r.warmup} warm-up, memory: {r.mem_method}"
    )


def write_csv(rows: Sequence[BenchResult], path: str | Path) -> Path:
    """Write the rows as CSV (one column per :class:`BenchResult` field), atomically."""
    return report.write_csv(rows, path, RESULT_FIELDS)


def write_json(rows: Sequence[BenchResult], path: str | Path, ratios: Sequence[Ratio] | None = None) -> Path:
    """Write ``{"rows": [...], "ratios": [...]}`` as JSON, atomically."""
    return report.write_json({"rows": [r.to_dict() for r in rows], "ratios": [asdict(q) for q in (ratios or [])]}, path)


def plot_bars(rows: Sequence[BenchResult], path: str | Path) -> Path:
    """Grouped bar plot (PNG): time per image and peak memory per model and variant, one row of panels per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in MODES if any(r.mode == m for r in rows)]
    if not modes:
        raise ValueError("no rows to plot")
    groups = list(dict.fromkeys(r.group or r.model for r in rows))
    variants = list(dict.fromkeys(r.variant or "-" for r in rows))
    fig, axes = plt.subplots(len(modes), 2, figsize=(4 + 2.2 * len(groups), 3.6 * len(modes)), squeeze=False)
    width = 0.8 / max(1, len(variants))
    for i, mode in enumerate(modes):
        for j, (label, value) in enumerate(
            (("ms per image", lambda r: _ms_per_image(r)), ("peak memory (MiB)", lambda r: r.peak_mem_mib))
        ):
            ax = axes[i][j]
            for k, variant in enumerate(variants):
                xs, ys = [], []
                for g, group in enumerate(groups):
                    for r in rows:
                        if r.mode == mode and (r.group or r.model) == group and (r.variant or "-") == variant:
                            y = value(r)
                            if y is not None:
                                xs.append(g + (k - (len(variants) - 1) / 2) * width)
                                ys.append(y)
                ax.bar(xs, ys, width=width, label=variant)
            ax.set_xticks(range(len(groups)))
            ax.set_xticklabels([g.replace("_patch4_window7_224", "") for g in groups], rotation=20, fontsize=8)
            ax.set_title(f"{mode}: {label}", fontsize=9)
            ax.legend(fontsize=7)
    env = format_environment(rows)
    fig.suptitle(env[:160], fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)
