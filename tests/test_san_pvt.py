"""SAN-10/15/19, PVT-Tiny/Small and their ACmix variants: timm surface, official checkpoints, paper numbers."""

from __future__ import annotations

import argparse
import math

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import _registry
from torch.utils.flop_counter import FlopCounterMode

import acmix  # noqa: F401  (registers the models)
from _official_san_pvt import OfficialPVT, OfficialSAN
from acmix.layers.acmix_pvt import ACmixSpatialReductionAttention, SpatialReductionAttention
from acmix.layers.acmix_san import ACmixSanAttention, SanAttention
from acmix.models import PAPER_TABLE, load_official_checkpoint
from acmix.models import pvt as pvt_mod
from acmix.models import san as san_mod
from acmix.ops import cell_upsample, conv_path, conv_path_maps

SAN_BASELINES = ("san10", "san15", "san19")
SAN_PAIRWISE = ("san10_pairwise", "san15_pairwise", "san19_pairwise")
SAN_ACMIX = ("acmix_san10", "acmix_san15", "acmix_san19")
PVT_BASELINES = ("pvt_tiny", "pvt_small")
PVT_ACMIX = ("acmix_pvt_tiny", "acmix_pvt_small")
ALL = SAN_BASELINES + SAN_PAIRWISE + SAN_ACMIX + PVT_BASELINES + PVT_ACMIX
#: the models every surface test runs (the deeper variants share all classes with these)
SMALL = ("san10", "acmix_san10", "pvt_tiny", "acmix_pvt_tiny")
ROWS = {row.name: row for row in PAPER_TABLE}
#: narrow, shallow versions of the same classes (the surface tests do not need the paper's widths)
_TINY_SAN = dict(layers=(1, 1, 1, 1, 1), widths=(32, 64, 64, 64, 64))
_TINY_PVT = dict(depths=(1, 1, 1, 1), embed_dims=(16, 32, 32, 64), num_heads=(1, 2, 2, 4), mlp_ratios=(2, 2, 2, 2))
TINY = {name: _TINY_SAN if "san" in name else _TINY_PVT for name in SMALL}
SAN_DEPTHS = {"san10": (2, 1, 2, 4, 1), "san15": (3, 2, 3, 5, 2), "san19": (3, 3, 4, 6, 3)}


def _create(name: str, **kwargs) -> nn.Module:
    return timm.create_model(name, **kwargs)


