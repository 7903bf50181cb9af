"""acmix.analysis: formulas vs hand counts and FlopCounterMode, parameters vs numel, the 99% / 83% split.

Tolerances: parameter counts and counter-visible MACs must match exactly; the Stage I shares must be within
1 percentage point of the paper's 99% (conv), within 0.2 point of the re-derivation in docs/paper-numbers.md
(82.0% output resolution, 87.7% input resolution) and within 1.5 points of the paper's rounded 83%.
"""

from __future__ import annotations

import logging

import pytest
import timm
import torch
import torch.nn as nn

from acmix import ACmix
from acmix.analysis import (
    Component,
    acmix_cost,
    conv_cost,
    linear_cost,
    local_attention_cost,
    mlp_cost,
    spatial_reduction_attention_cost,
    stage_ratio_table,
    table1,
    walk,
    window_attention_cost,
)
from acmix.analysis.cost import STAGE_I, STAGE_II
from acmix.analysis.counters import counter_macs, cross_check
from acmix.analysis.walk import stage_of


def numel(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# ---------------------------------------------------------------------------------------------------- formulas
def test_conv_cost_hand_computed_stride_and_cin_ne_cout():
    c = conv_cost(64, 128, 3, 56, 56, stride=2)  # out 28 x 28
    assert c.params == 9 * 64 * 128
    assert c.macs == 9 * 64 * 128 * 28 * 28
    d = conv_cost(64, 128, 3, 56, 56, stride=2, bias=True, decompose=True)
    assert d.stage_params(STAGE_I) == 9 * 64 * 128 + 128
    assert d.stage_macs(STAGE_I) == 9 * 64 * 128 * 784
    assert d.stage_macs(STAGE_II) == 9 * 128 * 784  # Table 1: k^2 C HW, shift and sum
    assert d.macs == 9 * 64 * 128 * 784  # the shift-and-sum is not counted twice in totals
    g = conv_cost(32, 64, 3, 15, 15, groups=4, padding=0)  # out 13 x 13
    assert g.macs == 9 * 8 * 64 * 13 * 13 and g.params == 9 * 8 * 64


def test_linear_and_mlp_cost():
    assert linear_cost(96, 288, 3136).macs == 96 * 288 * 3136
    assert linear_cost(96, 288, 10).params == 96 * 288 + 288
    m = mlp_cost(96, 384, 49)
    assert m.macs == 2 * 96 * 384 * 49 and m.params == 2 * 96 * 384 + 384 + 96
    assert set(m.by_component()) == {Component.MLP}


def test_local_attention_cost_hand_computed():
    sa = local_attention_cost(64, 128, 14, 14, kernel_size=7, num_heads=4, stride=2)
    assert sa.stage_params(STAGE_I) == 3 * 64 * 128
    assert sa.stage_macs(STAGE_I) == 3 * 64 * 128 * 196  # official: projections at input resolution
    assert sa.by_component()[Component.ATTN_LOGITS]["macs"] == 49 * 128 * 49  # 7 x 7 output pixels
    assert sa.by_component()[Component.ATTN_AGGREGATION]["macs"] == 49 * 128 * 49
    out = local_attention_cost(64, 128, 14, 14, kernel_size=7, stride=2, proj_at="output")
    assert out.stage_macs(STAGE_I) == 3 * 64 * 128 * 49
    # heads split channels: they do not change the count
    assert local_attention_cost(64, 64, 8, 8, num_heads=1).macs == local_attention_cost(64, 64, 8, 8, num_heads=8).macs
    with pytest.raises(ValueError, match="proj_at"):
        local_attention_cost(8, 8, 4, 4, proj_at="middle")  # type: ignore[arg-type]


def test_table1_and_stage_ratio():
    rows = table1(64, 56, 56, k=3, k_att=7, num_heads=4)
    hw = 56 * 56
    conv, sa, ac = (r["values"] for r in rows)
    assert (conv["stage_I_params"], conv["stage_I_macs"], conv["stage_II_macs"]) == (
        9 * 64**2,
        9 * 64**2 * hw,
        9 * 64 * hw,
    )
    assert conv["stage_II_params"] == 0 and sa["stage_II_params"] == 0
    assert (sa["stage_I_params"], sa["stage_I_macs"], sa["stage_II_macs"]) == (3 * 64**2, 3 * 64**2 * hw, 98 * 64 * hw)
    assert ac["stage_I_macs"] == sa["stage_I_macs"]
    assert ac["stage_II_params"] == 3 * 4 * 9 + 81 * 64  # FC 3N x k^2, group conv k^4 C
    assert ac["stage_II_macs"] == (98 + 27 + 81) * 64 * hw  # Table 1: 108 C HW conv path
    ratios = [round(r["ratio"], 2) for r in stage_ratio_table((64, 128, 256, 512), 7)]
    assert ratios == [1.96, 3.92, 7.84, 15.67]  # docs/paper-numbers.md


def test_window_and_sra_formulas_hand_computed():
    # Swin-T stage 1: 56 x 56, C = 96, 3 heads, M = 7
    w = window_attention_cost(96, 3, 7, 56, 56)
    L = 3136
    comp = w.by_component()
    assert comp[Component.PROJECTION]["macs"] == 3 * 96 * 96 * L
    assert comp[Component.ATTN_LOGITS]["macs"] == 49 * 96 * L
    assert comp[Component.OUT_PROJ]["macs"] == 96 * 96 * L
    assert comp[Component.REL_POS]["params"] == 13 * 13 * 3
    wa = window_attention_cost(96, 3, 7, 56, 56, acmix=True)
    assert wa.macs - w.macs == 3 * 96 * L * 9 + 9 * 96 * 9 * L  # the Swin flops() additions (docs/official-code.md)
    assert wa.params - w.params == (27 * 3 + 9) + 96 * 81 + 2
    # padding to a multiple of the window: 10 x 10 -> 14 x 14 tokens
    assert window_attention_cost(32, 2, 7, 10, 10).by_component()[Component.PROJECTION]["macs"] == 3 * 32 * 32 * 196
    # PVT-Tiny stage 1: 56 x 56, C = 64, R = 8 -> 7 x 7 keys
    s = spatial_reduction_attention_cost(64, 1, 56, 56, sr_ratio=8)
    c = s.by_component()
    assert c[Component.PROJECTION]["macs"] == 64 * 64 * L + 2 * 64 * 64 * 49
    assert c[Component.SPATIAL_REDUCTION]["macs"] == 64 * 64 * 64 * 49  # 8 x 8 kernel, 7 x 7 outputs
    assert c[Component.ATTN_LOGITS]["macs"] == L * 49 * 64
    s4 = spatial_reduction_attention_cost(512, 8, 7, 7, sr_ratio=1, extra_tokens=1)  # stage 4 with cls token
    assert s4.by_component()[Component.ATTN_AGGREGATION]["macs"] == 50 * 50 * 512


# ---------------------------------------------------------------------------------------------------- vs modules
@pytest.mark.parametrize(
    "cin,cout,k,stride,groups,bias,hw",
    [(16, 32, 3, 1, 1, False, (9, 11)), (16, 16, 3, 2, 1, True, (9, 9)), (12, 24, 5, 2, 3, False, (13, 8)),
     (8, 8, 1, 1, 1, True, (7, 7)), (8, 16, 4, 4, 1, True, (16, 16))],
)  # fmt: skip
def test_conv_rule_matches_flop_counter_and_numel(cin, cout, k, stride, groups, bias, hw):
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2 if k % 2 else 0, groups=groups, bias=bias)
    mc = walk(conv, hw, fake=False)
    total, _ = counter_macs(conv, hw, in_chans=cin, fake=False)
    assert mc.macs == total
    assert mc.params == numel(conv)
    ho, wo = (hw[0] + 2 * conv.padding[0] - k) // stride + 1, (hw[1] + 2 * conv.padding[1] - k) // stride + 1
    assert mc.macs == k * k * cin // groups * cout * ho * wo


