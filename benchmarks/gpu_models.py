"""One prepared GPU run of the model comparison (issues 8 and 12): batch 64, bfloat16 autocast, channels_last.

Each ACmix model runs beside its baseline in this one process with interleaved repeats, for the training step and
inference; ``--backend`` picks the local-attention backend of the ``acmix`` variant (``triton`` in
``benchmarks/gpu_all.sh``), ``--aggregate-backend`` the SAN aggregation of every model (baselines included: SAN-10
is itself built on it), ``--extra-backend`` adds more ``acmix-<name>`` variants (e.g. ``tiled``) and
``--reference`` the official-style formulation. Sized to finish in about 3 minutes on one H100: no
``torch.compile`` (``--compile`` adds it), 3 warm-up steps, median of 5 repeats of 3 steps; a model whose turn would
start after ``--budget-s`` seconds is skipped and listed as skipped. Out-of-memory halves the batch (reported in
the rows). Prints the issue-12 targets met or missed. Without CUDA it prints why and measures nothing
(``--device cpu`` for a dry run).

    python benchmarks/gpu_models.py --out "$OUT"      # table on stdout; <prefix>.csv, .json, .png in $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence

import torch

from acmix.bench.config import BenchConfig, BenchResult
from acmix.bench.model import (
    DEFAULT_MODELS,
    Ratio,
    compare_models,
    compute_ratios,
    format_environment,
    format_ratios,
    format_table,
    plot_bars,
    write_csv,
    write_json,
)

#: issue 12 targets (GPU, batch 64, 224^2, bf16 autocast, channels_last): (model, mode, quantity, limit)
TARGETS = (
    ("acmix_resnet26", "train", "time", 1.5),
    ("acmix_resnet50", "train", "time", 1.5),
    ("acmix_resnet50", "train", "memory", 1.3),
    ("acmix_resnet26", "infer", "time", 1.3),
    ("acmix_resnet50", "infer", "time", 1.3),
    ("acmix_swin_tiny_patch4_window7_224", "train", "time", 1.15),
    ("acmix_pvt_tiny", "train", "time", 1.2),
)
#: SAN-10 training step against the ResNet-50 baseline's (issue 12: <= 2x)
SAN_TARGET = 2.0


def evaluate_targets(rows: Sequence[BenchResult], ratios: Sequence[Ratio]) -> list[dict]:
    """Every issue-12 target that the rows can answer: value, limit and whether it is met."""
    out = []
    by = {(q.model, q.mode): q for q in ratios}
    for model, mode, what, limit in TARGETS:
        q = by.get((model, mode))
        value = None if q is None else (q.time_vs_baseline if what == "time" else q.memory_vs_baseline)
        if value is not None:
            out.append({"target": f"{model} {mode} {what} / baseline", "value": value, "limit": limit,
                        "met": value <= limit})  # fmt: skip
    per_image = {(r.model, r.mode): r.latency_ms / r.batch for r in rows if r.variant in ("baseline", "acmix")}
    san, r50 = per_image.get(("san10", "train")), per_image.get(("resnet50_san", "train"))
    if san is not None and r50 is not None:
        value = san / r50
        out.append({"target": "san10 train / resnet50 train", "value": value, "limit": SAN_TARGET,
                    "met": value <= SAN_TARGET})  # fmt: skip
    return out


def format_targets(targets: Sequence[dict]) -> str:
    lines = ["issue-12 targets:"]
    for t in targets:
        lines.append(f"  {t['target']:<58} {t['value']:6.2f}x  (<= {t['limit']}x)  {'met' if t['met'] else 'MISSED'}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="gpu_models.py", description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="*", default=list(DEFAULT_MODELS))
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--memory-format", default="channels_last")
    p.add_argument("--compile", action="store_true", help="torch.compile every model")
    p.add_argument("--backend", default=None, help="local-attention backend of the 'acmix' variant (default: auto)")
    p.add_argument("--aggregate-backend", default=None, help="SAN aggregation backend of every model (default: auto)")
    p.add_argument("--extra-backend", nargs="*", default=[], help="more acmix-<name> variants, e.g. tiled")
    p.add_argument("--reference", action="store_true", help="also time the official-style formulation")
    p.add_argument("--mode", nargs="+", default=["train", "infer"])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps-per-repeat", type=int, default=3)
    p.add_argument("--budget-s", type=float, default=200.0, help="start no new model after this many seconds")
    p.add_argument("--out", default=os.environ.get("OUT"), help="folder for the CSV, JSON and PNG")
    p.add_argument("--prefix", default="gpu_models", help="file names <prefix>.csv/.json/.png (default gpu_models)")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_models.py: no CUDA device here; nothing measured (--device cpu for a dry run)", file=sys.stderr)
        return 0
    if args.aggregate_backend:
        os.environ["ACMIX_AGGREGATE_BACKEND"] = args.aggregate_backend
    torch.backends.cudnn.benchmark = True
    config = BenchConfig(
        device=args.device,
        dtype=args.dtype,
        batch=args.batch,
        resolution=args.resolution,
        memory_format=args.memory_format,
        compile=args.compile,
        backend=args.backend,
        warmup=args.warmup,
        repeats=args.repeats,
        steps_per_repeat=args.steps_per_repeat,
    )
    start, rows, skipped = time.perf_counter(), [], []
    for name in args.models:
        elapsed = time.perf_counter() - start
        if elapsed > args.budget_s:
            skipped.append(name)
            continue
        print(f"[{elapsed:6.1f} s] {name}", file=sys.stderr, flush=True)
        rows += compare_models(
            [name],
            config,
            modes=args.mode,
            reference=args.reference,
            memory="inprocess" if args.device.startswith("cuda") else "off",
            extra_backends=args.extra_backend,
            on_rows=lambda got: print(format_table(got), file=sys.stderr, flush=True),
        )
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    ratios = compute_ratios(rows)
    targets = evaluate_targets(rows, ratios)
    print(format_environment(rows))
    print(f"attention backend of 'acmix': {args.backend or 'auto'}; aggregation: {args.aggregate_backend or 'auto'}")
    print(format_table(rows))
    print(format_ratios(ratios))
    print(format_targets(targets))
    print(f"total {time.perf_counter() - start:.0f} s; skipped (budget): {', '.join(skipped) or 'none'}")
    if args.out and rows:
        base = os.path.join(args.out, args.prefix)
        write_csv(rows, base + ".csv")
        write_json(rows, base + ".json", ratios)
        with open(base + ".json") as fh:
            doc = json.load(fh)
        doc["targets"] = targets
        doc["skipped"] = skipped
        with open(base + ".json", "w") as fh:
            json.dump(doc, fh, indent=2)
        plot_bars(rows, base + ".png")
        print(f"wrote {args.prefix}.csv, .json, .png to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
