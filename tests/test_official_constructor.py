"""acmix.ACmix as a drop-in for the official class: its positional order, its keywords, its dilation argument."""

from __future__ import annotations

import pytest
import torch

from _official import OfficialACmix
from acmix import ACmix


def _perturb(module: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return module


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(lambda: ACmix(16, 32, 7, 4, 3, 2, 1), id="positional"),
        pytest.param(lambda: ACmix(16, 32, kernel_att=7, head=4, kernel_conv=3, stride=2, dilation=1), id="keywords"),
        pytest.param(
            lambda: ACmix(in_planes=16, out_planes=32, kernel_att=7, head=4, kernel_conv=3, stride=2), id="all-keywords"
        ),
    ],
)
def test_official_signature_builds_the_same_layer_as_ours(build, fresh_seed):
    torch.manual_seed(fresh_seed)
    official_style = build()
    torch.manual_seed(fresh_seed)
    ours = ACmix(16, 32, stride=2, num_heads=4, attn_kernel_size=7, conv_kernel_size=3)
    assert (official_style.dim, official_style.dim_out, official_style.stride) == (16, 32, 2)
    assert (official_style.num_heads, official_style.attn_kernel_size, official_style.conv_kernel_size) == (4, 7, 3)
    for (k1, v1), (k2, v2) in zip(official_style.state_dict().items(), ours.state_dict().items(), strict=True):
        assert k1 == k2 and torch.equal(v1, v2)


def test_code_written_for_the_official_class_runs_unchanged(fresh_seed):
    """The official call from the issue, with the official class's state dict: same numbers as the official code."""
    torch.manual_seed(fresh_seed)
    official = _perturb(OfficialACmix(16, 32, 7, 4, 3, 2)).eval()
    layer = ACmix(16, 32, kernel_att=7, head=4, kernel_conv=3, stride=2, dilation=1).eval()
    layer.load_state_dict(official.state_dict())
    x = torch.randn(2, 16, 12, 10)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), official(x), atol=1e-5, rtol=1e-4)


def test_official_defaults():
    layer = ACmix(in_planes=8, out_planes=8)
    assert (layer.attn_kernel_size, layer.num_heads, layer.conv_kernel_size, layer.stride) == (7, 4, 3, 1)
    assert ACmix(8).dim_out == 8


@pytest.mark.parametrize(
    "kwargs,names",
    [
        (dict(dim=8, in_planes=8), ("dim", "in_planes")),
        (dict(dim=8, dim_out=8, out_planes=8), ("dim_out", "out_planes")),
        (dict(dim=8, num_heads=2, head=2), ("num_heads", "head")),
        (dict(dim=8, attn_kernel_size=5, kernel_att=5), ("attn_kernel_size", "kernel_att")),
        (dict(dim=8, conv_kernel_size=3, kernel_conv=3), ("conv_kernel_size", "kernel_conv")),
    ],
)
def test_a_value_under_both_names_is_an_error(kwargs, names):
    with pytest.raises(TypeError, match=f"both {names[0]}=.*official alias {names[1]}="):
        ACmix(**kwargs)


def test_stride_given_twice_is_pythons_error():
    with pytest.raises(TypeError, match="multiple values for argument 'stride'"):
        ACmix(8, 8, 7, 4, 3, 2, stride=2)  # type: ignore[misc]


def test_missing_input_channels():
    with pytest.raises(TypeError, match=r"dim \(official name: in_planes\)"):
        ACmix(out_planes=8)


@pytest.mark.parametrize("dilation", [2, 3])
def test_dilation_other_than_one_is_refused(dilation):
    with pytest.raises(ValueError, match=f"dilation=1 only, got dilation={dilation}.*docs/deviations.md"):
        ACmix(8, 8, 7, 4, 3, 1, dilation)
    with pytest.raises(ValueError, match="dilation=1 only"):
        ACmix(in_planes=8, out_planes=8, dilation=dilation)


def test_official_argument_values_are_still_checked():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        ACmix(8, 8, head=3)
    with pytest.raises(ValueError, match="attn_kernel_size must be a positive odd int"):
        ACmix(8, kernel_att=4)
