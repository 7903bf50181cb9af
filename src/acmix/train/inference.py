"""Loading a trained model back: for ``acmix eval``, ``acmix predict`` and ``acmix inspect``.

A checkpoint argument may be a run folder (its ``best`` checkpoint, else ``last``), a ``*.state.pt`` file or a
``*.safetensors`` file (with its sibling state file, or with ``model_name`` given for bare weights). Official
and timm checkpoints (``.pth``/``.pth.tar``/``.bin``) load through :func:`acmix.models.load_official_checkpoint`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from . import checkpoint as ckpt
from .trainer import create_model

_logger = logging.getLogger(__name__)

__all__ = ["LoadedModel", "acmix_alpha_beta", "load_model", "predict_images"]


@dataclass
class LoadedModel:
    model: nn.Module
    model_name: str
    source: Path
    classes: list[str]
    data: dict[str, Any]  # in_chans, input_size, mean, std, crop_pct, interpolation
    state: dict[str, Any] = field(default_factory=dict)


def _resolve(path: Path, use_ema: bool) -> tuple[Path | None, Path | None]:
    """(state file or None, weights file or None)."""
    if path.is_dir():
        for kind in ("best", "last"):
            sf = path / f"{kind}.state.pt"
            if sf.is_file():
                return sf, None
        raise FileNotFoundError(f"{path}: no best.state.pt or last.state.pt in this run folder")
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.name.endswith(".state.pt"):
        return path, None
    if path.suffix == ".safetensors":
        stem = path.name[: -len(".safetensors")]
        base = stem.removesuffix(".ema")
        sf = path.with_name(base + ".state.pt")
        return (sf if sf.is_file() else None), path
    return None, path


def _data_meta_from_model(model: nn.Module) -> dict[str, Any]:
    from timm.data import resolve_data_config

    dc = resolve_data_config({}, model=model)
    return dict(
        in_chans=int(dc["input_size"][0]),
        input_size=int(dc["input_size"][-1]),
        mean=list(dc["mean"]),
        std=list(dc["std"]),
        crop_pct=float(dc.get("crop_pct", 0.875)),
        interpolation=str(dc.get("interpolation", "bilinear")),
    )


def load_model(
    checkpoint: str | Path | None,
    *,
    model_name: str | None = None,
    num_classes: int | None = None,
    use_ema: bool = False,
    strict: bool = True,
    device: torch.device | str = "cpu",
) -> LoadedModel:
    """Build the model a checkpoint belongs to and load its weights (eval mode, on ``device``).

    Args:
        checkpoint: run folder / state file / safetensors / official file; None with ``model_name`` builds a
            freshly initialised (or timm-pretrained) model.
        model_name: needed for bare weights without a state file; overrides nothing when a state file exists.
        use_ema: load the EMA weights of an acmix checkpoint.
    """
    path = Path(checkpoint) if checkpoint is not None else None
    state_file, weights = (None, None) if path is None else _resolve(path, use_ema)
    if state_file is not None:
        if weights is None:  # the state file names its weights: read the pair consistently (a run may be writing)
            key = "ema_weights" if use_ema else "weights"
            if use_ema and "ema_weights" not in ckpt.load_state(state_file):
                raise ValueError(f"{state_file}: this run has no EMA weights (trained without --model-ema)")
            state, weights, sd = ckpt.read_checkpoint_consistently(state_file, key)
        else:
            state, sd = ckpt.load_state(state_file), ckpt.read_weights(weights)
        if "model_name" not in state:
            raise ckpt.CheckpointError(f"{state_file}: no model name in this state file; pass its weights and --model")
        name = str(state["model_name"])
        kwargs = dict(state.get("model_kwargs") or {})
        kwargs["pretrained"] = False
        model = create_model(name, **kwargs)
        ckpt.apply_weights(model, sd, weights, strict=strict)
        data = dict(state.get("data", {}))
        classes = list(data.get("classes", [])) or [str(i) for i in range(int(state.get("num_classes", 0)))]
        return LoadedModel(model.eval().to(device), name, weights, classes, data, state)
    if model_name is None:
        raise ValueError(f"{path}: no acmix state file next to it; pass --model NAME to say which model it is for")
    kw: dict[str, Any] = {}
    if num_classes is not None:
        kw["num_classes"] = num_classes
    model = create_model(model_name, **kw)
    if path is not None:
        assert weights is not None
        _load_foreign(model, weights, strict=strict)
    data = _data_meta_from_model(model)
    n = int(getattr(model, "num_classes", 0) or 0)
    return LoadedModel(model.eval().to(device), model_name, path or Path(model_name), [str(i) for i in range(n)], data)


def _load_foreign(model: nn.Module, path: Path, *, strict: bool) -> None:
    if path.suffix == ".safetensors":
        try:
            ckpt.load_weights(model, path, strict=strict)
            return
        except ckpt.CheckpointError:
            pass  # maybe official key names: try the model issue's loader below
    from .. import models as acmix_models

    loader = getattr(acmix_models, "load_official_checkpoint", None)
    if loader is None:
        raise ValueError(f"{path}: no acmix state file and no official-checkpoint loader available")
    loader(model, path, strict=strict)


def _pil_to_tensor(img: Any, data: dict[str, Any]) -> torch.Tensor:
    from .data import data_eval_transform

    return data_eval_transform(data, default_crop_pct=1.0)(img)


def load_image(path: str | Path, data: dict[str, Any]) -> torch.Tensor:
    """One image file -> (C, H, W) tensor with the checkpoint's eval transform (digits: 8 x 8 grey, ink bright)."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"image not found: {p}")
    from .data import image_mode

    mode = image_mode(int(data.get("in_chans", 3)))
    try:
        with Image.open(p) as im:
            im.load()
            img = im.convert(mode)
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"cannot read image {p}: {exc}") from None
    return _pil_to_tensor(img, data)


