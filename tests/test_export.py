"""Deployment: torch.compile, torch.jit.trace, torch.export, ONNX (onnxruntime, CPU), and the convert/export CLI.

Default tests use reduced-depth variants (the same classes, blocks and ops) on small inputs; every registered
model, inductor and full-size ONNX exports of the named models are behind ``slow``.
"""

from __future__ import annotations

import pytest
import timm
import torch

import acmix  # noqa: F401
from _official_models import OfficialACmixResNet, perturb_
from acmix.cli.export import export_onnx
from acmix.cli.main import main
from acmix.models import PAPER_TABLE
from acmix.ops import use_backend

SMALL_SWIN = dict(embed_dim=24, depths=(2, 2), num_heads=(1, 2))  # two stages: merging, (S)W-MSA, conv path
#: (name, reduced-depth kwargs, input side)
REDUCED = [
    ("acmix_resnet26", dict(layers=(1, 1, 1, 1)), 32),
    ("resnet26_san", dict(layers=(1, 1, 1, 1)), 32),
    ("acmix_swin_tiny_patch4_window7_224", SMALL_SWIN, 56),
    ("swin_tiny_patch4_window7_224", dict(SMALL_SWIN, strict_img_size=False), 56),
]


def _build(name: str, kwargs: dict, side: int) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, **kwargs).eval()
    return model, torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    "name,kwargs,side",
    # ResNet: ~10x slower to trace, every ACmix layer breaks the graph at the backend dispatch's logging call
    [pytest.param(*REDUCED[0], marks=pytest.mark.slow, id=REDUCED[0][0]), pytest.param(*REDUCED[2], id=REDUCED[2][0])],
)
def test_torch_compile_eager_backend(name, kwargs, side):
    torch._dynamo.reset()
    model, x = _build(name, kwargs, side)
    compiled = torch.compile(model, backend="eager", fullgraph=False)
    with use_backend(attention="reference"), torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,kwargs,side", REDUCED, ids=[r[0] for r in REDUCED])
def test_jit_trace(name, kwargs, side):
    model, x = _build(name, kwargs, side)
    with use_backend(attention="reference"), torch.no_grad():  # the readable backend traces everywhere
        traced = torch.jit.trace(model, (x,), check_trace=False)
        torch.testing.assert_close(traced(x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,kwargs,side", REDUCED[::2], ids=[r[0] for r in REDUCED[::2]])
def test_torch_export(name, kwargs, side):
    model, x = _build(name, kwargs, side)
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,kwargs,side", REDUCED[::2], ids=[r[0] for r in REDUCED[::2]])
def test_onnx_in_onnxruntime(tmp_path, name, kwargs, side):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model, _ = _build(name, kwargs, side)
    result = export_onnx(model, tmp_path / "m.onnx", (1, 3, side, side), opset=18)
    assert result["opset"] >= 17 and result["max_abs_diff"] <= 1e-4
    assert not list(tmp_path.glob(".*.tmp"))


# ---------------------------------------------------------------------------------------------- CLI
def test_convert_official_resnet_then_timms_standard_path(tmp_path, capsys):
    torch.manual_seed(3)
    official = perturb_(OfficialACmixResNet((1, 2, 4, 1))).eval()
    for name, module in official.named_modules():
        if name.endswith("bn3"):
            module.weight.data.mul_(0.2)
    torch.save({"state_dict": {f"module.{k}": v for k, v in official.state_dict().items()}}, tmp_path / "o.pth")
    out = tmp_path / "clean.safetensors"
    assert main(["convert", str(tmp_path / "o.pth"), str(out), "--model", "acmix_resnet26"]) == 0
    printed = capsys.readouterr().out
    assert "renamed from official names" in printed and "wrote" in printed
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        keys = set(f.keys())
        assert f.metadata()["acmix_model"] == "acmix_resnet26"
    assert "layer1.0.conv2.qkv.weight" in keys and not any(".conv2.conv1." in k for k in keys)
    model = timm.create_model("acmix_resnet26", pretrained=True, pretrained_cfg_overlay=dict(file=str(out))).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), official(x), atol=1e-4, rtol=0)


