from __future__ import annotations

import pytest
import torch

from _official import OfficialACmix
from acmix import ACmix
from acmix.ops import shift_kernels


def _randomise(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.3)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("cin,cout,hw", [(16, 16, (12, 10)), (8, 24, (8, 8)), (32, 32, (6, 14))])
def test_loads_official_state_dict_and_matches(stride, cin, cout, hw):
    official = OfficialACmix(cin, cout, stride=stride)
    _randomise(official)
    ours = ACmix(cin, cout, stride=stride)
    ours.load_state_dict(official.state_dict())
    x = torch.randn(2, cin, *hw)
    with torch.no_grad():
        want, got = official(x), ours(x)
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 1e-5


def test_official_keys_load_inside_a_parent_module():
    parent_off = torch.nn.Sequential(OfficialACmix(8, 8))
    _randomise(parent_off)
    parent = torch.nn.Sequential(ACmix(8, 8))
    parent.load_state_dict(parent_off.state_dict())
    x = torch.randn(1, 8, 9, 9)
    torch.testing.assert_close(parent(x), parent_off(x), atol=1e-5, rtol=1e-5)


def test_own_state_dict_round_trip():
    a = ACmix(16, stride=2)
    _randomise(a)
    b = ACmix(16, stride=2)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 16, 7, 7)
    torch.testing.assert_close(a(x), b(x), atol=0, rtol=0)
    assert set(a.state_dict()) == {
        "qkv.weight",
        "qkv.bias",
        "pos_proj.weight",
        "pos_proj.bias",
        "fc.weight",
        "shift_weight",
        "alpha",
        "beta",
    }


def test_official_nonzero_group_bias_is_refused():
    sd = OfficialACmix(8, 8).state_dict()
    sd["dep_conv.bias"] = torch.ones(8)
    with pytest.raises(ValueError, match="dep_conv.bias"):
        ACmix(8, 8).load_state_dict(sd)


def test_official_distinct_kernels_need_group_mode():
    official = OfficialACmix(8, 8)
    _randomise(official)
    with pytest.raises(ValueError, match="shift_mode='group'"):
        ACmix(8, 8, shift_mode="learnable").load_state_dict(official.state_dict())
    ACmix(8, 8, shift_mode="learnable").load_state_dict(OfficialACmix(8, 8).state_dict())  # shift init: fine


def test_alpha_zero_is_conv_path_and_beta_zero_is_attention_path():
    layer = ACmix(16)
    _randomise(layer)
    x = torch.randn(2, 16, 9, 9)
    q, k, v = layer.qkv(x).chunk(3, 1)
    with torch.no_grad():
        layer.alpha.zero_()
        layer.beta.fill_(1.0)
        torch.testing.assert_close(layer(x), layer.convolution_path(q, k, v))
        layer.alpha.fill_(1.0)
        layer.beta.zero_()
        torch.testing.assert_close(layer(x), layer.attention_path(q, k, v))


def test_mix_modes():
    x = torch.randn(1, 8, 6, 6)
    full = ACmix(8, alpha_init=0.3, beta_init=0.9)
    for mode in ("attn", "conv", "fixed"):
        other = ACmix(8, mix=mode, alpha_init=0.3, beta_init=0.9)
        other.load_state_dict(full.state_dict(), strict=False)
        q, k, v = full.qkv(x).chunk(3, 1)
        want = {
            "attn": full.attention_path(q, k, v),
            "conv": full.convolution_path(q, k, v),
            "fixed": full(x),
        }[mode]
        torch.testing.assert_close(other(x), want)
    fixed = ACmix(8, mix="fixed")
    assert "alpha" not in dict(fixed.named_parameters()) and "alpha" in dict(fixed.named_buffers())
    assert not hasattr(ACmix(8, mix="attn"), "alpha")


@pytest.mark.parametrize("kc", [3, 5])
def test_shift_variants_agree_at_initialisation(kc):
    """Fig. 3: a (tensor shifts), b (fixed kernels), c-I, c-II and c-III all compute Eq. (4) at shift init."""
    torch.manual_seed(1)
    base = ACmix(12, num_heads=3, conv_kernel_size=kc, mix="conv")
    x = torch.randn(2, 12, 7, 8)
    want = base(x)
    for mode in ("tensor", "fixed", "frozen", "learnable", "a", "b", "c1", "c2", "c3"):
        other = ACmix(12, num_heads=3, conv_kernel_size=kc, mix="conv", shift_mode=mode)
        shared = {k: v for k, v in base.state_dict().items() if k != "shift_weight"}
        other.load_state_dict(shared, strict=False)
        torch.testing.assert_close(other(x), want, msg=mode)


def test_shift_variant_parameters():
    k2 = 9
    assert ACmix(16, shift_mode="group").shift_weight.shape == (16, k2, 3, 3)
    assert ACmix(16, shift_mode="learnable").shift_weight.shape == (4, k2, 3, 3)
    assert not ACmix(16, shift_mode="frozen").shift_weight.requires_grad
    assert ACmix(16, shift_mode="fixed").shift_weight is None
    assert ACmix(16, shift_mode="tensor").group_weight() is None


