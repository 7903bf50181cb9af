"""ACmix-ResNet and ACmix-Swin against timm and against test-only re-statements of the official models.

Official checkpoints cannot be downloaded in tests: their state dicts come from ``tests/_official_models.py``
(official key names and arithmetic, docs/official-code.md), saved in the official file formats.
"""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn as nn

import acmix  # noqa: F401  (registers the models)
from _official_models import OfficialACmixResNet, OfficialSwinACmix, perturb_, save_swin_training_state
from acmix import ACmix
from acmix.layers import ACmixSwinBlock, ACmixWindowAttention
from acmix.models import load_official_checkpoint
from acmix.models.resnet import ResNet
from acmix.models.swin import SwinTransformer
from acmix.ops import shift_kernels

SMALL_SWIN = dict(embed_dim=24, depths=(2, 2, 2, 2), num_heads=(1, 2, 3, 4))


# ------------------------------------------------------------------------------------------------ ResNet
def test_resnet50_san_is_timms_resnet50():
    theirs = timm.create_model("resnet50", num_classes=10).eval()
    ours = timm.create_model("resnet50_san", num_classes=10).eval()
    assert isinstance(ours, ResNet)
    ours.load_state_dict(theirs.state_dict())  # strict: identical key sets and shapes
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=0, rtol=0)


def test_acmix_and_baseline_differ_only_in_the_mixer():
    base = timm.create_model("resnet26_san", num_classes=10)
    mix = timm.create_model("acmix_resnet26", num_classes=10)
    assert isinstance(base, ResNet) and type(base) is type(mix)
    base_mods = {n: type(m) for n, m in base.named_modules() if ".conv2" not in n}
    mix_mods = {n: type(m) for n, m in mix.named_modules() if ".conv2." not in n}
    conv2 = {n for n in mix_mods if n.endswith(".conv2")}
    assert len(conv2) == 8 and all(mix_mods[n] is ACmix for n in conv2)
    assert {n: t for n, t in mix_mods.items() if n not in conv2} == {
        n: t for n, t in base_mods.items() if n not in conv2
    }
    layer = mix.layer2[0].conv2
    assert (layer.dim, layer.stride, layer.num_heads, layer.attn_kernel_size, layer.conv_kernel_size) == (
        128,
        2,
        4,
        7,
        3,
    )


def test_resnet_official_init_and_paper_option():
    model = timm.create_model("acmix_resnet26", num_classes=10)
    layer = model.layer1[0].conv2
    c = layer.dim
    for w in layer.qkv.weight.chunk(3, 0):  # each projection is Kaiming fan_out with fan_out = C
        assert w.std().item() == pytest.approx(math.sqrt(2.0 / c), rel=0.1)
    kernels = shift_kernels(3).expand_as(layer.shift_weight)
    assert not torch.equal(layer.shift_weight, kernels)  # the official ResNet overwrites the shift init
    assert layer.shift_weight.std().item() == pytest.approx(math.sqrt(2.0 / (c * 9)), rel=0.1)
    assert layer.alpha.item() == layer.beta.item() == 0.5
    paper = timm.create_model("acmix_resnet26", num_classes=10, acmix_kwargs={"shift_init": True})
    assert torch.equal(paper.layer1[0].conv2.shift_weight, kernels)


def test_resnet_acmix_kwargs_and_errors():
    attn_only = timm.create_model("acmix_resnet26", num_classes=10, acmix_kwargs={"mix": "attn"}).eval()
    assert all(m.mix == "attn" for m in attn_only.modules() if isinstance(m, ACmix))
    assert torch.isfinite(attn_only(torch.randn(1, 3, 32, 32))).all()
    with pytest.raises(ValueError, match="attn_layer must be one of"):
        timm.create_model("resnet26_san", attn_layer="conv3")
    with pytest.raises(ValueError, match="cardinality 1"):
        timm.create_model("acmix_resnet26", layers=(1, 1, 1, 2), output_stride=16)  # a dilated 3 x 3 position


