"""acmix.convert_model: ACmix in place of the k x k convolutions of networks the user already has.

Networks converted here: torchvision's resnet18, timm's resnet10t and mobilenetv3_small_050, and a stand-in for an
ultralytics detector built from conv + BN + act blocks with ultralytics' layout and ``fuse()`` (the real ultralytics
models are converted in tests/test_ultralytics.py).
"""

from __future__ import annotations

import io

import pytest
import timm
import torch
import torch.nn as nn
import torchvision
from hypothesis import given
from hypothesis import strategies as st

import acmix
from acmix import ACmix
from acmix.analysis import walk
from acmix.tools import ACmixNormAct, choose_heads, convert_model


def _resnet18() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10)


@pytest.fixture(scope="module")
def resnet18_converted():
    model = _resnet18()
    converted, report = convert_model(model, input_size=32)
    return model, converted, report


# ---------------------------------------------------------------------------------------------- torchvision
def test_resnet18_every_3x3_becomes_acmix_with_its_channels_and_stride(resnet18_converted):
    model, converted, report = resnet18_converted
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    threes = {n for n, m in convs.items() if m.kernel_size == (3, 3)}
    assert {r.name for r in report.replaced} == threes and len(threes) == 16
    for r in report.replaced:
        conv, layer = convs[r.name], converted.get_submodule(r.name)
        assert isinstance(layer, ACmix) and r.kind == "conv"
        assert (layer.dim, layer.dim_out, layer.stride) == (conv.in_channels, conv.out_channels, conv.stride[0])
        assert (layer.num_heads, layer.attn_kernel_size, layer.conv_kernel_size) == (4, 7, 3)
        assert r.params_before == sum(p.numel() for p in conv.parameters())
        assert r.params_after == sum(p.numel() for p in layer.parameters())
        assert r.stage == f"stage{r.name[5]}"
    skipped = {s.name: s.reason for s in report.skipped}
    assert skipped == {
        "conv1": "fewer than min_channels=16 channels",
        "layer2.0.downsample.0": "pointwise (1x1)",
        "layer3.0.downsample.0": "pointwise (1x1)",
        "layer4.0.downsample.0": "pointwise (1x1)",
    }
    # the original is left as it was (inplace=False)
    assert isinstance(model.layer1[0].conv1, nn.Conv2d) and converted is not model


def test_resnet18_report_counts_come_from_the_models(resnet18_converted):
    model, converted, report = resnet18_converted
    assert report.params_before == sum(p.numel() for p in model.parameters())
    assert report.params_after == sum(p.numel() for p in converted.parameters())
    assert report.input_size == (32, 32)
    assert report.macs_before == walk(model, 32).macs and report.macs_after == walk(converted, 32).macs
    before = {m.name: m.cost.macs for m in walk(model, 32).modules}
    for r in report.replaced:
        assert r.macs_before == before[r.name] and r.macs_after is not None and r.macs_after > 0
    text = str(report)
    assert "16 replaced, 4 convolutions kept" in text and "layer4.1.conv2" in text
    assert "kept (pointwise (1x1)): layer2.0.downsample.0" in text and "MACs at 32x32" in text
    d = report.to_dict()
    assert len(d["replaced"]) == 16 and d["replaced"][0]["name"] == "layer1.0.conv1"


@pytest.mark.parametrize("side", [32, 33])
def test_resnet18_converted_keeps_the_output_shape(resnet18_converted, side):
    model, converted, _ = resnet18_converted
    x = torch.randn(2, 3, side, side)
    with torch.no_grad():
        out = converted.eval()(x)
    assert out.shape == model.eval()(x).shape == (2, 10) and torch.isfinite(out).all()


def test_resnet18_converted_trains():
    converted, _ = convert_model(_resnet18(), include="layer3.*")
    converted.train()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    opt = torch.optim.AdamW(converted.parameters(), lr=1e-3)
    acmix_params = {n: p.detach().clone() for n, p in converted.named_parameters() if n.startswith("layer3")}
    losses = []
    for _ in range(5):
        loss = nn.functional.cross_entropy(converted(x), y)
        opt.zero_grad()
        loss.backward()
        for n, p in converted.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), n
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    changed = [n for n, p in converted.named_parameters() if n in acmix_params and not torch.equal(p, acmix_params[n])]
    assert {n.rsplit(".", 1)[-1] for n in changed} >= {"alpha", "beta", "shift_weight", "weight"}


