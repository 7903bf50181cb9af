"""``acmix cost``: the paper's cost analysis (Table 1, the Stage I / II split, the model table, Fig. 4)."""

from __future__ import annotations

import argparse
import json
import sys

from ..analysis.report import build_report, plot_fig4, render_text, write_csv


def run(args: argparse.Namespace) -> int:
    res = args.resolution
    if len(res) > 2 or any(r < 32 for r in res):
        raise ValueError(f"--resolution takes H [W] of at least 32 each, got {' '.join(map(str, res))}")
    size = (res[0], res[-1])
    report = build_report(args.models, size, check_counter=not args.no_cross_check, include_models=not args.no_models)
    if args.plot:
        path = plot_fig4(report, args.plot)
        print(f"wrote {path}", file=sys.stderr)
    if args.json:
        print(json.dumps(report, indent=2))
    elif args.csv:
        write_csv(report, sys.stdout)
    else:
        print(render_text(report), end="")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "cost",
        help="params and multiply-adds: Table 1, Stage I/II split, models vs the paper",
        description="The paper's cost analysis (Sec. 3.3): Table 1, the 99%% / 83%% Stage I split of ResNet-50, and "
        "params / MACs of every registered model beside the paper. MACs = multiply-adds, per image.",
    )
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="JSON with keys table1, stage_split, models")
    out.add_argument("--csv", action="store_true", help="the model table as CSV")
    p.add_argument("--plot", metavar="PATH", help="write the paper's Fig. 4 with the measured MACs (PNG)")
    p.add_argument("--resolution", type=int, nargs="+", default=[224], metavar="H [W]", help="input size (default 224)")
    p.add_argument(
        "--models", nargs="+", metavar="PATTERN", help="fnmatch patterns over model names (default: all in the table)"
    )
    p.add_argument("--no-models", action="store_true", help="only Table 1 and the stage split")
    p.add_argument("--no-split", action="store_true", help="skip the ResNet-50 Stage I / II split")
    p.add_argument("--no-cross-check", action="store_true", help="skip the FlopCounterMode cross-check")
    p.set_defaults(func=run)