ACMIX_CASES = [
    {},
    {"stride": 2},
    {"dim_out": 32, "num_heads": 8},
    {"fc_bias": True, "stride": 2},
    {"qkv_bias": False, "use_rel_pos": False},
    {"conv_impl": "reference", "stride": 2},
    {"shift_mode": "learnable"},
    {"shift_mode": "frozen"},
    {"shift_mode": "fixed"},
    {"shift_mode": "tensor"},
    {"mix": "attn"},
    {"mix": "conv"},
    {"mix": "fixed"},
    {"conv_kernel_size": 5, "attn_kernel_size": 5},
]


@pytest.mark.parametrize("kwargs", ACMIX_CASES, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()) or "default")
def test_acmix_rule_params_and_counter(kwargs):
    layer = ACmix(16, **kwargs)
    h, w = 11, 10
    mc = walk(layer, (h, w))
    assert mc.params == numel(layer)
    cc = cross_check(layer, (h, w), model_cost=mc)
    assert cc.counter_macs == cc.analytic_visible_macs, cc.to_dict()
    # the projections (Stage I) are the qkv conv: 3 C_in C_out H W (the layer runs it with its rows in group order,
    # so the counter sees it at the layer's root; counted on the qkv module itself)
    _, per = counter_macs(layer.qkv, (h, w), in_chans=16)
    c_out = kwargs.get("dim_out", 16)
    assert per[""] == 3 * 16 * c_out * h * w == mc.total.stage_macs(STAGE_I)
    # what the counter cannot see is exactly the unfold attention (and tensor shifts)
    comp = mc.by_component()
    blind = sum(comp.get(n, {"macs": 0})["macs"] for n in (Component.ATTN_LOGITS, Component.ATTN_AGGREGATION))
    if kwargs.get("shift_mode") == "tensor":
        blind += comp[Component.SHIFT_CONV]["macs"]
    assert cc.blind_macs == blind


