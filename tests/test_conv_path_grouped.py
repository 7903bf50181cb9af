"""The copy-free route for the ACmix layer: projection in grouped order, conv path and attention views on one map."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from _grouped_route import grouped_layer_forward
from acmix.layers import ACmix
from acmix.ops import conv_path
from acmix.ops._reference import conv_path_reference
from acmix.ops.conv_path import compose_weight, conv_path_grouped, grouped_qkv_order, split_grouped_qkv


def test_permuted_projection_writes_the_grouped_order():
    n, d, cin = 3, 4, 5
    w, b = torch.randn(3 * n * d, cin, 1, 1, dtype=torch.float64), torch.randn(3 * n * d, dtype=torch.float64)
    x = torch.randn(2, cin, 4, 3, dtype=torch.float64)
    perm = grouped_qkv_order(n, d)
    assert sorted(perm.tolist()) == list(range(3 * n * d))
    torch.testing.assert_close(F.conv2d(x, w[perm], b[perm]), F.conv2d(x, w, b)[:, perm])
    # and it is the order conv_path_grouped documents: channel d * 3N + t * N + j holds t * C + j * D + d
    for dd in range(d):
        for t in range(3):
            for j in range(n):
                assert perm[dd * 3 * n + t * n + j] == t * n * d + j * d + dd


@settings(max_examples=8)
@given(
    heads=st.integers(1, 3),
    head_dim=st.integers(1, 4),
    hw=st.tuples(st.integers(1, 7), st.integers(1, 7)),
    stride=st.integers(1, 2),
    fc_bias=st.booleans(),
    kc=st.sampled_from([1, 3, 5]),
)
def test_grouped_route_equals_the_reference_conv_path(heads, head_dim, hw, stride, fc_bias, kc):
    c = heads * head_dim
    x = torch.randn(2, 3 * c, *hw, dtype=torch.float64)  # projection order [q | k | v]
    q, k, v = x.chunk(3, 1)
    fc_w = torch.randn(kc * kc, 3 * heads, dtype=torch.float64)
    bias = torch.randn(kc * kc, dtype=torch.float64) if fc_bias else None
    gw = torch.randn(c, kc * kc, kc, kc, dtype=torch.float64)
    want = conv_path_reference(q, k, v, heads, fc_w, bias, gw, stride)
    xg = x[:, grouped_qkv_order(heads, head_dim)]
    torch.testing.assert_close(conv_path_grouped(xg, compose_weight(fc_w, gw), heads, bias, gw, stride), want)
    # the attention views of the grouped map are q, k, v themselves, without a copy
    qg, kg, vg = split_grouped_qkv(xg, heads)
    for view, t in zip((qg, kg, vg), (q, k, v)):
        assert view.untyped_storage().data_ptr() == xg.untyped_storage().data_ptr()
        torch.testing.assert_close(view, t.reshape(2, heads, head_dim, *hw))


@pytest.mark.parametrize("stride,channels_last", [(1, False), (2, True)])
def test_layer_through_the_grouped_route_matches_the_layer(stride, channels_last, fresh_seed):
    """Output and every gradient equal ACmix.forward (float64, default backend): the route the layer can adopt."""
    layer = ACmix(8, 16, stride=stride, num_heads=2).double()
    with torch.no_grad():
        layer.alpha.fill_(0.7)  # distinct alpha / beta so a swapped path would show
        layer.beta.fill_(0.4)
    x = torch.randn(2, 8, 7, 6, dtype=torch.float64)
    if channels_last:
        layer = layer.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)

    def run(fn):
        layer.zero_grad()
        xi = x.clone().requires_grad_(True)
        out = fn(xi)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        return out.detach(), xi.grad, {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}

    out_g, gx_g, gp_g = run(lambda xi: grouped_layer_forward(layer, xi))
    out_l, gx_l, gp_l = run(layer)
    torch.testing.assert_close(out_g, out_l)
    torch.testing.assert_close(gx_g, gx_l)
    assert gp_g.keys() == gp_l.keys()
    for name in gp_l:
        torch.testing.assert_close(gp_g[name], gp_l[name], msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("fc_bias", [False, True])
def test_fused_conv_path_keeps_channels_last(fc_bias):
    """q/k/v sliced from a channels_last projection: the fused path stays channels_last (NHWC grouped conv)."""
    heads, head_dim, hw = 2, 4, (7, 6)
    c = heads * head_dim
    x = torch.randn(2, 3 * c, *hw, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    q, k, v = x.chunk(3, 1)
    fc_w = torch.randn(9, 3 * heads, dtype=torch.float64)
    bias = torch.randn(9, dtype=torch.float64) if fc_bias else None
    gw = torch.randn(c, 9, 3, 3, dtype=torch.float64)
    got = conv_path(q, k, v, heads, fc_w, gw, bias, stride=2)
    want = conv_path_reference(q.contiguous(), k.contiguous(), v.contiguous(), heads, fc_w, bias, gw, 2)
    torch.testing.assert_close(got, want)
    assert got.is_contiguous(memory_format=torch.channels_last)
    nchw = conv_path(*(t.contiguous() for t in (q, k, v)), heads, fc_w, gw, bias, stride=2)
    torch.testing.assert_close(nchw, want)