def test_convert_keeps_the_checkpoint_head_size(tmp_path):
    official = OfficialACmixResNet((1, 2, 4, 1), num_classes=10)
    torch.save({"model": official.state_dict(), "epoch": 5}, tmp_path / "r.pth")
    out = tmp_path / "r.safetensors"
    assert main(["convert", str(tmp_path / "r.pth"), str(out), "--model", "acmix_resnet26"]) == 0
    model = timm.create_model(
        "acmix_resnet26", pretrained=True, pretrained_cfg_overlay=dict(file=str(out)), num_classes=10
    )
    torch.testing.assert_close(model.fc.weight, official.fc.weight)


def test_convert_and_export_errors(tmp_path, capsys):
    (tmp_path / "junk.pth").write_bytes(b"\x80\x02junk" * 5)
    assert (
        main(["convert", str(tmp_path / "junk.pth"), str(tmp_path / "o.safetensors"), "--model", "acmix_resnet26"]) == 2
    )
    assert main(["convert", str(tmp_path / "junk.pth"), str(tmp_path / "o.pt"), "--model", "acmix_resnet26"]) == 2
    assert (
        main(["convert", str(tmp_path / "none.pth"), str(tmp_path / "o.safetensors"), "--model", "acmix_resnet26"]) == 2
    )
    assert main(["export", "no_such_model", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith("acmix ") for line in err)
    assert "junk.pth" in err[0] and ".safetensors" in err[1] and "none.pth" in err[2] and "no_such_model" in err[3]
    assert not (tmp_path / "o.safetensors").exists()


def test_models_command(capsys):
    assert main(["models", "swin"]) == 0
    out = capsys.readouterr().out
    assert "acmix_swin_tiny_patch4_window7_224" in out and "acmix_resnet26" not in out


# ---------------------------------------------------------------------------------------------- slow
_ALL = [r.name for r in PAPER_TABLE if timm.is_model(r.name)] + [
    r.baseline for r in PAPER_TABLE if timm.is_model(r.baseline)
]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["eager", "inductor"])
@pytest.mark.parametrize("name", _ALL)
def test_torch_compile_every_model(name, backend):
    torch._dynamo.reset()
    kwargs = {"strict_img_size": False} if name.startswith("swin_") else {}
    model = timm.create_model(name, **kwargs).eval()
    x = torch.randn(1, 3, 64, 64)
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["acmix_resnet26", "acmix_swin_tiny_patch4_window7_224"])
def test_onnx_cli_full_size(tmp_path, name, capsys):
    pytest.importorskip("onnxruntime")
    assert main(["export", name, str(tmp_path / "m.onnx"), "--size", "224"]) == 0
    assert "max abs diff" in capsys.readouterr().out


def test_a_graph_that_fixed_a_size_is_one_line_naming_the_remedy(tmp_path, monkeypatch):
    """A graph traced where a feature map is 1 pixel (torch.export fixes that axis; acmix_resnet38 at 32 x 64) fails
    in onnxruntime at other sizes: one line naming the input and the remedy, not onnxruntime's multi-line error."""
    ort = pytest.importorskip("onnxruntime")
    from acmix.cli.export import _max_diff_in_onnxruntime

    class FixedSizeSession:
        def __init__(self, *args, **kwargs):
            pass

        def get_inputs(self):
            return [type("Input", (), {"name": "x"})()]

        def run(self, outputs, feed):
            if feed["x"].shape != (1, 2):
                raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : Reshape node\nInput shape:{1,2,2,5}")
            return [feed["x"] * 2]

    monkeypatch.setattr(ort, "InferenceSession", FixedSizeSession)
    inputs = [torch.ones(1, 2), torch.ones(2, 2)]
    with pytest.raises(ValueError) as info:
        _max_diff_in_onnxruntime(lambda x: 2 * x, tmp_path / "m.onnx", inputs, atol=1e-4)
    msg = str(info.value)
    assert "\n" not in msg and "does not run at input (2, 2)" in msg and "Reshape node" in msg and "--size" in msg
