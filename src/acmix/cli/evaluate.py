"""``acmix eval``: top-1 / top-5 and loss of a checkpoint on a dataset, with the checkpoint's eval transform.

The checkpoint is an acmix run folder / state file / safetensors file, or (with ``--model``) an official or
timm checkpoint loaded through :func:`acmix.models.load_official_checkpoint`. Without ``--data-dir`` it
evaluates on the embedded digits validation split.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .main import UsageError, add_command
from .train import one_line_errors


def run(args: argparse.Namespace) -> int:
    import torch

    from ..train.data import (
        DigitsDataset,
        ImageFolderDataset,
        ShardSampler,
        data_eval_transform,
        image_mode,
        make_loader,
    )
    from ..train.distributed import resolve_device
    from ..train.engine import evaluate
    from ..train.inference import load_model

    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be positive, got {args.batch_size}")
    if args.checkpoint is None and args.model is None:
        raise UsageError("give a CHECKPOINT or --model NAME (with --pretrained weights of timm)")
    device = resolve_device(args.device)
    loaded = load_model(
        args.checkpoint,
        model_name=args.model,
        num_classes=args.num_classes,
        use_ema=args.ema,
        strict=not args.no_strict,
        device=device,
    )
    data = dict(loaded.data)
    if args.input_size:
        data["input_size"] = args.input_size
    ds: Any
    if args.data_dir is None:
        if int(data.get("in_chans", 1)) != 1:
            raise UsageError(f"{loaded.model_name} takes {data.get('in_chans')} channels; give --data-dir")
        ds = DigitsDataset("val", input_size=int(data.get("input_size", 8)))
    else:
        root = Path(args.data_dir)
        split_dir = root / args.split if (root / args.split).is_dir() else root
        class_to_idx = {c: i for i, c in enumerate(loaded.classes)} if loaded.state else None
        ds = ImageFolderDataset(
            split_dir,
            data_eval_transform(data, default_crop_pct=0.875),
            class_to_idx=class_to_idx,
            img_mode=image_mode(int(data.get("in_chans", 3))),
            skip_bad=args.skip_bad_images,
        )
    loader = make_loader(ds, ShardSampler(len(ds), shuffle=False), args.batch_size, workers=args.workers)
    amp = torch.bfloat16 if args.amp else None
    res = evaluate(loaded.model, loader, device=device, amp_dtype=amp, progress=not args.json)
    res["checkpoint"] = str(loaded.source)
    res["model"] = loaded.model_name
    if args.json:
        res["bad_images"] = len(res["bad_images"])
        print(json.dumps(res))
    else:
        print(
            f"{loaded.model_name} ({loaded.source}) on {res['count']} images: top-1 {res['top1']:.2f}%, "
            f"top-5 {res['top5']:.2f}%, loss {res['loss']:.4f}"
        )
        if res["bad_images"]:
            print(f"skipped {len(res['bad_images'])} unreadable image(s)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "eval", "evaluate a checkpoint (top-1/top-5/loss)", __doc__, run)
    p.add_argument("checkpoint", nargs="?", help="run folder, .state.pt, .safetensors or official checkpoint")
    p.add_argument("--model", help="model name, for checkpoints without an acmix state file")
    p.add_argument("--num-classes", type=int, help="classes of a bare checkpoint's model")
    p.add_argument("--data-dir", help="image folder (its --split sub-folder if present); default: embedded digits")
    p.add_argument("--split", default="val")
    p.add_argument("--input-size", type=int)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--ema", action="store_true", help="evaluate the EMA weights")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    p.add_argument("--no-strict", action="store_true", help="skip missing/unexpected keys (reported)")
    p.add_argument("--skip-bad-images", action="store_true")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    one_line_errors(p, "acmix eval")