def _official_resnet(layers=(1, 2, 4, 1)) -> OfficialACmixResNet:
    torch.manual_seed(1)
    model = perturb_(OfficialACmixResNet(layers)).eval()
    with torch.no_grad():  # a trained net's scale: small last-BN gammas keep the residual stream O(1)
        for name, module in model.named_modules():
            if name.endswith("bn3"):
                module.weight.mul_(0.2)
        model.fc.weight.mul_(4.0)
    return model


def test_official_resnet_state_dict_through_timms_standard_path(tmp_path):
    official = _official_resnet()
    torch.save(official.state_dict(), tmp_path / "acmix_resnet26.pth")  # a plain state dict, official keys
    ours = timm.create_model(
        "acmix_resnet26", pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "acmix_resnet26.pth"))
    ).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected, got = official(x), ours(x)
    assert expected.abs().max() > 1.0
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_official_resnet_float64_is_exact_and_report_counts():
    official = _official_resnet((1, 1, 1, 1)).double()
    ours = timm.create_model("acmix_resnet26", layers=(1, 1, 1, 1)).double().eval()
    report = load_official_checkpoint(ours, {f"module.{k}": v for k, v in official.state_dict().items()})
    # 4 ACmix layers: conv1/2/3 weight+bias -> qkv (2 keys), conv_p, fc, dep_conv, rate1/rate2 renamed
    assert report.renamed == 4 * 7 and report.missing == [] and report.unexpected == []
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        # residual differences come from the official float32 coordinate grid only
        torch.testing.assert_close(ours(x), official(x), atol=1e-5, rtol=1e-6)


# ------------------------------------------------------------------------------------------------ Swin
def test_swin_with_acmix_off_is_timms_swin():
    theirs = timm.create_model("swin_tiny_patch4_window7_224", num_classes=10, **SMALL_SWIN).eval()
    ours = timm.create_model("acmix_swin_tiny_patch4_window7_224", num_classes=10, attn_layer="window", **SMALL_SWIN)
    ours.eval()
    assert isinstance(ours, SwinTransformer)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=0, rtol=0)
    with_acmix = timm.create_model("acmix_swin_tiny_patch4_window7_224", num_classes=10, **SMALL_SWIN)
    extra = set(with_acmix.state_dict()) - set(theirs.state_dict())
    assert set(theirs.state_dict()) <= set(with_acmix.state_dict())
    assert {k.rsplit(".", 1)[-1] if "fc" not in k else "fc" for k in extra} == {"fc", "shift_weight", "alpha", "beta"}


def test_swin_acmix_attention_settings_follow_the_official_code():
    model = timm.create_model("acmix_swin_tiny_patch4_window7_224", num_classes=10, **SMALL_SWIN)
    attn = model.layers[1].blocks[1].attn
    assert isinstance(attn, ACmixWindowAttention)
    assert attn.fc.bias is not None and tuple(attn.fc.weight.shape) == (9, 6, 1, 1)  # FC bias, 3N -> 9
    assert torch.equal(attn.shift_weight, shift_kernels(3).expand_as(attn.shift_weight))  # shift init kept
    assert attn.alpha.item() == attn.beta.item() == 0.5
    nwd = model.no_weight_decay()
    assert "layers.1.blocks.1.attn.alpha" in nwd and "layers.1.blocks.1.attn.relative_position_bias_table" in nwd


def test_swin_conv_path_runs_on_the_rolled_map():
    torch.manual_seed(0)
    block = ACmixSwinBlock(dim=8, input_resolution=(14, 14), num_heads=2, window_size=7, shift_size=3).eval()
    with torch.no_grad():
        block.attn.shift_weight.add_(torch.randn_like(block.attn.shift_weight))
    x = torch.randn(1, 14, 14, 8)
    attn = block.attn
    with torch.no_grad():
        y = block.norm1(x)
        rolled = torch.roll(y, (-3, -3), (1, 2))
        qkv = attn.qkv(rolled)
        expected_conv = torch.roll(attn.convolution_path(qkv), (3, 3), (1, 2))
        unrolled_conv = attn.convolution_path(attn.qkv(y))
        attn.mix = "attn"
        att_only = block._attn(y)
        attn.mix = "learned"
        full = block._attn(y)
    torch.testing.assert_close(full, 0.5 * att_only + 0.5 * expected_conv, atol=1e-5, rtol=1e-5)
    assert (full - (0.5 * att_only + 0.5 * unrolled_conv)).abs().max() > 1e-3  # the seam matters


