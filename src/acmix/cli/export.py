"""``acmix export``: ONNX export checked in onnxruntime.

``acmix export NAME OUT.onnx`` writes an ONNX graph (opset 18, PyTorch's dynamo exporter; the local attention
runs its ``reference`` backend while tracing) whose batch axis is dynamic (``--static-batch`` fixes it;
``--dynamic-size`` frees height and width too) and checks it in onnxruntime on the CPU against PyTorch at two batch
sizes (and two other non-square sizes).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..ops import use_backend
from .main import UsageError, add_command


def check_shapes(
    input_size: tuple[int, int, int, int], dynamic_batch: bool, dynamic_size: bool
) -> list[tuple[int, ...]]:
    """The input shapes an exported graph is checked at: the traced one, another batch size (dynamic batch) and two
    other non-square sizes (dynamic size; +32 / +96 pixels, so a model that needs multiples of 32 accepts them)."""
    b, c, h, w = input_size
    shapes: list[tuple[int, ...]] = [tuple(input_size)]
    if dynamic_batch:
        shapes.append((b + 2, c, h, w))
    if dynamic_size:
        for dh, dw in ((32, 96), (96, 32), (64, 128), (128, 64)):
            if h + dh != w + dw and len(shapes) < (4 if dynamic_batch else 3):
                shapes.append((1 if dynamic_batch else b, c, h + dh, w + dw))
    return shapes


def export_onnx(
    model: nn.Module,
    out: str | os.PathLike[str],
    input_size: tuple[int, int, int, int] = (1, 3, 224, 224),
    *,
    opset: int = 18,
    check: bool = True,
    atol: float = 1e-4,
    dynamic_batch: bool = True,
    dynamic_size: bool = False,
) -> dict[str, Any]:
    """Export ``model`` (eval mode) to ONNX and, with ``check``, compare onnxruntime (CPU) with PyTorch.

    Args:
        model: any acmix/timm model.
        out: the ``.onnx`` file (written atomically).
        input_size: (B, C, H, W) of the traced input (with a dynamic batch, B = 1 traces a batch of 2:
            ``torch.export`` fixes axes of size 1).
        opset: ONNX opset (>= 17).
        check: run the graph in onnxruntime at every shape of :func:`check_shapes` (the traced one, another batch
            size, two other non-square sizes) and raise ValueError where it differs from PyTorch by more than
            ``atol``.
        dynamic_batch: the input's batch axis is dynamic (the default, as timm's ``onnx_export``); False fixes it.
        dynamic_size: height and width are dynamic too: any size the model accepts (e.g. multiples of 32).

    Returns:
        ``{"path", "opset", "input_shape", "max_abs_diff", "checked"}``: the graph's actual opset (the exporter may
        raise a request it cannot convert down to), its input shape (a name for each dynamic axis),
        ``max_abs_diff`` over every checked shape (None without ``check``) and the checked shapes.

    Raises:
        ValueError: the exporter fixed an axis that was asked to be dynamic (the model branches on it), or
            onnxruntime and PyTorch disagree.
    """
    if opset < 17:
        raise ValueError(f"opset must be >= 17, got {opset}")
    out_path = Path(out)
    model = model.eval()
    gen = torch.Generator().manual_seed(0)
    if dynamic_batch and input_size[0] == 1:  # torch.export fixes axes of size 1: trace a batch of 2
        input_size = (2, *input_size[1:])
    x = torch.randn(*input_size, generator=gen)
    axes = ([0] if dynamic_batch else []) + ([2, 3] if dynamic_size else [])
    _write_onnx(model, x, out_path, opset, axes)
    actual, shape = _graph_input(out_path, axes, model)
    diff, checked = None, check_shapes(tuple(input_size), dynamic_batch, dynamic_size)  # type: ignore[arg-type]
    if check:
        diff = _max_diff_in_onnxruntime(
            model, out_path, [x, *(torch.randn(*s, generator=gen) for s in checked[1:])], atol
        )
    return {"path": str(out_path), "opset": actual, "input_shape": shape, "max_abs_diff": diff, "checked": checked}


def _write_onnx(model: nn.Module, x: torch.Tensor, out_path: Path, opset: int, axes: list[int]) -> None:
    """torch.onnx.export (dynamo) of ``model`` at ``x``, ``axes`` of the input dynamic, written atomically."""
    from ..bench.report import atomic_write

    dynamic_shapes = {"x": {a: torch.export.Dim.AUTO for a in axes}} if axes else None

    def export(tmp: Path) -> None:
        with use_backend(attention="reference"), torch.no_grad():
            torch.onnx.export(
                model,
                (x,),
                str(tmp),
                opset_version=opset,
                dynamo=True,
                input_names=["image"],
                output_names=["logits"],
                dynamic_shapes=dynamic_shapes,
                external_data=False,
                verbose=False,
            )

    atomic_write(out_path, export)


def _graph_input(out_path: Path, axes: list[int], model: nn.Module) -> tuple[int, list[Any]]:
    """The written graph's opset and input shape (a name for each dynamic axis); ValueError where the exporter fixed
    one of ``axes``."""
    import onnx

    graph = onnx.load(str(out_path), load_external_data=False)
    actual = max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx"))
    dims = graph.graph.input[0].type.tensor_type.shape.dim
    shape = [d.dim_param or d.dim_value for d in dims]
    fixed = [{0: "batch", 2: "height", 3: "width"}[a] for a in axes if not isinstance(shape[a], str)]
    if fixed:
        raise ValueError(
            f"the exported graph fixed the {', '.join(fixed)} axis ({shape}): {type(model).__name__} branches on it "
            "while tracing; export without --dynamic-size or at the size you will run"
        )
    return actual, shape


def _max_diff_in_onnxruntime(model: nn.Module, out_path: Path, inputs: list[torch.Tensor], atol: float) -> float:
    """Largest |onnxruntime - PyTorch| over ``inputs``; ValueError at the first input where it exceeds ``atol``."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(out_path), providers=["CPUExecutionProvider"])
    diff = 0.0
    for i, xi in enumerate(inputs):
        try:
            outputs = session.run(None, {session.get_inputs()[0].name: xi.numpy()})
        except Exception as exc:  # onnxruntime's own error types; the graph fixed a size it was traced at
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            hint = (
                "; trace at a larger input (--size): torch.export fixes every axis of size 1, such as a feature map "
                "the traced input shrinks to 1 pixel"
                if i
                else ""
            )
            raise ValueError(f"the ONNX graph does not run at input {tuple(xi.shape)}: {first[:300]}{hint}") from exc
        got = torch.from_numpy(outputs[0])
        with torch.no_grad():
            ref = model(xi)
        d = float((got - ref).abs().max())
        if d > atol:
            raise ValueError(
                f"onnxruntime differs from PyTorch by {d:.3g} > {atol:g} at input {tuple(xi.shape)} ({out_path})"
            )
        diff = max(diff, d)
    return diff