def test_acmix_formula_matches_module_attention_and_conv_paths():
    layer = ACmix(32, dim_out=64, stride=2, num_heads=4, conv_impl="reference")
    c = acmix_cost(32, 64, 14, 14, stride=2, num_heads=4)
    assert walk(layer, 14).macs == c.macs
    comp = c.by_component()
    assert comp[Component.ATTN_LOGITS]["macs"] == 49 * 64 * 49
    assert comp[Component.FC]["macs"] == 3 * 9 * 64 * 196  # FC at input resolution (official order)
    assert comp[Component.SHIFT_CONV]["macs"] == 81 * 64 * 49
    # the fused conv path: same count as FC + group conv at stride 1 when 3N = 3 + k^2 (N = 4, k = 3)
    ref = acmix_cost(32, 32, 14, 14, conv_impl="reference", mix="conv", use_rel_pos=False)
    fused = acmix_cost(32, 32, 14, 14, conv_impl="fused", mix="conv", use_rel_pos=False)
    comp_f = fused.by_component()
    assert (
        comp_f[Component.SHIFT_CONV]["macs"]
        == ref.by_component()[Component.FC]["macs"] + ref.by_component()[Component.SHIFT_CONV]["macs"]
    )


def test_timm_swin_walk_matches_counter_and_numel():
    from timm.models.swin_transformer import SwinTransformer

    model = SwinTransformer(img_size=56, embed_dim=32, depths=(2, 2), num_heads=(2, 4), window_size=7, num_classes=10)
    mc = walk(model, 56)
    assert mc.params == numel(model)
    cc = cross_check(model, 56, model_cost=mc)
    assert cc.counter_macs == cc.analytic_visible_macs == mc.macs  # SDPA attention is visible
    assert not cc.mismatches
    attn = [m for m in mc.modules if m.kind == "window_attention"]
    assert len(attn) == 4 and {m.stage for m in attn} == {"stage1", "stage2"}
    # stage 1: 14 x 14 tokens (two 7 x 7 windows each way), C = 32: logits 49 * 32 per token
    assert attn[0].cost.by_component()[Component.ATTN_LOGITS]["macs"] == 196 * 49 * 32


