"""The contract of every registered model: where a timm model goes, an acmix model goes.

Parametrised over ``timm.list_models("acmix*")`` plus every baseline acmix registers (``ACMIX_ENTRYPOINTS``: the
SAN, PVT and ResNet-SAN baselines), so a model is checked the moment it is registered. For each model:

* ``cfg``: its pretrained_cfg is complete and true: ``first_conv`` / ``classifier`` name those modules,
  ``pool_size`` is the unpooled feature size at ``input_size``, mean/std fit the input channels, and timm's data
  pipeline (``resolve_model_data_config`` + ``create_transform``) produces the input the model takes;
* ``features``: ``features_only`` gives at least 3 levels whose channels and reductions match the tensors, and the
  ``torch.fx`` route (``feature_cls="fx"``, torchvision's ``create_feature_extractor``) gives the same tensors;
* ``script``: ``torch.jit.script(model)`` gives the eager output;
* ``fx``: ``torch.fx.symbolic_trace(model)`` gives the eager output and gradients, and the traced graph scripts;
* ``export`` / ``onnx`` (slow for most): ``torch.export`` and the dynamic-axis ONNX file of ``acmix export``.

Float32, tolerance 1e-5. The default suite runs small inputs (32 x 64, acmix_micro 8 x 12) on the smallest model of
each family and its baselines; the deeper variants (``small``, ``38``/``15``, ``50``/``19``) and the exports of every
model but acmix_micro run behind ``slow`` (``make test-slow``).
"""

from __future__ import annotations

import copy
import re

import pytest
import timm
import torch
import torch.fx
import torch.nn as nn

import acmix  # noqa: F401  (registers the models)
from acmix.models import ACMIX_ENTRYPOINTS

MODELS = sorted(set(timm.list_models("acmix*")) | set(ACMIX_ENTRYPOINTS))
#: the heavy variants run behind ``slow`` (the default suite stays within its budget)
HEAVY = re.compile(r"small|50|38|19|15")
ATOL = RTOL = 1e-5


def _params(names: list[str]) -> list:
    return [pytest.param(n, id=n, marks=pytest.mark.slow if HEAVY.search(n) else ()) for n in names]


_CACHE: dict[str, nn.Module] = {}


def built(name: str) -> nn.Module:
    """A copy of the default model (seed 0) in eval mode, built once per worker."""
    if name not in _CACHE:
        torch.manual_seed(0)
        _CACHE[name] = timm.create_model(name).eval()
    return copy.deepcopy(_CACHE[name])