def _tiny(name: str, **kwargs) -> nn.Module:
    """The registered model ``name`` with the narrow test widths (every other argument as registered)."""
    return timm.create_model(name, **TINY[name], **kwargs)


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _count(name: str) -> int:
    """Parameters of a registered model, built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        return _n_params(timm.create_model(name))


# ------------------------------------------------------------------------------------------------ registry / cfg
@pytest.mark.parametrize("name", ALL)
def test_registered_under_acmix_with_a_complete_cfg(name):
    assert name in timm.list_models()
    family = "acmix.san" if "san" in name else "acmix.pvt"
    assert _registry._model_to_module[name] == family  # filed as ours, never one of timm's models
    cfg = timm.models.get_pretrained_cfg(name)
    assert cfg is not None
    model = _create(name, num_classes=0) if name in SMALL else None
    for field in ("input_size", "crop_pct", "mean", "std", "first_conv", "classifier", "paper_name", "license"):
        assert getattr(cfg, field), field
    assert cfg.input_size == (3, 224, 224)
    if model is not None:
        assert isinstance(model.get_submodule(cfg.first_conv), nn.Conv2d)


def test_acmix_names_list():
    assert {n for n in SAN_ACMIX + PVT_ACMIX} <= set(timm.list_models("acmix*"))


# ------------------------------------------------------------------------------------------------ parameter counts
def _san_params(depths, acmix_stages=(False,) * 5, pairwise=False, k_conv=3, num_classes=1000) -> int:
    """Analytic parameter count of hszhao/SAN (patchwise or pairwise), plus the ACmix conv path per stage."""
    widths, kernels = (64, 256, 512, 1024, 2048), (3, 7, 7, 7, 7)
    total = 3 * 64 + 2 * 64  # stem conv (no bias) + BN
    prev = 64
    for width, kernel, depth, use_acmix in zip(widths, kernels, depths, acmix_stages):
        total += prev * width + 2 * width  # transition conv (no bias) + stage BN
        r, m, k2 = width // 16, width // 4, kernel * kernel
        wc = m // 8
        if pairwise:
            conv_w = 2 * (r + 2) + (r + 2) * r + 2 * r + r * wc + wc + (2 * 2 + 2)  # + conv_p
        else:
            conv_w = 2 * r * (k2 + 1) + r * (k2 + 1) * wc + 2 * wc + wc * k2 * wc + k2 * wc
        block = 2 * width + width * (2 * r + m) + (2 * r + m) + conv_w + 2 * m + m * width + width
        if use_acmix:
            block += k_conv**2 * ((2 * r + m) // wc) + m * k_conv**4 + 2  # FC (no bias), c-III kernel, alpha, beta
        total += depth * block
        prev = width
    return total + prev * num_classes + num_classes


@pytest.mark.parametrize("name", SAN_BASELINES + SAN_PAIRWISE + SAN_ACMIX)
def test_san_param_counts(name):
    depth_key = name.replace("acmix_", "").replace("_pairwise", "")
    acmix_stages = tuple(a == "acmix" for a in san_mod.ACMIX_SAN_STAGES) if "acmix" in name else (False,) * 5
    n = _count(name)
    assert n == _san_params(SAN_DEPTHS[depth_key], acmix_stages, pairwise="pairwise" in name)
    if name in SAN_BASELINES:  # docs/paper-numbers.md: re-derived 11.84 / 16.18 / 20.52 M
        assert round(n / 1e6, 2) == ROWS[f"acmix_{name}"].baseline_released_params_m
    elif name in SAN_PAIRWISE:  # SAN README: 10.5 / 14.1 / 17.6 M
        assert round(n / 1e6, 1) == {"san10": 10.5, "san15": 14.1, "san19": 17.6}[depth_key]
    else:  # ACmix README 12.1 / 16.6 / 21.2 M
        assert abs(n / 1e6 / ROWS[name].params_m - 1) <= 0.03


#: the README gives the ACmix-PVT sizes as whole millions ("13M", "25M"): a rounding interval of +-0.5 M
PAPER_PRECISION_M = {"acmix_pvt_tiny": 0.5, "acmix_pvt_small": 0.5}


@pytest.mark.parametrize("name", PVT_BASELINES + PVT_ACMIX)
def test_pvt_param_counts(name):
    n = _count(name) / 1e6
    if name in PVT_BASELINES:  # PVT README: 13.2 / 24.5 M
        assert round(n, 1) == ROWS[f"acmix_{name}"].baseline_params_m
    else:
        paper = ROWS[name].params_m
        assert abs(n - paper) <= max(0.03 * paper, PAPER_PRECISION_M[name])
        base = _count(name.replace("acmix_", "")) / 1e6
        # the conv path adds 81 C (c-III kernel) + 27 N + 9 (FC with bias) + 2 (alpha, beta) per block
        depths = (2, 2, 2, 2) if "tiny" in name else (3, 4, 6, 3)
        extra = sum(d * (81 * c + 27 * h + 9 + 2) for d, c, h in zip(depths, (64, 128, 320, 512), (1, 2, 5, 8)))
        assert n - base == pytest.approx(extra / 1e6, abs=1e-9)


# ------------------------------------------------------------------------------------------------ model surface
def _input(batch: int = 2, hw: tuple[int, int] = (64, 64), chans: int = 3) -> torch.Tensor:
    return torch.randn(batch, chans, *hw)


def _forward_backward(model: nn.Module) -> None:
    model.train()
    x = _input(2, (64, 96))  # non-square
    out = model(x)
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing


@pytest.mark.parametrize("name", SMALL)
def test_forward_shapes_finite_and_every_param_gets_a_gradient(name):
    _forward_backward(_tiny(name, num_classes=7))


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL)
def test_forward_backward_full_size(name):
    _forward_backward(_create(name, num_classes=7))


@pytest.mark.parametrize("name", SMALL)
def test_eval_is_deterministic_and_head_surface(name):
    model = _tiny(name, num_classes=5).eval()
    x = _input(1, (64, 64))
    with torch.no_grad():
        a, b = model(x), model(x)
        feats = model.forward_features(x)
        pooled = model.forward_head(feats, pre_logits=True)
        logits = model.forward_head(feats)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(logits, a, rtol=0, atol=0)
    assert pooled.shape == (1, model.num_features)
    model.reset_classifier(3)
    with torch.no_grad():
        assert model(x).shape == (1, 3)
    model.reset_classifier(0)
    with torch.no_grad():
        assert model(x).shape == (1, model.num_features)


@pytest.mark.parametrize("name", SMALL)
def test_features_only_channels_and_reductions(name):
    model = _tiny(name, features_only=True).eval()
    chans, reds = model.feature_info.channels(), model.feature_info.reduction()
    if "san" in name:
        assert chans == list(_TINY_SAN["widths"]) and reds == [2, 4, 8, 16, 32]
    else:
        assert chans == list(_TINY_PVT["embed_dims"]) and reds == [4, 8, 16, 32]
    x = _input(1, (64, 96))
    with torch.no_grad():
        feats = model(x)
    assert [f.shape for f in feats] == [(1, c, 64 // r, 96 // r) for c, r in zip(chans, reds)]
    model = _tiny(name, features_only=True, out_indices=(1, 2)).eval()
    with torch.no_grad():
        assert [f.shape[1] for f in model(x)] == chans[1:3]


@pytest.mark.parametrize("name", SMALL)
def test_grad_checkpointing_gives_the_same_output_and_gradients(name):
    torch.manual_seed(0)
    a = _tiny(name, num_classes=4).eval()  # eval: BN uses running stats, so recomputation is exact
    b = _tiny(name, num_classes=4).eval()
    b.load_state_dict(a.state_dict())
    b.set_grad_checkpointing(True)
    x = _input(1, (64, 64))
    ya, yb = a(x), b(x)
    torch.testing.assert_close(ya, yb, rtol=0, atol=0)
    ya.sum().backward()
    yb.sum().backward()
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("name", ("acmix_san10", "acmix_pvt_tiny"))
def test_drop_path_rate_and_in_chans(name):
    model = _tiny(name, drop_path_rate=0.2, in_chans=1, num_classes=3)
    rates = [m.drop_prob for m in model.modules() if isinstance(m, timm.layers.DropPath)]
    assert rates and max(rates) == pytest.approx(0.2) and rates == sorted(rates)
    x = _input(1, (64, 64), chans=1)
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (1, 3)


@pytest.mark.parametrize("coarse", [False, True])
def test_group_matcher_covers_every_parameter_in_order(coarse):
    for name in SMALL:
        model = _tiny(name)
        groups = timm.models.group_parameters(model, model.group_matcher(coarse))
        assert sum(len(v) for v in groups.values()) == len(dict(model.named_parameters()))
        firsts = [v[0] for v in groups.values()]
        assert firsts[-1].startswith("head") and firsts[0].startswith(("stem", "cls_token"))


def test_no_weight_decay_names_exist():
    for name in SMALL:
        model = _tiny(name)
        names = dict(model.named_parameters())
        nwd = model.no_weight_decay()
        assert nwd <= set(names)
        if "pvt" in name:
            assert {"cls_token", "stages.0.pos_embed", "stages.3.pos_embed"} <= nwd
        if "acmix" in name:
            assert any(n.endswith(".alpha") for n in nwd) and any(n.endswith(".beta") for n in nwd)


def test_bad_inputs_raise_value_errors():
    san, pvt = _create("san10").eval(), _create("pvt_tiny").eval()
    with pytest.raises(ValueError, match="in_chans|expected input"):
        san(torch.randn(1, 4, 64, 64))
    with pytest.raises(ValueError, match="at least 32"):
        san(torch.randn(1, 3, 16, 64))
    with pytest.raises(ValueError, match="at least 32"):
        pvt(torch.randn(1, 3, 64, 24))
    with pytest.raises(ValueError, match="attn_layer"):
        san_mod.SAN(attn_layer="nope")
    with pytest.raises(ValueError, match="sr_ratio"):
        pvt_mod.PyramidVisionTransformer(sr_ratios=(8, 4, 2, 2))


# ------------------------------------------------------------------------------------------------ official weights
def _randomise_official(model: nn.Module, seed: int = 0) -> None:
    """Random, trained-looking weights: non-trivial norms and BN statistics, small embeddings."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.dim() == 1 and n.endswith("weight"):  # BN / LN scale
                p.copy_(1 + 0.1 * noise)
            elif "pos_embed" in n or "cls_token" in n:
                p.copy_(0.02 * noise)
            elif p.dim() == 1:  # biases
                p.copy_(0.05 * noise)
            else:
                p.mul_(1 + 0.2 * noise)
        for n, b in model.named_buffers():
            if n.endswith("running_mean"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
            elif n.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))


