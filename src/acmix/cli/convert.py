"""``acmix convert``: official checkpoint -> clean safetensors.

``acmix convert OFFICIAL_FILE OUT.safetensors --model NAME`` reads an official checkpoint safely (no code from the
file runs; yacs need not be installed), maps it onto the acmix model and writes the model's own state dict as
safetensors, atomically. timm's standard path then loads it::

    timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file="OUT.safetensors"))
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..models import extract_state_dict, get_checkpoint_filter, load_official_checkpoint, read_checkpoint
from .main import UsageError, add_command
from .train import one_line_errors

_logger = logging.getLogger(__name__)


def _num_classes_in(state: dict[str, torch.Tensor], model: nn.Module) -> int | None:
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    names = (classifier,) if isinstance(classifier, str) else tuple(classifier or ())
    for name in names:
        weight = state.get(f"{name}.weight")
        if weight is not None and weight.dim() == 2:
            return int(weight.shape[0])
    return None


def convert_checkpoint(src: str | os.PathLike[str], out: str | os.PathLike[str], model_name: str) -> dict[str, Any]:
    """Official checkpoint -> safetensors of ``model_name``'s state dict; returns a summary (report, classes).

    The number of classes is taken from the checkpoint's classifier. The file is written atomically (a temporary
    file in the target directory, then ``os.replace``) and records the SHA-256 of its tensor data.
    """
    import timm

    from .._safetensors import dumps
    from ..train.checkpoint import atomic_write_bytes

    out_path = Path(out)
    if out_path.suffix != ".safetensors":
        raise UsageError(f"the output must be a .safetensors file, got {out_path.name}")
    if not timm.is_model(model_name):
        raise UsageError(f"unknown model {model_name!r}; see `acmix models`")
    obj = read_checkpoint(src)
    state = extract_state_dict(obj, str(src))
    probe = timm.create_model(model_name, pretrained=False)
    fn = get_checkpoint_filter(probe)
    num_classes = _num_classes_in(dict(fn(dict(state), probe)) if fn else state, probe)
    model = probe
    if num_classes is not None and num_classes != getattr(probe, "num_classes", num_classes):
        model = timm.create_model(model_name, pretrained=False, num_classes=num_classes)
    report = load_official_checkpoint(model, obj if isinstance(obj, dict) else state)
    report.source = str(src)
    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    metadata = {"format": "pt", "acmix_model": model_name, "source": Path(src).name}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_path, dumps(tensors, metadata))  # with the data's SHA-256, checked when acmix loads it
    return {"report": report, "num_classes": getattr(model, "num_classes", None), "tensors": len(tensors)}


# ---------------------------------------------------------------------------------------------- command
def run_convert(args: argparse.Namespace) -> int:
    result = convert_checkpoint(args.checkpoint, args.out, args.model)
    print(result["report"].summary())
    print(f"wrote {args.out} ({result['tensors']} tensors, {result['num_classes']} classes)")
    print(
        f"load it: timm.create_model({args.model!r}, pretrained=True, pretrained_cfg_overlay=dict(file={args.out!r}))"
    )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "convert", "official checkpoint -> clean safetensors that timm loads", __doc__, run_convert)
    p.add_argument("checkpoint", help="official file (.pth training state or state dict, or .safetensors)")
    p.add_argument("out", help="output .safetensors file (written atomically)")
    p.add_argument("--model", required=True, help="registered model name, e.g. acmix_swin_tiny_patch4_window7_224")
    one_line_errors(p, "acmix convert")