class _ToySRA(nn.Module):
    """A PVT spatial-reduction attention written with plain ops (test-only), input (B, N, C) at H x W."""

    def __init__(self, dim: int, sr: int, hw: int) -> None:
        super().__init__()
        self.q, self.kv, self.proj = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)
        self.sr, self.norm, self.hw, self.dim = nn.Conv2d(dim, dim, sr, sr), nn.LayerNorm(dim), hw, dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q = self.q(x)
        r = self.sr(x.transpose(1, 2).reshape(b, c, self.hw, self.hw)).flatten(2).transpose(1, 2)
        k, v = self.kv(self.norm(r)).chunk(2, -1)
        return self.proj(torch.softmax(q @ k.transpose(1, 2), -1) @ v)


def test_sra_formula_vs_counter_on_plain_ops():
    dim, sr, hw = 32, 4, 16
    m = _ToySRA(dim, sr, hw)
    x = torch.randn(1, hw * hw, dim)
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        m(x)
    cost = spatial_reduction_attention_cost(dim, 1, hw, hw, sr_ratio=sr)
    assert fc.get_total_flops() // 2 == cost.macs
    assert cost.params == numel(m)


# ---------------------------------------------------------------------------------------------------- the walker
def test_walker_attributes_every_parameter_once_and_logs_unknown(caplog):
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), Odd(), nn.BatchNorm2d(4))
    model.register_parameter("extra", nn.Parameter(torch.zeros(5)))
    tied = nn.Linear(4, 4)
    model.append(nn.AdaptiveAvgPool2d(1)).append(nn.Flatten(1)).append(tied).append(tied)  # params once, MACs twice
    with caplog.at_level(logging.WARNING, logger="acmix.analysis.walk"):
        mc = walk(model, 6)
    assert mc.params == numel(model)
    assert "no cost rule for 1" in caplog.text
    lin = [m for m in mc.modules if m.kind == "linear"]
    assert len(lin) == 1 and lin[0].calls == 2 and lin[0].cost.macs == 2 * 4 * 4


def test_stage_names():
    assert stage_of("layer3.2.conv2") == "stage3"
    assert stage_of("layers.0.blocks.1.attn") == "stage1"
    assert stage_of("block4.0.attn") == "stage4"
    assert stage_of("conv1") is None and stage_of("fc") is None


def test_fake_and_real_tracing_agree():
    model = timm.create_model("resnet26")
    fake, real = walk(model, 64), walk(model, 64, fake=False)
    assert fake.traced_with == "fake" and real.traced_with == "real"
    assert fake.macs == real.macs and fake.params == real.params == numel(model)


# ---------------------------------------------------------------------------------------------------- 99% / 83%
def test_resnet50_conv_stage_split_99_percent():
    model = timm.create_model("resnet50")
    mc = walk(model, 224)
    assert mc.params == numel(model) == 25_557_032
    total, _ = counter_macs(model, 224)
    assert mc.macs == total  # 4.09 GMACs, the number SAN's README rounds to 4.1 G
    split = mc.stage_split()
    assert split["positions"] == 16 and list(split["per_stage"]) == ["stage1", "stage2", "stage3", "stage4"]
    assert abs(100 * split["share_I"] - 99.0) <= 1.0  # paper: 99%; re-derivation 99.3%
    assert abs(100 * split["share_I"] - 99.3) <= 0.05


def _self_attention_resnet50(use_rel_pos: bool) -> nn.Module:
    """timm ResNet-50 with every bottleneck 3 x 3 conv swapped for k_att = 7 local self-attention (test-only)."""
    model = timm.create_model("resnet50")
    for block in model.modules():
        conv = getattr(block, "conv2", None)
        if isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3):
            block.conv2 = ACmix(
                conv.in_channels, conv.out_channels, stride=conv.stride[0], mix="attn", use_rel_pos=use_rel_pos
            )
    return model


