"""The copy-free route of the ACmix layer: the projection emits the group order, the fused conv path reads it as it
is, and q, k, v are strided views of it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from acmix.layers import ACmix
from acmix.ops import conv_path, conv_path_maps, local_attention, use_backend
from acmix.ops._reference import conv_path_reference
from acmix.ops.conv_path import group_order


def test_permuted_projection_writes_the_group_order():
    n, d, cin = 3, 4, 5
    w, b = torch.randn(3 * n * d, cin, 1, 1, dtype=torch.float64), torch.randn(3 * n * d, dtype=torch.float64)
    x = torch.randn(2, cin, 4, 3, dtype=torch.float64)
    perm = group_order(3 * n, d)
    assert sorted(perm.tolist()) == list(range(3 * n * d))
    torch.testing.assert_close(F.conv2d(x, w[perm], b[perm]), F.conv2d(x, w, b)[:, perm])
    # channel d * 3N + t * N + j holds t * C + j * D + d (t in q, k, v; j the head)
    for dd in range(d):
        for t in range(3):
            for j in range(n):
                assert perm[dd * 3 * n + t * n + j] == t * n * d + j * d + dd


@given(
    heads=st.integers(1, 3),
    head_dim=st.integers(1, 4),
    hw=st.tuples(st.integers(1, 7), st.integers(1, 7)),
    stride=st.integers(1, 2),
    fc_bias=st.booleans(),
    kc=st.sampled_from([1, 3, 5]),
    impl=st.sampled_from(["fused", "reference"]),
)
def test_group_order_equals_the_reference_conv_path(heads, head_dim, hw, stride, fc_bias, kc, impl):
    c = heads * head_dim
    x = torch.randn(2, 3 * c, *hw, dtype=torch.float64)  # projection order [q | k | v]
    q, k, v = x.chunk(3, 1)
    fc_w = torch.randn(kc * kc, 3 * heads, dtype=torch.float64)
    bias = torch.randn(kc * kc, dtype=torch.float64) if fc_bias else None
    gw = torch.randn(c, kc * kc, kc, kc, dtype=torch.float64)
    want = conv_path_reference(q, k, v, heads, fc_w, bias, gw, stride)
    xg = x[:, group_order(3 * heads, head_dim)]
    torch.testing.assert_close(conv_path_maps(xg, head_dim, fc_w, gw, bias, stride, impl, order="groups"), want)


@pytest.mark.parametrize("stride,channels_last", [(1, False), (2, True)])
def test_layer_heads_are_views_and_the_layer_equals_the_plain_route(stride, channels_last, fresh_seed):
    """Output and every gradient of ACmix.forward (group-ordered projection, views) equal the plain route: [q | k | v]
    projection, attention on reshaped chunks, conv path on their concatenation (float64)."""
    layer = ACmix(8, 16, stride=stride, num_heads=2).double()
    with torch.no_grad():
        layer.alpha.fill_(0.7)  # distinct alpha / beta so a swapped path would show
        layer.beta.fill_(0.4)
    x = torch.randn(2, 8, 7, 6, dtype=torch.float64)
    if channels_last:
        layer = layer.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    qkv = layer.project(x)
    for view in layer.split_heads(qkv):
        assert view.untyped_storage().data_ptr() == qkv.untyped_storage().data_ptr()

    def plain(xi: torch.Tensor) -> torch.Tensor:
        q, k, v = layer.qkv(xi).chunk(3, 1)
        return layer.alpha * layer.attention_path(q, k, v) + layer.beta * layer.convolution_path(q, k, v)

    def run(fn):
        layer.zero_grad()
        xi = x.clone().requires_grad_(True)
        out = fn(xi)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        return out.detach(), xi.grad, {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}

    out_p, gx_p, gp_p = run(plain)
    out_l, gx_l, gp_l = run(layer)
    torch.testing.assert_close(out_l, out_p)
    torch.testing.assert_close(gx_l, gx_p)
    assert gp_p.keys() == gp_l.keys()
    for name in gp_l:
        torch.testing.assert_close(gp_l[name], gp_p[name], msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("backend", ["reference", "tiled", "offset"])
def test_backends_read_strided_heads(backend, fresh_seed):
    """q, k, v as strided views of one group-ordered map give the same attention as contiguous copies."""
    layer = ACmix(8, 12, num_heads=3).double()
    qkv = layer.project(torch.randn(2, 8, 6, 5, dtype=torch.float64))
    q, k, v = layer.split_heads(qkv)
    pos = layer.rel_pos(6, 5, q)
    with use_backend(attention=backend):
        got = local_attention(q, k, v, 5, 1, pos)
    want = local_attention(q.contiguous(), k.contiguous(), v.contiguous(), 5, 1, pos, backend="reference")
    torch.testing.assert_close(got, want)


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
    got = conv_path(q, k, v, heads, fc_w, gw, bias, stride=2, impl="fused")
    want = conv_path_reference(q.contiguous(), k.contiguous(), v.contiguous(), heads, fc_w, bias, gw, 2)
    torch.testing.assert_close(got, want)
    assert got.is_contiguous(memory_format=torch.channels_last)
    nchw = conv_path(*(t.contiguous() for t in (q, k, v)), heads, fc_w, gw, bias, stride=2, impl="fused")
    torch.testing.assert_close(nchw, want)