def _san_training_state(official: nn.Module) -> dict:
    sd = {f"module.{k}": v for k, v in official.state_dict().items()}
    return {
        "epoch": 100,
        "state_dict": sd,
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.0, "momentum": 0.9}]},
        "scheduler": {"last_epoch": 100},
        "top1_val": 77.1,
        "top5_val": 93.5,
    }


#: one block per stage keeps the default run fast; the slow run checks the registered depths
_SAN_CASES = [pytest.param((1, 1, 1, 1, 1), id="one-block-stages")] + [
    pytest.param(SAN_DEPTHS[n], id=n, marks=pytest.mark.slow) for n in SAN_BASELINES
]


@pytest.mark.parametrize("layers", _SAN_CASES)
def test_official_san_checkpoint_loads_through_timm_and_matches(tmp_path, layers):
    official = OfficialSAN(1, layers, (3, 7, 7, 7, 7), 1000).eval()
    _randomise_official(official)
    path = tmp_path / "san_patchwise.pth"
    torch.save(_san_training_state(official), path)
    overlay = dict(file=str(path))
    ours = timm.create_model("san10", layers=layers, pretrained=True, pretrained_cfg_overlay=overlay).eval()
    x = torch.randn(1, 3, 128, 128)  # the official reflection pad needs the 4 x 4 stage-4 map
    with torch.no_grad():
        want, got = official(x), ours(x)
    assert want.std() > 1e-2  # not a degenerate output
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_official_san_pairwise_state_dict_maps_and_matches():
    official = OfficialSAN(0, (1, 1, 1, 1, 1), (3, 7, 7, 7, 7), 1000).eval()
    _randomise_official(official, seed=1)
    ours = _create("san10_pairwise", layers=(1, 1, 1, 1, 1)).eval()
    report = load_official_checkpoint(ours, _san_training_state(official))
    assert report.loaded == len(ours.state_dict()) and not report.missing
    x = torch.randn(1, 3, 128, 160)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), official(x), atol=1e-4, rtol=1e-4)


