"""``acmix models``: the paper's models and baselines with their table numbers."""

from __future__ import annotations

import argparse

from ..models import PAPER_TABLE
from .main import add_command


def run_models(args: argparse.Namespace) -> int:
    print(f"{'model':<38} {'family':<7} {'params M':>8} {'GMACs':>6} {'top-1':>6}   baseline (params, GMACs, top-1)")
    for row in PAPER_TABLE:
        if args.pattern and args.pattern not in row.name and args.pattern not in row.baseline:
            continue
        print(
            f"{row.name:<38} {row.family:<7} {row.params_m:>8.1f} {row.gmacs:>6.1f} {row.top1:>6.1f}   "
            f"{row.baseline} ({row.baseline_params_m:g}, {row.baseline_gmacs:g}, {row.baseline_top1:g})"
        )
    print("paper numbers (docs/paper-numbers.md); create any of them with timm.create_model(NAME) after `import acmix`")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    m = add_command(sub, "models", "the paper's models and baselines with their table numbers", __doc__, run_models)
    m.add_argument("pattern", nargs="?", default="", help="substring filter")
