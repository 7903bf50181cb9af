from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from _utils import bounce, naive_local_attention
from acmix import ops
from acmix.ops import conv_path, conv_path_reference, local_attention, local_attention_reference, shift_kernels
from acmix.ops._indexing import multiplicity, reflect_pad2d, window_indices
from acmix.ops._reference import conv_path_features, shift_sum_reference


@pytest.mark.parametrize("h,w,pad", [(4, 4, 3), (5, 9, 3), (7, 4, 2), (2, 3, 1), (10, 10, 3)])
def test_reflect_pad_matches_torch_where_defined(h, w, pad):
    x = torch.randn(2, 3, h, w)
    torch.testing.assert_close(reflect_pad2d(x, pad), F.pad(x, (pad,) * 4, mode="reflect"), atol=0, rtol=0)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7])
def test_reflect_index_extends_to_small_maps(n):
    idx = window_indices(n, 7, 1)
    expected = torch.tensor([[bounce(y - 3 + t, n) for t in range(7)] for y in range(n)])
    assert torch.equal(idx, expected)
    counts = multiplicity(n, 7, 1)
    assert counts.shape == (n, n) and bool((counts.sum(1) == 7).all())


@pytest.mark.parametrize(
    "shape,k,stride,use_pos",
    [
        ((1, 2, 3, 5, 6), 3, 1, True),
        ((2, 1, 2, 4, 4), 7, 1, True),
        ((1, 2, 2, 5, 7), 5, 2, True),
        ((1, 1, 3, 1, 1), 7, 1, True),
        ((1, 1, 2, 2, 3), 7, 2, False),
        ((1, 1, 2, 1, 6), 3, 2, True),
    ],
)
def test_reference_matches_naive_loops(shape, k, stride, use_pos):
    q, kk, v = (torch.randn(shape, dtype=torch.float64) for _ in range(3))
    pos = torch.randn(shape[2:], dtype=torch.float64) if use_pos else None
    got = local_attention_reference(q, kk, v, k, stride, pos)
    want = naive_local_attention(q, kk, v, k, stride, pos)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


def test_one_by_one_map_returns_values():
    q, k, v = (torch.randn(2, 4, 8, 1, 1) for _ in range(3))
    torch.testing.assert_close(local_attention(q, k, v, kernel_size=7, backend="reference"), v)


