"""Model-level speed and memory: each ACmix model beside its baseline and its official-style formulation.

A thin wrapper over ``acmix bench model`` (library: :mod:`acmix.bench.model`) whose defaults are the issue-8 CPU
setting: 2 threads, batch 8, 224 x 224, float32, training step, median of 5 interleaved repeats. Every flag of
``acmix bench model`` works here (``--help``).

    .venv/bin/python benchmarks/bench_models.py --csv results/models.csv --plot results/models.png
"""

from __future__ import annotations

import argparse
import sys

from acmix.cli.bench_model import register_model_subcommand

CPU_DEFAULTS = ["--threads", "2", "--batch", "8", "--resolution", "224", "--dtype", "float32", "--repeats", "5"]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench_models.py")
    register_model_subcommand(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["model", *CPU_DEFAULTS, *argv])  # later flags override the defaults
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
