"""``acmix predict IMAGE...``: top-k classes with probabilities for image files (PNG, JPEG, ...) from a checkpoint."""

from __future__ import annotations

import argparse
import json

from .main import UsageError
from .train import one_line_errors


def run(args: argparse.Namespace) -> int:
    from ..train.distributed import resolve_device
    from ..train.inference import load_model, predict_images

    if args.topk < 1:
        raise UsageError(f"--topk must be positive, got {args.topk}")
    loaded = load_model(args.checkpoint, model_name=args.model, use_ema=args.ema, device=resolve_device(args.device))
    results = predict_images(loaded, args.images, topk=args.topk)
    if args.json:
        print(
            json.dumps(
                [{"image": p, "top": [{"class": c, "prob": pr} for c, pr in r]} for p, r in zip(args.images, results)]
            )
        )
        return 0
    for path, top in zip(args.images, results):
        print(f"{path}: " + ", ".join(f"{c} {pr:.3f}" for c, pr in top))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="top-k classes for image files", description=__doc__)
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--checkpoint", "-c", required=True, help="run folder, .state.pt or .safetensors")
    p.add_argument("--model", help="model name, for checkpoints without an acmix state file")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--ema", action="store_true", help="use the EMA weights")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true")
    one_line_errors(p, "acmix predict")
    p.set_defaults(func=run)
