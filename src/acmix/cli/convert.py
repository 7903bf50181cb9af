"""``acmix convert`` (official checkpoint -> clean safetensors), ``acmix export`` (ONNX) and ``acmix models``.

``acmix convert OFFICIAL_FILE OUT.safetensors --model NAME`` reads an official checkpoint safely (no code from the
file runs; yacs need not be installed), maps it onto the acmix model and writes the model's own state dict as
safetensors, atomically. timm's standard path then loads it::

    timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file="OUT.safetensors"))

``acmix export NAME OUT.onnx`` writes an ONNX graph (opset 18, PyTorch's dynamo exporter; the local attention
runs its ``reference`` backend while tracing) and checks it in onnxruntime on the CPU against PyTorch.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..models import PAPER_TABLE, extract_state_dict, get_checkpoint_filter, load_official_checkpoint, read_checkpoint
from ..ops import use_backend
from .main import UsageError

_logger = logging.getLogger(__name__)


def _atomic_target(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    return Path(tmp)


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
    file in the target directory, then ``os.replace``).
    """
    import safetensors.torch
    import timm

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
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    tmp = _atomic_target(out_path)
    try:
        metadata = {"format": "pt", "acmix_model": model_name, "source": Path(src).name}
        safetensors.torch.save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return {"report": report, "num_classes": getattr(model, "num_classes", None), "tensors": len(tensors)}


def export_onnx(
    model: nn.Module,
    out: str | os.PathLike[str],
    input_size: tuple[int, int, int, int] = (1, 3, 224, 224),
    *,
    opset: int = 18,
    check: bool = True,
    atol: float = 1e-4,
) -> dict[str, Any]:
    """Export ``model`` (eval mode) to ONNX and, with ``check``, compare onnxruntime (CPU) with PyTorch.

    Args:
        model: any acmix/timm model.
        out: the ``.onnx`` file (written atomically).
        input_size: (B, C, H, W) of the traced input; the graph has static shapes.
        opset: ONNX opset (>= 17).
        check: run the graph in onnxruntime and raise ValueError if it differs from PyTorch by more than ``atol``.

    Returns:
        ``{"path", "opset", "max_abs_diff"}``: the graph's actual opset (the exporter may raise a request it
        cannot convert down to), and ``max_abs_diff`` (None without ``check``).
    """
    if opset < 17:
        raise ValueError(f"opset must be >= 17, got {opset}")
    out_path = Path(out)
    model = model.eval()
    x = torch.randn(*input_size, generator=torch.Generator().manual_seed(0))
    tmp = _atomic_target(out_path)
    try:
        with use_backend(attention="reference"), torch.no_grad():
            torch.onnx.export(
                model,
                (x,),
                str(tmp),
                opset_version=opset,
                dynamo=True,
                input_names=["image"],
                output_names=["logits"],
                external_data=False,
                verbose=False,
            )
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    import onnx

    graph = onnx.load(str(out_path), load_external_data=False)
    actual = max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx"))
    diff = None
    if check:
        import onnxruntime as ort

        session = ort.InferenceSession(str(out_path), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
        with torch.no_grad():
            ref = model(x)
        diff = float((got - ref).abs().max())
        if diff > atol:
            raise ValueError(f"onnxruntime differs from PyTorch by {diff:.3g} > {atol:g} ({out_path})")
    return {"path": str(out_path), "opset": actual, "max_abs_diff": diff}


# ---------------------------------------------------------------------------------------------- commands
def run_convert(args: argparse.Namespace) -> int:
    result = convert_checkpoint(args.checkpoint, args.out, args.model)
    print(result["report"].summary())
    print(f"wrote {args.out} ({result['tensors']} tensors, {result['num_classes']} classes)")
    print(
        f"load it: timm.create_model({args.model!r}, pretrained=True, pretrained_cfg_overlay=dict(file={args.out!r}))"
    )
    return 0


def _size(text: str) -> tuple[int, int]:
    parts = [int(p) for p in text.lower().replace("x", ",").split(",") if p]
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"expected SIZE or HxW, got {text!r}")
    return parts[0], parts[1]


def run_export(args: argparse.Namespace) -> int:
    import timm

    if not timm.is_model(args.model):
        raise UsageError(f"unknown model {args.model!r}; see `acmix models`")
    kwargs: dict[str, Any] = {}
    if args.weights:
        kwargs = dict(pretrained=True, pretrained_cfg_overlay=dict(file=args.weights))
    if args.num_classes is not None:
        kwargs["num_classes"] = args.num_classes
    model = timm.create_model(args.model, **kwargs)
    h, w = args.size
    in_chans = int(getattr(model, "in_chans", 3))
    result = export_onnx(model, args.out, (args.batch, in_chans, h, w), opset=args.opset)
    diff = result["max_abs_diff"]
    print(f"wrote {result['path']} (opset {result['opset']}); onnxruntime vs PyTorch max abs diff {diff:.2e}")
    return 0


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
    p = sub.add_parser("convert", help="official checkpoint -> clean safetensors that timm loads")
    p.add_argument("checkpoint", help="official file (.pth training state or state dict, or .safetensors)")
    p.add_argument("out", help="output .safetensors file (written atomically)")
    p.add_argument("--model", required=True, help="registered model name, e.g. acmix_swin_tiny_patch4_window7_224")
    p.set_defaults(func=run_convert)

    e = sub.add_parser("export", help="ONNX export checked in onnxruntime (CPU)")
    e.add_argument("model", help="registered model name, e.g. acmix_resnet26")
    e.add_argument("out", help="output .onnx file")
    e.add_argument("--weights", help="checkpoint to load first (official file or safetensors)")
    e.add_argument("--size", type=_size, default=(224, 224), help="input SIZE or HxW (default 224)")
    e.add_argument("--batch", type=int, default=1, help="batch size of the traced input (default 1)")
    e.add_argument("--num-classes", type=int, default=None, help="override the classifier size")
    e.add_argument("--opset", type=int, default=18, help="ONNX opset, >= 17 (default 18)")
    e.set_defaults(func=run_export)

    m = sub.add_parser("models", help="the paper's models and baselines with their table numbers")
    m.add_argument("pattern", nargs="?", default="", help="substring filter")
    m.set_defaults(func=run_models)
