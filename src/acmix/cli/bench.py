"""``acmix bench``: benchmarks. ``op`` (the attention op and its neighbours, :mod:`acmix.bench.op`) and ``model``
(whole models, :mod:`acmix.cli.bench_model`). A new subcommand is a module with a ``register_*_subcommand``
function, added to :data:`SUBCOMMANDS`."""

from __future__ import annotations

import argparse
import importlib
import sys

from ..bench import op as bench_op
from .main import add_command

#: (module under acmix.cli, function) that add a subcommand to the ``acmix bench`` subparsers
SUBCOMMANDS = (("bench", "register_op_subcommand"), ("bench_model", "register_model_subcommand"))

_OP_HELP = "attention op: every backend vs the unfold reference, 3x3 conv, 1x1 projections, whole layer"
_OP_DESCRIPTION = (
    "Forward + backward time (median of interleaved repeats after warm-up) and peak memory of the local attention op "
    "with each backend (reference = official-style unfold), a 3x3 conv, the layer's three 1x1 projections and the "
    "whole ACmix layer, at the ResNet shapes."
)


def run_op(args: argparse.Namespace) -> int:
    shapes = bench_op.parse_shapes(args.shapes)
    groups = bench_op.specs_for(  # the flags of "what to measure", then of "settings"
        shapes, args.strides, batch=args.batch, heads=args.heads, kernel=args.kernel, backends=args.backends,
        subjects=args.subjects, dtype=args.dtype, device=args.device,
    )  # fmt: skip
    rows = bench_op.run(
        groups,
        warmup=args.warmup,
        repeats=args.repeats,
        memory=args.memory,
        threads=args.threads,
        progress=lambda msg: print(f"measuring {msg}", file=sys.stderr, flush=True),
    )
    print(bench_op.format_environment(rows))
    print()
    print(bench_op.format_table(rows))
    print()
    print(bench_op.format_summary(bench_op.summarize(rows)))
    for path, writer in ((args.csv, bench_op.write_csv), (args.json, bench_op.write_json), (args.plot, bench_op.plot)):
        if path:
            print(f"wrote {writer(rows, path)}")
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {text}")
    return value


def register_op_subcommand(bench_subparsers: argparse._SubParsersAction) -> None:
    """Add ``op`` to the subparsers of ``acmix bench``."""
    p = add_command(bench_subparsers, "op", _OP_HELP, _OP_DESCRIPTION, run_op, raw=False)
    g = p.add_argument_group("what to measure")
    g.add_argument(
        "--shapes", default="64x56,128x28,256x14,512x7", help="CxH items, comma separated (default: ResNet stages)"
    )
    g.add_argument("--strides", type=_positive, nargs="+", default=[1, 2], help="strides (default: 1 2)")
    g.add_argument("--batch", type=_positive, default=8)
    g.add_argument("--heads", type=_positive, default=4)
    g.add_argument("--kernel", type=_positive, default=7, help="attention window (default 7)")
    g.add_argument("--backends", nargs="+", default=None, help="attention backends (default: every runnable one)")
    g.add_argument("--subjects", nargs="+", default=list(bench_op.SUBJECTS), help=f"of: {' '.join(bench_op.SUBJECTS)}")
    g = p.add_argument_group("settings")
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    g.add_argument("--dtype", default="float32", choices=list(bench_op.DTYPES))
    g.add_argument("--threads", type=_positive, default=2, help="torch.set_num_threads (default 2)")
    g.add_argument("--warmup", type=int, default=2, help="untimed steps per subject first (default 2)")
    g.add_argument("--repeats", type=_positive, default=5, help="timed steps per subject (median; default 5)")
    g.add_argument(
        "--memory",
        choices=bench_op.MEMORY_MODES,
        default="auto",
        help="peak memory: auto (fresh subprocess per row on CPU, in-process on CUDA), subprocess, inprocess, off",
    )
    g = p.add_argument_group("output")
    g.add_argument("--csv", default=None, help="write the rows as CSV")
    g.add_argument("--json", default=None, help="write rows and ratios as JSON")
    g.add_argument("--plot", default=None, help="write a bar plot (PNG)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks: op (attention op and neighbours), model (whole models)")
    bench_sub = p.add_subparsers(dest="bench_command", metavar="BENCH")
    for module, func in SUBCOMMANDS:
        getattr(importlib.import_module(f"{__package__}.{module}"), func)(bench_sub)
    p.set_defaults(func=lambda args: _usage(p))


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2