# ---------------------------------------------------------------------------------------------- command
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
    result = export_onnx(
        model,
        args.out,
        (args.batch, in_chans, h, w),
        opset=args.opset,
        dynamic_batch=not args.static_batch,
        dynamic_size=args.dynamic_size,
    )
    shape = "x".join(str(d) for d in result["input_shape"])
    checked = ", ".join("x".join(map(str, s)) for s in result["checked"])
    print(f"wrote {result['path']} (opset {result['opset']}, input {shape})")
    print(f"onnxruntime vs PyTorch max abs diff {result['max_abs_diff']:.2e} at inputs {checked}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    e = add_command(sub, "export", "ONNX export checked in onnxruntime (CPU)", __doc__, run_export)
    e.add_argument("model", help="registered model name, e.g. acmix_resnet26")
    e.add_argument("out", help="output .onnx file")
    e.add_argument("--weights", help="checkpoint to load first (official file or safetensors)")
    e.add_argument("--size", type=_size, default=(224, 224), help="input SIZE or HxW (default 224)")
    e.add_argument("--batch", type=int, default=1, help="batch size of the traced input (default 1)")
    e.add_argument("--static-batch", action="store_true", help="fix the batch axis (default: dynamic)")
    e.add_argument(
        "--dynamic-size", action="store_true", help="height and width dynamic too (any size the model accepts)"
    )
    e.add_argument("--num-classes", type=int, default=None, help="override the classifier size")
    e.add_argument("--opset", type=int, default=18, help="ONNX opset, >= 17 (default 18)")