def test_state_dict_round_trip_and_pickled_model(tmp_path):
    converted, _ = convert_model(_resnet18(), stages=[4])
    with torch.no_grad():
        for p in converted.parameters():
            p.add_(0.01 * torch.randn_like(p))
    torch.save(converted.state_dict(), tmp_path / "ckpt.pth")
    torch.save(converted, tmp_path / "model.pth")
    fresh, _ = convert_model(torchvision.models.resnet18(num_classes=10), stages=[4])
    fresh.load_state_dict(torch.load(tmp_path / "ckpt.pth", weights_only=True))  # strict
    whole = torch.load(tmp_path / "model.pth", weights_only=False)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = converted.eval()(x)
        torch.testing.assert_close(fresh.eval()(x), ref, rtol=0, atol=0)
        torch.testing.assert_close(whole.eval()(x), ref, rtol=0, atol=0)


def test_resnet18_converted_traces_exports_and_runs_in_onnxruntime(tmp_path):
    """torch.jit.trace, torch.export and the TorchScript ONNX exporter (what ultralytics uses), as on the original."""
    ort = pytest.importorskip("onnxruntime")
    converted, report = convert_model(_resnet18(), include="layer4.0.*")  # one strided ACmix on an odd map
    assert [r.stride for r in report.replaced] == [2, 1]
    model, x = converted.eval(), torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        ref = model(x)
        traced = torch.jit.trace(model, (x,), check_trace=False)
        torch.testing.assert_close(traced(x), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.export.export(model, (x,)).module()(x), ref, atol=1e-5, rtol=1e-5)
        buf = io.BytesIO()
        torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=17, input_names=["image"])
    session = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"image": x.numpy()})[0])
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- timm
def test_timm_resnet10t_with_stage_filter():
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=5)
    converted, report = convert_model(model, stages=[3, 4])
    assert report.replaced and all(r.stage in ("stage3", "stage4") for r in report.replaced)
    assert all(isinstance(converted.get_submodule(r.name), ACmix) for r in report.replaced)
    stem = {s.name: s.reason for s in report.skipped if s.name.startswith("conv1")}
    assert stem["conv1.3"] == "not in stages ['stage3', 'stage4']"  # the deep stem's 3x3s: outside the stages
    assert stem["conv1.0"] == "fewer than min_channels=16 channels" or "not in stages" in stem["conv1.0"]
    x = torch.randn(2, 3, 48, 48)
    out = converted(x)
    out.sum().backward()
    assert out.shape == (2, 5) and all(p.grad is not None for p in converted.parameters())


def test_timm_mobilenet_lists_depthwise_convolutions():
    model = timm.create_model("mobilenetv3_small_050", num_classes=3)
    converted, report = convert_model(model)
    reasons = {s.reason for s in report.skipped}
    assert "depthwise" in reasons and "pointwise (1x1)" in reasons
    assert not report.replaced  # every spatial conv of a MobileNet is depthwise; the stem has 3 input channels
    assert any(s.name == "conv_stem" and s.reason.startswith("fewer than") for s in report.skipped)
    with torch.no_grad():
        assert converted.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 3)


# ---------------------------------------------------------------------------------------------- ultralytics layout
class StandInConv(nn.Module):
    """ultralytics' Conv layout: conv (no bias) + BN + act, ``forward_fuse`` for after ``fuse()``."""

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, g: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2, groups=g, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))

    def forward_fuse(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      groups=conv.groups, bias=True)  # fmt: skip
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    with torch.no_grad():
        fused.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
        fused.bias.copy_(bn.bias - bn.running_mean * scale)
    return fused


class StandInDetector(nn.Module):
    """A layer list driven by ``f``/``i`` bookkeeping, with ultralytics' ``fuse()`` logic."""

    def __init__(self) -> None:
        super().__init__()
        layers = [
            StandInConv(3, 16, 3, 2),
            StandInConv(16, 32, 3, 2),
            StandInConv(32, 32, 1),
            StandInConv(32, 32, 3, g=32),
        ]
        for i, m in enumerate(layers):
            m.f, m.i, m.np = -1, i, sum(p.numel() for p in m.parameters())
            m.type = "StandInConv"
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for m in self.model:
            assert m.f == -1 and isinstance(m.i, int)
            x = m(x)
        return x

    def fuse(self) -> StandInDetector:
        for m in self.model.modules():
            if isinstance(m, StandInConv) and hasattr(m, "bn"):
                m.conv = _fold(m.conv, m.bn)
                delattr(m, "bn")
                m.forward = m.forward_fuse
        return self