@pytest.mark.parametrize("stride", [1, 2])
def test_reference_gradcheck_float64(stride):
    q, k, v = (torch.randn(1, 2, 2, 5, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    pos = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: local_attention_reference(*t[:3], 3, stride, t[3]), (q, k, v, pos))


def test_position_term_is_a_key_offset():
    """docs/derived-facts.md: q_i . (k_j + p_i - p_j) gives the same softmax as q_i . (k_j - p_j)."""
    q, k, v = (torch.randn(2, 2, 4, 6, 5, dtype=torch.float64) for _ in range(3))
    pos = torch.randn(4, 6, 5, dtype=torch.float64)
    a = local_attention_reference(q, k, v, 5, 1, pos)
    b = local_attention_reference(q, k - pos, v, 5, 1, None)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("kc", [3, 5])
@pytest.mark.parametrize("use_bias", [False, True])
@pytest.mark.parametrize("hw", [(6, 6), (7, 5), (1, 1), (2, 3)])
def test_conv_path_fused_matches_reference(stride, kc, use_bias, hw):
    n, c = 2, 8
    q, k, v = (torch.randn(2, c, *hw, dtype=torch.float64, requires_grad=True) for _ in range(3))
    fc = torch.randn(kc * kc, 3 * n, dtype=torch.float64, requires_grad=True)
    gw = torch.randn(c, kc * kc, kc, kc, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(kc * kc, dtype=torch.float64, requires_grad=True) if use_bias else None
    inputs = [q, k, v, fc, gw] + ([bias] if use_bias else [])

    def run(impl):
        out = conv_path(q, k, v, n, fc, gw, bias, stride, impl=impl)
        grads = torch.autograd.grad((out * torch.linspace(0, 1, out.numel()).view_as(out)).sum(), inputs)
        return out, grads

    out_f, grads_f = run("fused")
    out_r, grads_r = run("reference")
    assert out_f.shape == (2, c, -(-hw[0] // stride), -(-hw[1] // stride))
    torch.testing.assert_close(out_f, out_r)
    for gf, gr in zip(grads_f, grads_r):
        torch.testing.assert_close(gf, gr)


@pytest.mark.parametrize("kc,stride", [(3, 1), (5, 1), (3, 2)])
def test_shift_as_group_conv_equals_tensor_shifts(kc, stride):
    """Fig. 3 (a) vs (b)/(c) at shift initialisation: Eq. (3)-(4)."""
    n, c = 2, 6
    q, k, v = (torch.randn(1, c, 7, 6, dtype=torch.float64) for _ in range(3))
    fc = torch.randn(kc * kc, 3 * n, dtype=torch.float64)
    gw = shift_kernels(kc, torch.float64).unsqueeze(0).expand(c, -1, -1, -1)
    via_conv = conv_path_reference(q, k, v, n, fc, None, gw, stride)
    via_shift = shift_sum_reference(conv_path_features(torch.cat([q, k, v], 1), c // n, fc), kc, n, stride)
    torch.testing.assert_close(via_conv, via_shift)


def test_conv_path_is_a_decomposed_convolution():
    """With shift kernels the path equals a plain k x k conv of the FC maps (Eq. (2)-(4))."""
    f = torch.randn(1, 9, 6, 6, dtype=torch.float64)  # one head_dim group, k2 = 9 maps
    out = shift_sum_reference(f, 3, 1)
    direct = F.conv2d(f, shift_kernels(3, torch.float64).unsqueeze(0), padding=1)
    torch.testing.assert_close(out, direct)


def test_unknown_backend_lists_valid_ones():
    q = torch.randn(1, 1, 2, 3, 3)
    with pytest.raises(ValueError, match="valid backends: .*reference"):
        local_attention(q, q, q, 3, backend="nope")


def test_env_backend_override(monkeypatch):
    q = torch.randn(1, 1, 2, 3, 3)
    monkeypatch.setenv("ACMIX_BACKEND", "bogus")
    with pytest.raises(ValueError, match="unknown backend 'bogus'"):
        local_attention(q, q, q, 3)
    monkeypatch.setenv("ACMIX_BACKEND", "reference")
    assert ops.choose_backend(q).name == "reference"


def test_dispatch_logs_choice(caplog):
    q = torch.randn(1, 1, 2, 3, 3)
    with caplog.at_level("DEBUG", logger="acmix"):
        local_attention(q, q, q, 3)
    assert any("backend" in r.getMessage() for r in caplog.records)


def test_every_backend_is_listed_and_reference_always_runs():
    names = ops.available_backends()
    assert "reference" in names
    status = {n: ok for n, ok, _ in ops.backend_status()}
    assert status["reference"]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(q=torch.randn(2, 3, 4, 4)), "5-D"),
        (dict(q=torch.randint(0, 3, (1, 1, 2, 3, 3))), "floating-point"),
        (dict(k=torch.randn(1, 1, 2, 3, 4)), "k must have the shape"),
        (dict(v=torch.randn(1, 1, 2, 3, 3, dtype=torch.float64)), "dtype"),
        (dict(kernel_size=4), "odd"),
        (dict(stride=0), "stride"),
        (dict(rel_pos=torch.randn(2, 4, 4)), "rel_pos must be"),
    ],
)
def test_local_attention_errors(kwargs, match):
    base = dict(q=torch.randn(1, 1, 2, 3, 3), k=torch.randn(1, 1, 2, 3, 3), v=torch.randn(1, 1, 2, 3, 3))
    base.update(kwargs)
    args = {
        "kernel_size": base.pop("kernel_size", 3),
        "stride": base.pop("stride", 1),
        "rel_pos": base.pop("rel_pos", None),
    }
    with pytest.raises(ValueError, match=match):
        local_attention(base["q"], base["k"], base["v"], **args)


def test_conv_path_errors():
    q = torch.randn(1, 8, 4, 4)
    fc, gw = torch.randn(9, 6), torch.randn(8, 9, 3, 3)
    with pytest.raises(ValueError, match="divisible"):
        conv_path(q, q, q, 3, fc, gw)
    with pytest.raises(ValueError, match="group_weight must be"):
        conv_path(q, q, q, 2, fc, torch.randn(8, 9, 3, 2))
    with pytest.raises(ValueError, match="fc_weight must be"):
        conv_path(q, q, q, 2, torch.randn(9, 5), gw)
    with pytest.raises(ValueError, match="unknown conv path impl"):
        conv_path(q, q, q, 2, fc, gw, impl="x")


def _naive_aggregate(x, weight, k, stride):
    b, c, h, w = x.shape
    wc = weight.shape[1]
    ho, wo = -(-h // stride), -(-w // stride)
    out = torch.zeros(b, c, ho, wo, dtype=x.dtype)
    for bi in range(b):
        for ci in range(c):
            for y in range(ho):
                for xx in range(wo):
                    acc = 0.0
                    for t in range(k * k):
                        r = bounce(y * stride - k // 2 + t // k, h)
                        cc = bounce(xx * stride - k // 2 + t % k, w)
                        acc = acc + weight[bi, ci % wc, t, y, xx] * x[bi, ci, r, cc]
                    out[bi, ci, y, xx] = acc
    return out


@pytest.mark.parametrize(
    "shape,wc,k,stride", [((1, 4, 5, 6), 2, 3, 1), ((2, 6, 4, 4), 3, 7, 1), ((1, 4, 5, 3), 4, 3, 2)]
)
def test_local_aggregate_matches_naive(shape, wc, k, stride):
    from acmix.ops import local_aggregate

    x = torch.randn(shape, dtype=torch.float64)
    ho, wo = -(-shape[2] // stride), -(-shape[3] // stride)
    weight = torch.randn(shape[0], wc, k * k, ho, wo, dtype=torch.float64)
    torch.testing.assert_close(local_aggregate(x, weight, k, stride), _naive_aggregate(x, weight, k, stride))


def test_local_aggregate_errors():
    from acmix.ops import local_aggregate

    x = torch.randn(1, 4, 5, 5)
    with pytest.raises(ValueError, match="weight must be"):
        local_aggregate(x, torch.randn(1, 2, 9, 4, 5), 3)
    with pytest.raises(ValueError, match="divisible"):
        local_aggregate(x, torch.randn(1, 3, 9, 5, 5), 3)
    with pytest.raises(ValueError, match="4-D"):
        local_aggregate(x[0], torch.randn(1, 2, 9, 5, 5), 3)