def small_input(model: nn.Module, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """A small non-square input the model accepts: 32 x 64 (8 x 12 for 8 x 8 models)."""
    c, h, _ = model.pretrained_cfg["input_size"]
    size = (32, 64) if h >= 32 else (h, h + h // 2)
    return torch.randn(batch, c, *size, generator=torch.Generator().manual_seed(seed))


def _close(got: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=RTOL, msg=lambda m: f"{what}: {m}")


def test_every_model_is_covered():
    assert len(MODELS) >= 22 and "acmix_micro" in MODELS
    assert {"san10", "pvt_tiny", "resnet26_san", "acmix_swin_tiny_patch4_window7_224"} <= set(MODELS)


# ---------------------------------------------------------------------------------------------- cfg
def _unpooled_size(model: nn.Module, x: torch.Tensor, feats: torch.Tensor) -> tuple[int, int]:
    """(h, w) of forward_features' output: NCHW, NHWC (Swin), or tokens (PVT: the map behind them)."""
    if feats.dim() == 4:
        nhwc = getattr(model, "output_fmt", "NCHW") == "NHWC"
        return (feats.shape[1], feats.shape[2]) if nhwc else (feats.shape[2], feats.shape[3])
    last = model.forward_intermediates(x, indices=1, intermediates_only=True)[-1]  # (B, C, h, w)
    assert feats.shape[1] - model.num_prefix_tokens == last.shape[-2] * last.shape[-1], tuple(feats.shape)
    return last.shape[-2], last.shape[-1]


@pytest.mark.parametrize("name", _params(MODELS))
def test_cfg(name):
    from timm.data import create_transform, resolve_model_data_config

    model = built(name)
    cfg = model.pretrained_cfg
    for key in ("input_size", "pool_size", "crop_pct", "interpolation", "mean", "std", "first_conv", "classifier"):
        assert cfg.get(key) is not None, f"{name}: pretrained_cfg has no {key}"
    c, h, w = cfg["input_size"]
    first = model.get_submodule(cfg["first_conv"])
    assert isinstance(first, nn.Conv2d) and first.in_channels == c == model.in_chans
    head = model.get_submodule(cfg["classifier"])
    assert isinstance(head, nn.Linear) and head.out_features == cfg["num_classes"] == model.num_classes
    assert len(cfg["mean"]) == len(cfg["std"]) == c and 0 < cfg["crop_pct"] <= 1
    # pool_size is what the model really produces at input_size
    x = torch.randn(1, c, h, w)
    with torch.no_grad():
        feats = model.forward_features(x)
        size = _unpooled_size(model, x, feats)
        assert size == tuple(cfg["pool_size"]), f"{name}: pool_size {cfg['pool_size']}, features {size}"
        assert model.forward_head(feats).shape == (1, cfg["num_classes"])
    # timm's data pipeline, configured from the cfg, yields the input the model takes
    from PIL import Image

    data_cfg = resolve_model_data_config(model)
    image = Image.new("L" if c == 1 else "RGB", (2 * w, 2 * h))
    tensor = create_transform(**data_cfg, is_training=False)(image)
    assert tuple(tensor.shape) == (c, h, w)


# ---------------------------------------------------------------------------------------------- features
@pytest.mark.parametrize("name", _params(MODELS))
def test_features(name):
    torch.manual_seed(0)
    feats_model = timm.create_model(name, features_only=True).eval()
    info = feats_model.feature_info
    assert len(info.channels()) >= 3, f"{name}: features_only gives {len(info.channels())} levels"
    x = small_input(built(name), batch=1)
    with torch.no_grad():
        feats = feats_model(x)
    assert len(feats) == len(info.channels())
    nhwc = getattr(feats_model, "output_fmt", "NCHW") == "NHWC"
    for f, chs, red in zip(feats, info.channels(), info.reduction()):
        c, hw = (f.shape[-1], tuple(f.shape[1:3])) if nhwc else (f.shape[1], tuple(f.shape[2:]))
        assert c == chs and hw == (x.shape[2] // red, x.shape[3] // red), (name, tuple(f.shape), chs, red)
    # the torch.fx route gives the same tensors (the same weights: both built from seed 0)
    torch.manual_seed(0)
    fx_model = timm.create_model(name, features_only=True, feature_cls="fx").eval()
    with torch.no_grad():
        for got, ref in zip(fx_model(x), feats):
            _close(got, ref, f"{name} fx features")


# ---------------------------------------------------------------------------------------------- TorchScript, FX
@pytest.mark.parametrize("name", _params(MODELS))
def test_script(name):
    model = built(name)
    x = small_input(model)
    scripted = torch.jit.script(model)
    with torch.no_grad():
        _close(scripted(x), model(x), f"{name} scripted")


@pytest.mark.parametrize("name", _params(MODELS))
def test_fx(name):
    model = built(name)
    x = small_input(model)
    traced = torch.fx.symbolic_trace(model)
    # forward and backward through the traced graph (it shares the model's parameters)
    grads = []
    for fn in (model, traced):
        model.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        out = fn(xi)
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        grads.append([xi.grad] + [p.grad for p in model.parameters() if p.requires_grad])
        if fn is model:
            ref = out.detach()
        else:
            _close(out.detach(), ref, f"{name} fx forward")
    assert all(g is not None for g in grads[1])
    for got, want in zip(grads[1], grads[0]):
        _close(got, want, f"{name} fx backward")
    # the traced graph scripts, and gives the eager output
    with torch.no_grad():
        _close(torch.jit.script(traced)(x), ref, f"{name} fx + script")


def test_scripted_and_traced_models_choose_the_backend_at_run_time(monkeypatch):
    """``torch.ops.acmix.*`` dispatch per call, so ``use_backend`` steers a scripted or FX-traced model too."""
    import dataclasses

    from acmix.ops import _dispatch, use_backend

    calls: list[int] = []
    reference = _dispatch.ATTENTION.get("reference")

    def spy(*args):
        calls.append(1)
        return reference.fn(*args)

    monkeypatch.setitem(_dispatch.ATTENTION._backends, "reference", dataclasses.replace(reference, fn=spy))
    model = built("acmix_micro")
    x = small_input(model)
    with torch.no_grad():
        want = model(x)
        for runner in (torch.jit.script(model), torch.fx.symbolic_trace(model)):
            calls.clear()
            with use_backend(attention="reference"):
                _close(runner(x), want, type(runner).__name__)
            assert len(calls) == 2  # acmix_micro's two ACmix layers
            calls.clear()
            with use_backend(attention="offset"):
                _close(runner(x), want, type(runner).__name__)
            assert not calls


# ---------------------------------------------------------------------------------------------- export, ONNX
#: exporting traces every op: acmix_micro runs by default, every other model behind ``slow``
def _export_params(names: list[str]) -> list:
    return [pytest.param(n, id=n, marks=() if n == "acmix_micro" else pytest.mark.slow) for n in names]


@pytest.mark.parametrize("name", _export_params(MODELS))
def test_torch_export(name):
    model = built(name)
    x = small_input(model)
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        _close(exported.module()(x), model(x), f"{name} torch.export")


@pytest.mark.parametrize("name", _export_params(MODELS))
def test_onnx_dynamic_batch_and_size(tmp_path, name):
    """The ONNX file runs at two batch sizes and two other non-square sizes in onnxruntime, as PyTorch does."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from acmix.cli.export import export_onnx

    model = built(name)
    x = small_input(model, batch=1)
    if x.shape[-2] < 64:  # keep every feature map above 1 pixel: torch.export fixes axes of size 1 (1 x 2 at /32)
        x = torch.randn(1, x.shape[1], 64, 96)
    result = export_onnx(model, tmp_path / "m.onnx", tuple(x.shape), dynamic_size=True)
    assert all(isinstance(result["input_shape"][a], str) for a in (0, 2, 3)), result["input_shape"]
    assert len(result["checked"]) == 4 and result["max_abs_diff"] <= 1e-4
