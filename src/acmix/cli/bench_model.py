"""``acmix bench model``: speed and peak memory of whole models, each ACmix model beside its baseline and beside
its official-style formulation (see :mod:`acmix.bench.model`). Registered under ``acmix bench`` by
:func:`register_model_subcommand`."""

from __future__ import annotations

import argparse
import sys

from ..bench.config import DTYPES, MEMORY_FORMATS, MODES, BenchConfig
from ..bench.model import (
    DEFAULT_MODELS,
    MEMORY_MODES,
    compare_models,
    compute_ratios,
    format_environment,
    format_ratios,
    format_table,
    plot_bars,
    write_csv,
    write_json,
)
from ..ops import get_backend
from .main import add_command

_HELP = "model speed and memory: ACmix vs baseline vs official-style formulation"
_DESCRIPTION = (
    "Inference and training-step throughput and peak memory of whole models. Each ACmix model runs beside its "
    "baseline (acmix.models.PAPER_TABLE) and beside itself with the official-style 'reference' formulation, in one "
    "process with interleaved repeats; ratios compare time per image."
)
#: the flags that are :class:`~acmix.bench.config.BenchConfig` fields of the same name
_CONFIG_FLAGS = (
    "device", "dtype", "batch", "resolution", "memory_format", "compile", "backend", "warmup", "repeats",
    "steps_per_repeat", "threads", "num_classes",
)  # fmt: skip


def run_model(args: argparse.Namespace) -> int:
    if args.backend is not None:
        get_backend(args.backend)  # an unknown name is a one-line error before anything is measured
    config = BenchConfig(**{name: getattr(args, name) for name in _CONFIG_FLAGS})
    rows = compare_models(
        args.models or DEFAULT_MODELS,
        config,
        modes=args.mode,
        baseline=not args.no_baseline,
        reference=not args.no_reference,
        memory=args.memory,
        progress=lambda msg: print(f"measuring {msg}", file=sys.stderr, flush=True),
        on_rows=lambda got: print(format_table(got), file=sys.stderr, flush=True),
    )
    ratios = compute_ratios(rows)
    print(format_environment(rows))
    print()
    print(format_table(rows))
    if any(q.baseline or q.reference_time_vs_acmix is not None for q in ratios):
        print()
        print(format_ratios(ratios))
    for path, writer in ((args.csv, write_csv), (args.plot, plot_bars)):
        if path:
            print(f"wrote {writer(rows, path)}")
    if args.json:
        print(f"wrote {write_json(rows, args.json, ratios)}")
    return 0


def register_model_subcommand(bench_subparsers: argparse._SubParsersAction) -> None:
    """Add ``model`` to the subparsers of ``acmix bench``."""
    p = add_command(bench_subparsers, "model", _HELP, _DESCRIPTION, run_model, raw=False)
    p.add_argument("models", nargs="*", help=f"registered model names (default: {' '.join(DEFAULT_MODELS)})")
    g = p.add_argument_group("what to measure")
    g.add_argument("--mode", nargs="+", choices=MODES, default=["train"], help="training step and/or inference")
    g.add_argument("--no-baseline", action="store_true", help="skip the baselines")
    g.add_argument("--no-reference", action="store_true", help="skip the official-style (reference) variant")
    g.add_argument(
        "--memory",
        choices=MEMORY_MODES,
        default="auto",
        help="peak memory: auto (a fresh subprocess per variant on CPU, in-process on CUDA), subprocess, "
        "inprocess or off",
    )
    g = p.add_argument_group("settings")
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    g.add_argument("--dtype", default="float32", help=f"compute dtype: {', '.join(DTYPES)} (autocast for 16-bit)")
    g.add_argument("--batch", type=int, default=8, help="batch (halved on out-of-memory, reported)")
    g.add_argument("--resolution", type=int, default=224, help="input side (default 224)")
    g.add_argument("--memory-format", choices=MEMORY_FORMATS, default="contiguous")
    g.add_argument("--compile", action="store_true", help="torch.compile every model")
    g.add_argument("--backend", default=None, help="local-attention backend of the 'acmix' variant (default: auto)")
    g.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave as is)")
    g.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    g.add_argument("--repeats", type=int, default=5, help="timed repeats; the median is reported (default 5)")
    g.add_argument("--steps-per-repeat", type=int, default=1, help="steps in one timed repeat (default 1)")
    g.add_argument("--num-classes", type=int, default=1000)
    g = p.add_argument_group("output")
    g.add_argument("--csv", default=None, help="write the rows as CSV")
    g.add_argument("--json", default=None, help="write rows and ratios as JSON")
    g.add_argument("--plot", default=None, help="write a bar plot (PNG)")