@pytest.mark.parametrize("use_rel_pos", [False, True], ids=["table1_sa", "as_built_with_rel_pos"])
def test_resnet50_self_attention_stage_split_83_percent(use_rel_pos):
    model = _self_attention_resnet50(use_rel_pos)
    out = walk(model, 224, proj_at="output").stage_split()
    inp = walk(model, 224, proj_at="input").stage_split()
    assert out["positions"] == inp["positions"] == 16
    tol = 0.05 if not use_rel_pos else 0.2
    assert abs(100 * out["share_I"] - 82.0) <= tol  # docs/paper-numbers.md, output-resolution convention
    assert abs(100 * inp["share_I"] - 87.7) <= tol  # input resolution (what the official code computes)
    assert abs(100 * out["share_I"] - 83.0) <= 1.5  # the paper's (rounded) 83%
    assert abs(100 * inp["share_I"] - 83.0) > 3.0  # ... which the input-resolution convention does not give
    # Stage I grows in share with depth (wider C): paper Sec. 3.3
    shares = [v["share_I"] for v in out["per_stage"].values()]
    assert shares == sorted(shares)


# ---------------------------------------------------------------------------------------------------- SAN counter
def test_elementwise_convention_hand_computed():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2))
    plain, ew = walk(model, 6), walk(model, 6, elementwise=True)
    assert plain.macs == 27 * 8 * 36 and plain.params == ew.params == numel(model)
    # conv bias adds 8*36, BatchNorm 2 per element, ReLU 1 per element, max pool 1 per input element
    assert ew.macs - plain.macs == 8 * 36 + 2 * 8 * 36 + 8 * 36 + 8 * 36
    assert ew.by_component()[Component.ELEMENTWISE]["macs"] == 5 * 8 * 36


def test_san10_paper_macs_use_the_san_counter_convention():
    """SAN's README 1.9 G for SAN10 is its ptflops-style counter: multiply-adds alone round to 1.8 G."""
    model = timm.create_model("san10")
    plain, ew = walk(model, 224), walk(model, 224, elementwise=True)
    assert plain.params == numel(model)
    assert round(plain.macs / 1e9, 1) == 1.8 and round(ew.macs / 1e9, 1) == 1.9


# ---------------------------------------------------------------------------------------------------- model table
@pytest.mark.slow
def test_model_table_against_paper_and_released_code():
    """Every registered paper model at 224 x 224: params == numel, within 5% / 7% of the paper's params / MACs
    (README rounding; SAN's and PVT's own counters differ slightly), within 1% / 2% of the released-code counts of
    docs/official-code.md (conv path counted as FC + group conv, as the released code computes it)."""
    from acmix.analysis.report import model_rows

    skipped: list[str] = []
    rows = model_rows(check_counter=True, skipped=skipped)
    assert rows, skipped
    for r in rows:
        model = timm.create_model(r["name"])
        assert r["params"] == numel(model), r["name"]
        assert abs(r["params_diff_pct"]) <= 5.0, r
        assert abs(r["macs_diff_pct"]) <= 7.0, r
        assert r["counter_mismatches"] == 0, r
        if r.get("released_params"):
            assert abs(r["params"] / r["released_params"] - 1) <= 0.01, r
        if r.get("released_macs"):
            assert abs(r["macs_reference_conv_path"] / r["released_macs"] - 1) <= 0.02, r
        if r["family"] == "san" or r["role"] == "baseline" and r["family"] == "resnet":
            # SAN's README numbers, rounded to 0.1 G, are its counter's (multiply-adds + BN, ReLU, bias, pooling)
            assert round(r["macs_san_counter"] / 1e9, 1) == round(r["paper_macs"] / 1e9, 1), r


# ---------------------------------------------------------------------------------------------------- host layers
class _Tokens(nn.Module):
    """Feeds a (B, C, H, W) map to a token attention as (B, P + H W, C) with ``feat_size`` (test-only)."""

    def __init__(self, attn: nn.Module, prefix: int = 0) -> None:
        super().__init__()
        self.attn, self.prefix = attn, prefix

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)  # (B, HW, C)
        t = torch.cat([t.new_zeros(b, self.prefix, c), t], 1)  # (B, P + HW, C)
        return self.attn(t, (h, w), num_prefix_tokens=self.prefix)


