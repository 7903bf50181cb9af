"""One prepared GPU run of the model comparison (issue 8): batch 64, bfloat16 autocast, channels_last.

Each ACmix model runs beside its baseline and beside its official-style formulation (``backend="reference"``), in
this one process with interleaved repeats, for the training step and inference. Sized to finish in about
4 minutes on one H100: no ``torch.compile`` (``--compile`` adds it), 3 warm-up steps, median of 5 repeats of 3
steps; a model whose turn would start after ``--budget-s`` seconds is skipped and listed as skipped.
Out-of-memory halves the batch (reported in the rows). Without CUDA it prints why and measures nothing.

    python benchmarks/gpu_models.py --out "$OUT"          # table on stdout; rows.csv, rows.json, bars.png in $OUT
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from acmix.bench.model import (
    DEFAULT_MODELS,
    compare_models,
    compute_ratios,
    format_environment,
    format_ratios,
    format_table,
    plot_bars,
    write_csv,
    write_json,
)
from acmix.bench.runner import BenchConfig


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="gpu_models.py", description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="*", default=list(DEFAULT_MODELS))
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--memory-format", default="channels_last")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--mode", nargs="+", default=["train", "infer"])
    p.add_argument("--budget-s", type=float, default=200.0, help="start no new model after this many seconds")
    p.add_argument("--out", default=os.environ.get("OUT"), help="folder for rows.csv, rows.json, bars.png")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_models.py: no CUDA device here; nothing measured (--device cpu for a dry run)", file=sys.stderr)
        return 0
    torch.backends.cudnn.benchmark = True
    config = BenchConfig(
        device=args.device,
        dtype=args.dtype,
        batch=args.batch,
        resolution=224,
        memory_format=args.memory_format,
        compile=args.compile,
        warmup=3,
        repeats=5,
        steps_per_repeat=3,
    )
    start, rows, skipped = time.perf_counter(), [], []
    for name in args.models:
        elapsed = time.perf_counter() - start
        if elapsed > args.budget_s:
            skipped.append(name)
            continue
        print(f"[{elapsed:6.1f} s] {name}", file=sys.stderr, flush=True)
        rows += compare_models([name], config, modes=args.mode)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    ratios = compute_ratios(rows)
    print(format_environment(rows))
    print(format_table(rows))
    print(format_ratios(ratios))
    print(f"total {time.perf_counter() - start:.0f} s; skipped (budget): {', '.join(skipped) or 'none'}")
    if args.out:
        write_csv(rows, os.path.join(args.out, "rows.csv"))
        write_json(rows, os.path.join(args.out, "rows.json"), ratios)
        plot_bars(rows, os.path.join(args.out, "bars.png"))
        print(f"wrote rows.csv, rows.json, bars.png to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
