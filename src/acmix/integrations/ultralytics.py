"""ACmix in ultralytics YOLO models (optional extra: ``pip install 'acmix[yolo]'``).

Importing this module makes ``ACmix`` usable in an ultralytics model YAML, in two forms::

    - [-1, 1, ACmix, []]                                    # keeps the incoming channels: ACmix(c1, c1)
    - [-1, 1, ACmix, [c2, kernel_att, head, kernel_conv, stride]]  # the official argument order after the input
                                                            # channels (trailing ones optional); c2 is scaled by the
                                                            # model's width multiple exactly as a Conv's

Both build :class:`acmix.ACmix` (the official defaults: kernel_att 7, head 4, kernel_conv 3, stride 1), so the model
trains, fuses (``fuse()`` folds the BatchNorm of ultralytics' own blocks and leaves ACmix as it is), validates in
half precision and exports to ONNX. Example YAMLs: :func:`model_yaml` (``yolov8n-acmix.yaml``, ``yolo11n-acmix.yaml``).

How the registration works: ultralytics builds a model from its YAML with ``ultralytics.nn.tasks.parse_model``, which
looks module names up in its own namespace and scales the out channels only for a fixed set of its own modules (a set
local to the function, which no outside code can extend). :func:`register` therefore wraps ``parse_model``: each ACmix
row is handed to it as a placeholder it knows, which does the channel bookkeeping (``Conv [c2, 1, stride]`` for the
explicit form, so c2 is scaled like a Conv's; ``nn.BatchNorm2d`` for ``[]``, which keeps the channels), and the
placeholder is then replaced by the ACmix layer with the placeholder's input and output channels and its layer
bookkeeping (``i``, ``f``, ``type``, ``np``). The layer table ultralytics prints shows the placeholders; a line after it
lists the ACmix layers. The ``[]`` form takes its input from the previous layer (``from`` = -1).

DDP: ultralytics trains on several GPUs by launching worker processes through a generated script, which rebuilds the
trainer from its class. Train with :class:`ACmixDetectionTrainer` (``YOLO(cfg).train(..., trainer=
ACmixDetectionTrainer)``): the workers import it from this module, which registers ACmix in each of them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.nn as nn

try:
    import ultralytics.nn as _ul_nn
    import ultralytics.nn.tasks as _tasks
    from ultralytics.models.yolo.detect import DetectionTrainer
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        f"acmix.integrations.ultralytics needs ultralytics ({exc}); install it with: pip install 'acmix[yolo]'"
    ) from exc

from ..layers import ACmix

__all__ = ["CFG_DIR", "ACmixDetectionTrainer", "YAML_NAME", "is_registered", "model_yaml", "register"]

logger = logging.getLogger(__name__)

YAML_NAME = "ACmix"
"""The module name in model YAMLs."""
CFG_DIR = Path(__file__).resolve().parent / "cfg"
"""The folder of the example model YAMLs shipped with acmix."""
_MAX_ARGS = 5  # c2, kernel_att, head, kernel_conv, stride


def model_yaml(name: str = "yolov8n-acmix.yaml") -> str:
    """The path of a shipped example YAML (``yolov8n-acmix.yaml`` or ``yolo11n-acmix.yaml``), for ``YOLO(path)``."""
    path = CFG_DIR / name
    if not path.is_file():
        shipped = ", ".join(sorted(p.name for p in CFG_DIR.glob("*.yaml")))
        raise ValueError(f"no shipped model YAML {name!r}; shipped: {shipped}")
    return str(path)


def _rows(d: dict[str, Any]) -> list[list[Any]]:
    return [row for part in ("backbone", "head") for row in d.get(part) or []]


def _rewrite(d: dict[str, Any]) -> tuple[dict[str, Any], dict[int, tuple[int, ...]]]:
    """A copy of the model dict with each ACmix row as its placeholder, and {layer index: ACmix args after c2}."""
    new = dict(d)
    for part in ("backbone", "head"):
        if d.get(part) is not None:
            new[part] = [list(row) for row in d[part]]
    slots: dict[int, tuple[int, ...]] = {}
    for i, row in enumerate(_rows(new)):
        if len(row) != 4 or row[2] != YAML_NAME:
            continue
        f, _, _, args = row
        args = list(args or [])
        where = f"model YAML layer {i} {row!r}"
        if not isinstance(f, int):
            raise ValueError(f"{where}: ACmix takes one input, so 'from' must be one index, got {f!r}")
        if len(args) > _MAX_ARGS or any(not isinstance(a, int) or isinstance(a, bool) for a in args):
            raise ValueError(
                f"{where}: ACmix args must be [] or up to 5 ints [c2, kernel_att, head, kernel_conv, stride], "
                f"got {args!r}"
            )
        if not args:
            if f != -1:
                raise ValueError(
                    f"{where}: [] (keep the channels) needs 'from' = -1; give the out channels instead: "
                    f"[{f}, n, ACmix, [c2]]"
                )
            row[2], row[3] = "nn.BatchNorm2d", []
        else:
            row[2], row[3] = "Conv", [args[0], 1, args[4] if len(args) > 4 else 1]
        slots[i] = tuple(args[1:])
    return new, slots


def _channels(holder: nn.Module) -> tuple[int, int]:
    if isinstance(holder, nn.BatchNorm2d):
        return holder.num_features, holder.num_features
    conv = holder.conv
    assert isinstance(conv, nn.Conv2d)
    return conv.in_channels, conv.out_channels


def _acmix_layer(holder: nn.Module, official_args: tuple[int, ...]) -> nn.Module:
    """The ACmix layer (or Sequential of them, for n > 1 repeats) in place of a placeholder, with its bookkeeping."""
    parts = list(holder) if isinstance(holder, nn.Sequential) else [holder]
    built = [ACmix(*_channels(p), *official_args) for p in parts]  # official order: c1, c2, kernel_att, head, ...
    layer: nn.Module = nn.Sequential(*built) if len(built) > 1 else built[0]
    # ultralytics' layer bookkeeping (setattr: ``type`` shadows nn.Module.type, as parse_model does)
    for name, value in (
        ("i", holder.i),
        ("f", holder.f),
        ("type", "acmix.ACmix"),
        ("np", sum(p.numel() for p in layer.parameters())),
    ):
        setattr(layer, name, value)
    return layer


def _wrap(parse_model: Callable[..., Any]) -> Callable[..., Any]:
    def parse_model_with_acmix(d: dict[str, Any], ch: Any, verbose: bool = True) -> Any:
        new, slots = _rewrite(d)
        model, save = parse_model(new, ch, verbose)
        for i, official_args in slots.items():
            model[i] = _acmix_layer(model[i], official_args)
        if slots and verbose:
            described = "; ".join(f"{i}: {model[i].np:,} params" for i in slots)
            _tasks.LOGGER.info(f"ACmix layers (shown above as their channel placeholders): {described}")
        return model, save

    parse_model_with_acmix.__wrapped__ = parse_model  # type: ignore[attr-defined]
    parse_model_with_acmix.__doc__ = parse_model.__doc__
    return parse_model_with_acmix


def is_registered() -> bool:
    """Whether ultralytics' ``parse_model`` builds ACmix rows (true once this module is imported)."""
    return hasattr(_tasks.parse_model, "__wrapped__") and _tasks.parse_model.__name__ == "parse_model_with_acmix"


def register() -> None:
    """Make ``ACmix`` buildable from ultralytics model YAMLs (idempotent; done when this module is imported)."""
    if is_registered():
        return
    wrapped = _wrap(_tasks.parse_model)
    _tasks.parse_model = wrapped
    _ul_nn.parse_model = wrapped  # the package re-exports it
    logger.debug("registered ACmix in ultralytics.nn.tasks.parse_model")


class ACmixDetectionTrainer(DetectionTrainer):
    """ultralytics' ``DetectionTrainer`` for models with ACmix layers.

    It trains exactly as ``DetectionTrainer`` does; it lives here so that every process that rebuilds the trainer from
    its class (the DDP workers ultralytics launches through a generated script) imports this module and so has ACmix
    registered before it builds the model from its YAML. Use ``YOLO(cfg).train(..., trainer=ACmixDetectionTrainer)``.
    """


register()