class _Map(nn.Module):
    """Feeds a (B, C, H, W) map to a Swin ACmix attention as (B, H, W, C) (test-only)."""

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.attn = attn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x.permute(0, 2, 3, 1))


def _host_layer(kind: str, kwargs: dict) -> tuple[nn.Module, int, int]:
    """(model, in_chans, H): a host attention layer wrapped to take an image-like input."""
    if kind == "sra":
        mod = pytest.importorskip("acmix.layers.acmix_pvt")
        cls = mod.ACmixSpatialReductionAttention if kwargs.pop("acmix", False) else mod.SpatialReductionAttention
        prefix = kwargs.pop("prefix", 0)
        return _Tokens(cls(32, 2, **kwargs), prefix), 32, 12
    if kind == "san":
        mod = pytest.importorskip("acmix.layers.acmix_san")
        cls = mod.ACmixSanAttention if kwargs.pop("acmix", False) else mod.SanAttention
        return cls(32, 4, 16, share_planes=4, **kwargs), 32, 9
    mod = pytest.importorskip("acmix.layers.acmix_swin")
    return _Map(mod.ACmixWindowAttention(24, 3, window_size=7, **kwargs)), 24, 14


HOST_CASES = [
    ("sra", {"sr_ratio": 4}),
    ("sra", {"sr_ratio": 1, "prefix": 1}),
    ("sra", {"sr_ratio": 4, "acmix": True}),
    ("sra", {"sr_ratio": 2, "acmix": True, "conv_impl": "reference"}),
    ("san", {"sa_type": "patchwise"}),
    ("san", {"sa_type": "pairwise"}),
    ("san", {"sa_type": "patchwise", "acmix": True}),
    ("san", {"sa_type": "pairwise", "acmix": True, "conv_impl": "reference"}),
    ("swin", {}),
    ("swin", {"conv_impl": "reference"}),
    ("swin", {"mix": "attn"}),
    ("swin", {"mix": "conv"}),
]


@pytest.mark.parametrize("kind,kwargs", HOST_CASES, ids=lambda v: v if isinstance(v, str) else str(v))
def test_host_attention_rules_params_and_counter(kind, kwargs):
    model, in_chans, size = _host_layer(kind, dict(kwargs))
    mc = walk(model, size, in_chans=in_chans)
    assert mc.params == numel(model)
    costed = [m for m in mc.modules if m.kind not in ("norm", "other", "linear", "conv")]
    assert len(costed) == 1 and costed[0].is_mixer is False  # no model stage: not a mixer position
    cc = cross_check(model, size, model_cost=mc)
    assert not cc.mismatches and cc.counter_macs == cc.analytic_visible_macs, cc.to_dict()
    comp = mc.by_component()
    assert comp[Component.PROJECTION]["macs"] > 0
    if kwargs.get("acmix") or kind == "swin":
        assert comp[Component.SHIFT_CONV]["params"] > 0
        if kwargs.get("mix") != "attn":
            assert comp[Component.SHIFT_CONV]["macs"] > 0


def test_sra_and_swin_rules_read_the_call():
    # the SRA rule takes feat_size / num_prefix_tokens from the call: the logits cover P + HW queries
    model, c, size = _host_layer("sra", {"sr_ratio": 1, "prefix": 1})
    logits = walk(model, size, in_chans=c).by_component()[Component.ATTN_LOGITS]["macs"]
    assert logits == (size * size + 1) ** 2 * 32
    # the Swin ACmix rule pads the attention to the window and runs the conv path on the unpadded map
    swin = pytest.importorskip("acmix.layers.acmix_swin").ACmixWindowAttention(24, 3, window_size=7)
    got = walk(_Map(swin), 14, in_chans=24).total
    assert got.macs == window_attention_cost(24, 3, 7, 14, 14, acmix=True, conv_impl="fused").macs