def test_shift_init_can_be_overwritten():
    kept = ACmix(16)
    torch.testing.assert_close(kept.shift_weight, shift_kernels(3).expand(16, -1, -1, -1))
    kaiming = ACmix(16, shift_init=False)
    assert not torch.equal(kaiming.shift_weight, kept.shift_weight)
    assert abs(kaiming.shift_weight.std().item() - (2 / (16 * 9)) ** 0.5) < 0.05


@pytest.mark.parametrize(
    "hw,stride",
    [((1, 1), 1), ((1, 1), 2), ((1, 5), 1), ((2, 3), 1), ((3, 3), 2), ((7, 5), 2), ((9, 13), 2), ((4, 4), 3)],
)
def test_any_map_size_and_stride(hw, stride):
    layer = ACmix(8, 16, stride=stride, num_heads=2)
    y = layer(torch.randn(3, 8, *hw))
    assert y.shape == (3, 16, -(-hw[0] // stride), -(-hw[1] // stride))
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("k_att,k_conv", [(3, 3), (5, 1), (9, 5), (1, 7)])
def test_kernel_sizes(k_att, k_conv):
    y = ACmix(8, attn_kernel_size=k_att, conv_kernel_size=k_conv)(torch.randn(1, 8, 6, 5))
    assert y.shape == (1, 8, 6, 5)


def test_gradients_reach_every_parameter():
    for mode in ("group", "learnable", "tensor"):
        layer = ACmix(8, stride=2, shift_mode=mode)
        x = torch.randn(2, 8, 7, 7, requires_grad=True)
        layer(x).square().sum().backward()
        assert x.grad is not None
        for name, p in layer.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), (mode, name)


def test_float64_and_gradcheck():
    layer = ACmix(4, num_heads=2, attn_kernel_size=3).double()
    x = torch.randn(1, 4, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_low_precision(dtype):
    layer = ACmix(16)
    x = torch.randn(2, 16, 10, 10)
    want = layer(x)
    with torch.autocast("cpu", dtype=dtype):
        got = layer(x)
    assert got.dtype == dtype
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), want, atol=0.1, rtol=0.1)


def test_half_module_without_autocast():
    layer = ACmix(16).to(torch.bfloat16)
    y = layer(torch.randn(2, 16, 6, 6, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()


def test_channels_last_input_gives_same_result():
    layer = ACmix(16, stride=2)
    x = torch.randn(2, 16, 9, 10)
    torch.testing.assert_close(layer(x.contiguous(memory_format=torch.channels_last)), layer(x))


def test_eval_is_deterministic():
    layer = ACmix(16).eval()
    x = torch.randn(2, 16, 8, 8)
    assert torch.equal(layer(x), layer(x))


def test_meta_device_and_buffers_follow_module():
    layer = ACmix(8, shift_mode="fixed").to(torch.float64)
    assert layer.shift_buffer.dtype == torch.float64
    y = layer(torch.randn(1, 8, 5, 5, dtype=torch.float64))
    assert y.dtype == torch.float64


def test_torch_compile():
    layer = ACmix(8, num_heads=2)
    x = torch.randn(1, 8, 6, 6)
    compiled = torch.compile(layer, backend="eager", fullgraph=False)
    torch.testing.assert_close(compiled(x), layer(x))


@pytest.mark.parametrize(
    "make,x,match",
    [
        (lambda: ACmix(8), torch.randn(8, 6, 6), "4-D"),
        (lambda: ACmix(8), torch.randn(1, 4, 6, 6), "8 input channels, got 4"),
        (lambda: ACmix(8), torch.zeros(1, 8, 6, 6, dtype=torch.int64), "floating-point"),
        (lambda: ACmix(8), torch.randn(0, 8, 6, 6), "non-empty"),
        (lambda: ACmix(8), [1, 2], "torch.Tensor"),
    ],
)
def test_forward_errors(make, x, match):
    with pytest.raises(ValueError, match=match):
        make()(x)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(dim=10), "divisible by num_heads"),
        (dict(attn_kernel_size=6), "attn_kernel_size must be a positive odd int, got 6"),
        (dict(conv_kernel_size=2), "conv_kernel_size must be a positive odd int, got 2"),
        (dict(stride=0), "stride"),
        (dict(shift_mode="d"), "shift_mode"),
        (dict(mix="both"), "mix"),
        (dict(num_heads=0), "num_heads"),
    ],
)
def test_constructor_errors(kwargs, match):
    args = dict(dim=8)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        ACmix(**args)


def test_compiles_without_graph_breaks():
    torch._dynamo.reset()
    explain = torch._dynamo.explain(ACmix(16, num_heads=2))(torch.randn(1, 16, 8, 8))
    assert explain.graph_break_count == 0, [str(b.reason) for b in explain.break_reasons]


def test_export_then_eager_on_a_fresh_shape():
    """Tracing must not leave traced (fake) tensors in any backend cache that a later eager call would reuse."""
    layer = ACmix(16, num_heads=2).eval()
    x = torch.randn(1, 16, 13, 11)  # a shape no other test uses, so the first plan is built while exporting
    exported = torch.export.export(layer, (x,))
    with torch.no_grad():
        eager = layer(x)
        assert type(eager) is torch.Tensor
        torch.testing.assert_close(exported.module()(x), eager)