def test_conv_bn_act_blocks_are_replaced_whole_and_fuse_still_works():
    torch.manual_seed(0)
    model = StandInDetector()
    converted, report = convert_model(model, input_size=32)
    (r,) = report.replaced
    assert (r.name, r.kind, r.stride) == ("model.1", "block", 2)
    block = converted.model[1]
    assert isinstance(block, ACmixNormAct) and isinstance(block.conv, ACmix)
    assert (block.f, block.i) == (-1, 1) and block.np == sum(p.numel() for p in block.parameters())
    assert block.type == "acmix.tools.convert.ACmixNormAct" and isinstance(block.act, nn.SiLU)
    assert int(block.bn.num_batches_tracked) == 0
    reasons = {s.name: s.reason for s in report.skipped}
    assert reasons == {
        "model.0": "fewer than min_channels=16 channels",
        "model.2": "pointwise (1x1)",
        "model.3": "depthwise",
    }
    assert r.macs_before == {m.name: m.cost.macs for m in walk(model, 32).modules}["model.1.conv"]
    converted.train()
    converted(torch.randn(4, 3, 32, 32)).mean().backward()  # BN statistics of the new block
    converted.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = converted(x)
        converted.fuse()
        after = converted(x)
    assert not hasattr(converted.model[0], "bn") and hasattr(converted.model[1], "bn")  # ACmix block left alone
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- rules and options
class Zoo(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.five = nn.Conv2d(16, 18, 5, padding=2)
        self.same = nn.Conv2d(18, 20, 3, padding="same", bias=False)
        self.dilated = nn.Conv2d(20, 20, 3, padding=2, dilation=2)
        self.grouped = nn.Conv2d(20, 20, 3, padding=1, groups=4)
        self.even = nn.Conv2d(20, 20, 2, padding=1)
        self.tall = nn.Conv2d(20, 20, (3, 1), padding=(1, 0))
        self.patch = nn.Conv2d(20, 20, 3, stride=3)
        self.valid = nn.Conv2d(20, 20, 3)
        self.reflect = nn.Conv2d(20, 20, 3, padding=1, padding_mode="reflect")
        self.line = nn.Conv1d(20, 20, 3, padding=1)


def test_what_is_replaced_and_why_the_rest_is_kept():
    converted, report = convert_model(Zoo())
    assert [(r.name, r.kernel_size, r.conv_kernel_size, r.num_heads, r.dropped_bias) for r in report.replaced] == [
        ("five", 5, 5, 3, True),
        ("same", 3, 3, 4, False),
    ]
    reasons = {s.name: s.reason for s in report.skipped}
    assert reasons == {
        "dilated": "dilated (dilation=(2, 2))",
        "grouped": "grouped (groups=4)",
        "even": "even kernel 2x2 (ACmix needs an odd kernel)",
        "tall": "non-square kernel (3, 1)",
        "patch": "stride 3 >= kernel 3 (non-overlapping patch embedding)",
        "valid": "padding (0, 0) (ACmix keeps 'same' geometry: padding 1 for a 3x3 kernel)",
        "reflect": "padding mode 'reflect' (ACmix pads as its own border rule, i.e. 'same' with zeros)",
    }
    assert isinstance(converted.line, nn.Conv1d)


def test_include_exclude_min_channels_and_options():
    model = _resnet18()
    _, only = convert_model(model, include=["layer4.*"], exclude="layer4.1.*")
    assert [r.name for r in only.replaced] == ["layer4.0.conv1", "layer4.0.conv2"]
    reasons = {s.name: s.reason for s in only.skipped}
    assert reasons["layer4.1.conv1"] == "excluded by 'layer4.1.*'"
    assert reasons["layer1.0.conv1"] == "not matched by include"
    _, wide = convert_model(model, min_channels=128)
    assert all(min(r.in_channels, r.out_channels) >= 128 for r in wide.replaced) and len(wide.replaced) == 11
    conv, rep = convert_model(model, include="layer1.0.conv1", num_heads=8, attn_kernel_size=5, mix="conv")
    layer = conv.layer1[0].conv1
    assert (layer.num_heads, layer.attn_kernel_size, layer.mix) == (8, 5, "conv") and rep.replaced[0].num_heads == 8


def test_heads_divide_the_channels():
    assert [choose_heads(c) for c in (64, 36, 18, 10, 7, 3)] == [4, 4, 3, 2, 1, 3]
    assert choose_heads(48, 8) == 8 and choose_heads(40, 6) == 5
    with pytest.raises(ValueError, match="num_heads must be a positive int, got 0"):
        convert_model(Zoo(), num_heads=0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="convert_model sets head, stride from each convolution"):
        convert_model(Zoo(), stride=2, head=4)
    with pytest.raises(ValueError, match="min_channels must be a non-negative int, got -1"):
        convert_model(Zoo(), min_channels=-1)


def test_shared_modules_stay_shared_and_converting_twice_changes_nothing():
    shared = nn.Conv2d(16, 16, 3, padding=1)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    converted, report = convert_model(model)
    assert len(report.replaced) == 1 and converted[0] is converted[2] and isinstance(converted[0], ACmix)
    again, second = convert_model(converted)
    assert not second.replaced and not second.skipped  # ACmix internals (1x1 projections) are not listed
    x = torch.randn(1, 16, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x), converted.eval()(x))