def test_official_swin_training_state_through_timms_standard_path(tmp_path):
    torch.manual_seed(2)
    official = perturb_(OfficialSwinACmix(224, num_classes=10, **SMALL_SWIN)).eval()
    save_swin_training_state(official.state_dict(), tmp_path / "acmix_swin.pth")
    ours = timm.create_model(
        "acmix_swin_tiny_patch4_window7_224",
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(tmp_path / "acmix_swin.pth")),
        num_classes=10,
        **SMALL_SWIN,
    ).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected, got = official(x), ours(x)
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    # the same file into another head size: everything but the classifier loads
    other = timm.create_model(
        "acmix_swin_tiny_patch4_window7_224",
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(tmp_path / "acmix_swin.pth")),
        num_classes=3,
        **SMALL_SWIN,
    )
    torch.testing.assert_close(other.patch_embed.proj.weight, ours.patch_embed.proj.weight)


def test_official_swin_wrong_architecture_is_a_clear_error(tmp_path):
    official = OfficialSwinACmix(224, num_classes=10, **SMALL_SWIN)
    save_swin_training_state(official.state_dict(), tmp_path / "small.pth")
    with pytest.raises(ValueError, match=r"small\.pth does not (fit|match) acmix_swin_tiny"):
        timm.create_model(
            "acmix_swin_tiny_patch4_window7_224",
            pretrained=True,
            pretrained_cfg_overlay=dict(file=str(tmp_path / "small.pth")),
            num_classes=10,
        )


def test_swin_any_input_size():
    model = timm.create_model("acmix_swin_tiny_patch4_window7_224", num_classes=10, **SMALL_SWIN).eval()
    for shape in ((1, 3, 64, 96), (1, 3, 100, 60), (2, 3, 32, 32)):
        with torch.no_grad():
            out = model(torch.randn(*shape))
        assert out.shape == (shape[0], 10) and torch.isfinite(out).all()
    feats = model.forward_intermediates(torch.randn(1, 3, 96, 160), intermediates_only=True)
    assert [tuple(f.shape[-2:]) for f in feats] == [(24, 40), (12, 20), (6, 10), (3, 5)]


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["tiny", "small"])
def test_official_swin_full_size(tmp_path, variant):
    depths = (2, 2, 6, 2) if variant == "tiny" else (2, 2, 18, 2)
    official = perturb_(OfficialSwinACmix(224, depths=depths)).eval()
    save_swin_training_state(official.state_dict(), tmp_path / "w.pth")
    name = f"acmix_swin_{variant}_patch4_window7_224"
    ours = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "w.pth"))).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), official(x), atol=1e-4, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("depth,layers", [(26, (1, 2, 4, 1)), (38, (2, 3, 5, 2)), (50, (3, 4, 6, 3))])
def test_official_resnet_full_size(tmp_path, depth, layers):
    official = _official_resnet(layers)
    torch.save(official.state_dict(), tmp_path / "w.pth")
    ours = timm.create_model(
        f"acmix_resnet{depth}", pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "w.pth"))
    ).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), official(x), atol=1e-4, rtol=0)


def test_block_from_timm_block_keeps_modules_and_buffers():
    from timm.models.swin_transformer import SwinTransformerBlock

    block = SwinTransformerBlock(dim=8, input_resolution=(14, 14), num_heads=2, window_size=7, shift_size=3)
    new = ACmixSwinBlock.from_block(block)
    assert new.norm1 is block.norm1 and new.mlp is block.mlp and torch.equal(new.attn_mask, block.attn_mask)
    assert torch.equal(new.attn.qkv.weight, block.attn.qkv.weight) and new.attn.qkv is not block.attn.qkv
    assert "attn_mask" not in new.state_dict()
    assert isinstance(new.attn, nn.Module) and new.shift_size == block.shift_size