@torch.no_grad()
def predict_images(loaded: LoadedModel, paths: list[str], topk: int = 5) -> list[list[tuple[str, float]]]:
    """Top-k (class name, probability) per image, most likely first."""
    device = next(loaded.model.parameters()).device
    x = torch.stack([load_image(p, loaded.data) for p in paths]).to(device)  # (N, C, H, W)
    probs = loaded.model(x).float().softmax(dim=1)  # (N, classes)
    k = min(topk, probs.shape[1])
    val, idx = probs.topk(k, dim=1)
    names = loaded.classes
    out = []
    for v_row, i_row in zip(val.tolist(), idx.tolist()):
        out.append([(names[i] if i < len(names) else str(i), float(v)) for v, i in zip(v_row, i_row)])
    return out


def acmix_alpha_beta(model: nn.Module) -> list[dict[str, Any]]:
    """alpha and beta of every ACmix layer in module (depth) order: ``[{"layer", "alpha", "beta"}, ...]``.

    Finds modules holding an ``alpha`` and a ``beta`` tensor (parameters, or buffers for fixed mixes); these are
    the paper's attention/convolution weights (Eq. 13: out = alpha * F_att + beta * F_conv).
    """
    rows = []
    for name, mod in model.named_modules():
        a, b = getattr(mod, "alpha", None), getattr(mod, "beta", None)
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            rows.append(
                {
                    "layer": name or "<root>",
                    "alpha": float(a.detach().float().mean()),
                    "beta": float(b.detach().float().mean()),
                }
            )
    return rows


def alpha_beta_from_state_dict(sd: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    """Like :func:`acmix_alpha_beta` from raw weights (keys ``<layer>.alpha`` / ``<layer>.beta``), natural order.

    Without the model, depth order is approximated by sorting layer names with numbers compared as numbers
    (``stages.2`` before ``stages.10``).
    """
    import re

    def natural(key: str) -> list[Any]:
        return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]

    rows = []
    for k in sorted(sd, key=natural):
        v = sd[k]
        if k.endswith(".alpha") or k == "alpha":
            layer = k[: -len(".alpha")] if k != "alpha" else "<root>"
            bkey = f"{layer}.beta" if k != "alpha" else "beta"
            if bkey in sd:
                rows.append({"layer": layer, "alpha": float(v.float().mean()), "beta": float(sd[bkey].float().mean())})
    return rows