def test_a_single_conv_dtype_mode_and_inplace():
    conv = nn.Conv2d(16, 32, 3, stride=2, padding=1).double().eval()
    layer, report = convert_model(conv)
    assert isinstance(layer, ACmix) and layer.qkv.weight.dtype == torch.float64 and not layer.training
    assert layer(torch.randn(1, 16, 7, 7, dtype=torch.float64)).shape == (1, 32, 4, 4)
    model = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1))
    same, _ = convert_model(model, inplace=True)
    assert same is model and isinstance(model[0], ACmix)


def test_public_entry_point():
    assert acmix.convert_model is convert_model


@given(
    cin=st.integers(16, 24),
    cout=st.integers(16, 24),
    k=st.sampled_from([3, 5]),
    stride=st.integers(1, 2),
    h=st.integers(1, 13),
    w=st.integers(1, 13),
)
def test_converted_conv_keeps_the_output_shape(cin, cout, k, stride, h, w):
    conv = nn.Conv2d(cin, cout, k, stride, k // 2)
    layer, report = convert_model(conv)
    assert len(report.replaced) == 1 and layer.num_heads == choose_heads(cout)
    x = torch.randn(1, cin, h, w)
    with torch.no_grad():
        assert layer(x).shape == conv(x).shape


@pytest.mark.parametrize("side,stride", [(3, 2), (5, 2), (9, 2), (6, 1), (1, 1)])
def test_acmix_through_the_torchscript_onnx_exporter(side, stride, fresh_seed):
    """The exporter ultralytics uses (dynamo=False): automatic backend choice while tracing, float32 position grid,
    ceil(H / stride) at odd sizes."""
    ort = pytest.importorskip("onnxruntime")
    layer = ACmix(16, 24, stride=stride).eval()
    x = torch.randn(1, 16, side, side + 2)
    buf = io.BytesIO()
    with torch.no_grad():
        ref = layer(x)
        torch.onnx.export(layer, (x,), buf, dynamo=False, opset_version=17, input_names=["x"])
    session = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"x": x.numpy()})[0])
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


def test_core_package_does_not_need_ultralytics():
    """Without ultralytics: acmix and convert_model import; the integration says which extra to install."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['ultralytics'] = None\n"
        "import acmix, acmix.integrations\n"
        "assert callable(acmix.convert_model)\n"
        "try:\n"
        "    import acmix.integrations.ultralytics\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "acmix.integrations.ultralytics needs ultralytics" in proc.stdout
    assert "pip install 'acmix[yolo]'" in proc.stdout


def test_acmix_through_the_default_onnx_exporter(tmp_path):
    """torch.onnx.export's default (dynamo) exporter, with the automatic backend choice (no use_backend block)."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    layer = ACmix(16, 24, stride=2).eval()
    x = torch.randn(1, 16, 9, 11)
    with torch.no_grad():
        ref = layer(x)
        torch.onnx.export(layer, (x,), dynamo=True, opset_version=18, input_names=["x"]).save(str(tmp_path / "a.onnx"))
    session = ort.InferenceSession(str(tmp_path / "a.onnx"), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"x": x.numpy()})[0])
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