def test_san_filter_round_trip_and_acmix_reduces_to_san():
    official = OfficialSAN(1, SAN_DEPTHS["san10"], (3, 7, 7, 7, 7), 1000)
    sd = san_mod.checkpoint_filter_fn(
        {"state_dict": {f"module.{k}": v for k, v in official.state_dict().items()}}, None
    )
    with torch.device("meta"):
        full = _create("san10")
    assert {k: tuple(v.shape) for k, v in sd.items()} == {k: tuple(v.shape) for k, v in full.state_dict().items()}
    base = _tiny("san10")
    assert san_mod.checkpoint_filter_fn(base.state_dict(), base).keys() == base.state_dict().keys()
    # baseline weights in ACmix-SAN: only the conv path is new; with alpha = 1, beta = 0 it is exactly SAN
    _randomise_official(base)
    acm = _tiny("acmix_san10")
    result = acm.load_state_dict(base.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert {k.rsplit(".", 1)[-1] for k in result.missing_keys} == {"weight", "shift_weight", "alpha", "beta"}
    with torch.no_grad():
        for m in acm.modules():
            if isinstance(m, ACmixSanAttention):
                m.alpha.fill_(1.0)
                m.beta.fill_(0.0)
    base.eval(), acm.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(acm(x), base(x), atol=1e-5, rtol=1e-5)


def _pvt_training_state(official: nn.Module) -> dict:
    return {
        "model": official.state_dict(),
        "optimizer": {"state": {}, "param_groups": [{"lr": 1e-5}]},
        "lr_scheduler": {"last_epoch": 300},
        "epoch": 299,
        "args": argparse.Namespace(model="pvt_tiny", lr=5e-4, drop_path=0.1),
    }


@pytest.mark.parametrize("hw", [(224, 224), (96, 160)])
def test_official_pvt_checkpoint_loads_through_timm_and_matches(tmp_path, hw):
    official = OfficialPVT((2, 2, 2, 2)).eval()
    _randomise_official(official, seed=2)
    path = tmp_path / "pvt_tiny.pth"
    torch.save(_pvt_training_state(official), path)  # holds an argparse.Namespace: weights_only needs an allowlist
    ours = timm.create_model("pvt_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    x = torch.randn(1, 3, *hw)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), official(x), atol=1e-4, rtol=1e-4)


def test_pvt_filter_round_trip_resize_and_acmix_reduces_to_pvt():
    official = OfficialPVT((2, 2, 2, 2))
    base = _create("pvt_tiny")
    sd = pvt_mod.checkpoint_filter_fn({"model": official.state_dict()}, base)
    assert {k: tuple(v.shape) for k, v in sd.items()} == {k: tuple(v.shape) for k, v in base.state_dict().items()}
    assert pvt_mod.checkpoint_filter_fn(base.state_dict(), base).keys() == base.state_dict().keys()
    # a 224 checkpoint into a model built for 256: embeddings resized bilinearly to the new grids
    big = _create("pvt_tiny", img_size=256)
    report = load_official_checkpoint(big, {"model": official.state_dict()})
    assert not report.missing and big.stages[0].pos_embed.shape == (1, 64 * 64, 64)
    # baseline weights in ACmix-PVT, alpha = 1, beta = 0: exactly PVT
    base = _tiny("pvt_tiny")
    _randomise_official(base, seed=3)
    acm = _tiny("acmix_pvt_tiny")
    result = acm.load_state_dict(base.state_dict(), strict=False)
    assert not result.unexpected_keys
    with torch.no_grad():
        for m in acm.modules():
            if isinstance(m, ACmixSpatialReductionAttention):
                m.alpha.fill_(1.0)
                m.beta.fill_(0.0)
    base.eval(), acm.eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(acm(x), base(x), atol=1e-5, rtol=1e-5)


def test_official_checkpoint_with_another_num_classes_adapts_the_head(tmp_path):
    official = OfficialPVT((2, 2, 2, 2), num_classes=1000)
    path = tmp_path / "pvt.pth"
    torch.save(_pvt_training_state(official), path)
    model = _create("pvt_tiny", num_classes=10, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert model.head.weight.shape == (10, 512)
    torch.testing.assert_close(model.stages[1].blocks[0].attn.q.weight, official.block2[0].attn.q.weight)


# ------------------------------------------------------------------------------------------------ ACmix layers
@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_conv_path_maps_equals_acmix_conv_path_for_equal_widths(impl):
    c, n = 12, 3
    q, k, v = (torch.randn(2, c, 7, 9, dtype=torch.float64) for _ in range(3))
    fc, gw = torch.randn(9, 3 * n, dtype=torch.float64), torch.randn(c, 9, 3, 3, dtype=torch.float64)
    want = conv_path(q, k, v, n, fc, gw, impl=impl)
    got = conv_path_maps(torch.cat([q, k, v], 1), c // n, fc, gw, impl=impl)
    torch.testing.assert_close(got, want)


def test_conv_path_maps_fused_equals_reference_forward_and_backward():
    qkv = torch.randn(2, 24, 6, 5, dtype=torch.float64, requires_grad=True)  # M = 12 maps of head_dim 2
    fc = torch.randn(9, 12, dtype=torch.float64, requires_grad=True)
    gw = torch.randn(16, 9, 3, 3, dtype=torch.float64, requires_grad=True)
    outs = [conv_path_maps(qkv, 2, fc, gw, impl=impl) for impl in ("fused", "reference")]
    torch.testing.assert_close(outs[0], outs[1])
    g = torch.randn_like(outs[0])
    grads = [torch.autograd.grad(o, (qkv, fc, gw), g) for o in outs]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_acmix_san_shift_init_conv_path_is_the_shifted_sum_of_fc_maps():
    layer = ACmixSanAttention(64, 4, 16, kernel_size=3).double()
    qkv = torch.randn(1, 24, 5, 6, dtype=torch.float64)  # 2 + 2 + 8 maps of head_dim Wc = 2
    f = torch.einsum("im,bmdhw->bidhw", layer.fc.weight[:, :, 0, 0], qkv.reshape(1, 12, 2, 5, 6))  # (1, 9, 2, H, W)
    fp = F.pad(f, (1, 1, 1, 1))
    shifted = sum(fp[:, i, :, i // 3 : i // 3 + 5, i % 3 : i % 3 + 6] for i in range(9))  # (1, 2, H, W)
    want = shifted.repeat_interleave(8, dim=1)  # output channel d * 8 + j
    torch.testing.assert_close(layer.convolution_path(qkv), want)


def test_acmix_layers_keep_the_official_conventions():
    san = ACmixSanAttention(256, 16, 64)
    pvt = ACmixSpatialReductionAttention(128, 2, sr_ratio=4)
    for layer in (san, pvt):
        assert layer.alpha.item() == 0.5 and layer.beta.item() == 0.5 and layer.alpha.requires_grad
        eye = torch.eye(9).reshape(9, 3, 3)
        assert torch.equal(layer.shift_weight, eye.expand_as(layer.shift_weight))
    assert san.fc.bias is None and pvt.fc.bias is not None  # conv host (ResNet code) vs transformer host (Swin)
    assert not isinstance(SanAttention(256, 16, 64), ACmixSanAttention)
    assert not hasattr(SpatialReductionAttention(128, 2), "shift_weight")


def test_cell_upsample():
    x = torch.arange(12.0).reshape(1, 1, 3, 4)
    torch.testing.assert_close(cell_upsample(x, (6, 8), 2), F.interpolate(x, size=(6, 8), mode="nearest"))
    y = cell_upsample(x, (7, 9), 2)  # leftover row / column take the last cell
    assert y.shape == (1, 1, 7, 9)
    torch.testing.assert_close(y[..., 6, :8], y[..., 5, :8])
    torch.testing.assert_close(y[..., :, 8], y[..., :, 7])


# ------------------------------------------------------------------------------------------------ multiply-adds
def _macs(model: nn.Module, size: int = 224) -> dict[str, float]:
    """MACs of one image: FlopCounterMode (conv, matmul) plus what it cannot see, added analytically.

    * ``agg``: SAN's aggregation, out_dim * k^2 per pixel (elementwise, invisible to the counter);
    * ``attn``: PVT's attention matmuls, 2 N N' C (CPU SDPA has no registered flop formula), as PVT's get_flops;
    * ``san_extra``: the other terms of SAN's own counter (util/complexity.py): BN 2/elem, ReLU 1/elem, pools
      1/input elem, conv biases 1/output elem.
    """
    for m in model.modules():
        if hasattr(m, "conv_impl"):
            m.conv_impl = "reference"  # count the official order of operations (FC, then group conv)
    extra = {"agg": 0, "attn": 0, "san_extra": 0}

    def hook(mod, inp, out):
        x = inp[0]
        if isinstance(mod, SanAttention):
            extra["agg"] += out[0].numel() * mod.kernel_size**2
        elif isinstance(mod, SpatialReductionAttention):
            h, w = inp[1]
            n_q = x.shape[1]
            n_k = n_q if mod.sr is None else (h // mod.sr_ratio) * (w // mod.sr_ratio)
            extra["attn"] += 2 * n_q * n_k * mod.dim
        elif isinstance(mod, nn.BatchNorm2d):
            extra["san_extra"] += 2 * x[0].numel()
        elif isinstance(mod, nn.ReLU):
            extra["san_extra"] += out[0].numel()
        elif isinstance(mod, (nn.MaxPool2d, nn.AdaptiveAvgPool2d)):
            extra["san_extra"] += x[0].numel()
        elif isinstance(mod, nn.Conv2d) and mod.bias is not None:
            extra["san_extra"] += out[0].numel()

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.eval()(torch.randn(1, 3, size, size))
    for h in handles:
        h.remove()
    return {"counted": counter.get_total_flops() / 2 / 1e9, **{k: v / 1e9 for k, v in extra.items()}}


@pytest.mark.parametrize("name", ("acmix_san10", "acmix_pvt_tiny"))
def test_macs_at_224_within_3_percent_of_the_paper(name):
    _check_macs(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", ("acmix_san15", "acmix_san19", "acmix_pvt_small"))
def test_macs_at_224_within_3_percent_of_the_paper_deep(name):
    _check_macs(name)


def _check_macs(name: str) -> None:
    row = ROWS[name]
    base, acm = _macs(_create(row.baseline)), _macs(_create(name))
    if "san" in name:
        # SAN's counter (docs/paper-numbers.md baselines are in it): conv/linear + aggregation + BN/ReLU/pool/bias
        total = {k: v["counted"] + v["agg"] + v["san_extra"] for k, v in (("base", base), ("acmix", acm))}
    else:
        # PVT's get_flops: conv/linear (mmcv) + the attention matmuls
        total = {k: v["counted"] + v["attn"] for k, v in (("base", base), ("acmix", acm))}
    assert math.isclose(total["base"], row.baseline_gmacs, rel_tol=0.03), total
    assert math.isclose(total["acmix"], row.gmacs, rel_tol=0.03), total
