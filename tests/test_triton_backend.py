"""The ``triton`` backends (local attention and SAN aggregation) against the float64 references, forward and backward.

Runs where the kernels can: on CUDA, or on the CPU in Triton's interpreter. The interpreter is chosen when Triton
decorates the kernels, so this module needs ``TRITON_INTERPRET=1`` in the environment before anything imports them;
the default suite runs it that way in a subprocess (``tests/test_triton_interpreter.py``). Shapes are tiny because
the interpreter executes every program instance in numpy.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from acmix import ops
from acmix.layers import ACmix
from acmix.ops import local_aggregate, local_aggregate_reference, local_attention, local_attention_reference
from acmix.ops._backends import triton_attention

DEVICE = "cuda" if torch.cuda.is_available() and not triton_attention.interpreter_requested() else "cpu"
_OK, _WHY = triton_attention.can_run_on(torch.empty(1, device=DEVICE))
pytestmark = [
    pytest.mark.skipif(not _OK, reason=f"triton backend cannot run here ({_WHY}); tests/test_triton_interpreter.py"),
    # the interpreter evaluates log2(0) = -inf (a key outside the window) in numpy, which warns
    pytest.mark.filterwarnings("ignore:divide by zero encountered in log2"),
]
warnings.filterwarnings("ignore", "divide by zero encountered in log2", RuntimeWarning)

#: (forward, backward) atol = rtol against the float64 reference of the same rounded inputs (the tolerances of
#: tests/test_backends.py); the Triton kernels measured well inside them (float32 ~1e-6, float16 ~2e-3, bf16 ~3e-2)
TOL = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (1e-2, 2e-2),
    torch.bfloat16: (5e-2, 1e-1),
}


def _qkv(shape, dtype, channels_last=False, with_pos=True):
    """q, k, v as strided views of one (B, 3C, H, W) projection (as in the layer), plus a (D, H, W) position map."""
    b, n, d, h, w = shape
    x = torch.randn(b, 3 * n * d, h, w, device=DEVICE).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    q, k, v = (t.reshape(shape) for t in x.chunk(3, 1))
    pos = torch.randn(d, h, w, device=DEVICE).to(dtype) if with_pos else None
    return q, k, v, pos


def _grads(fn, tensors):
    """Output and the gradients of a fixed random projection of it w.r.t. every tensor (None entries skipped)."""
    leaves = [None if t is None else t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    proj = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device, out.dtype)
    inputs = [t for t in leaves if t is not None]
    return out.detach(), list(torch.autograd.grad((out * proj).sum(), inputs))


def _check_attention(shape, kernel_size, stride, dtype, channels_last=False, with_pos=True, scale=None):
    q, k, v, pos = _qkv(shape, dtype, channels_last, with_pos)

    def fast(q, k, v, p):
        return local_attention(q, k, v, kernel_size, stride, p, scale, backend="triton")

    def ref(q, k, v, p):
        return local_attention_reference(q, k, v, kernel_size, stride, p, scale)

    got, got_g = _grads(fast, (q, k, v, pos))
    want, want_g = _grads(ref, [None if t is None else t.double().cpu() for t in (q, k, v, pos)])
    fwd, bwd = TOL[dtype]
    assert got.dtype == dtype and got.shape == want.shape
    torch.testing.assert_close(got.double().cpu(), want, atol=fwd, rtol=fwd)
    for name, a, b in zip(("dq", "dk", "dv", "drel_pos"), got_g, want_g):
        assert a.dtype == dtype and a.shape == b.shape, name
        torch.testing.assert_close(a.double().cpu(), b, atol=bwd, rtol=bwd, msg=lambda m, n=name: f"{n}: {m}")


# ------------------------------------------------------------------------------------------------- local attention
ATTENTION_CASES = [
    # (B, N, D, H, W), k, stride, channels_last
    ((1, 2, 16, 9, 11), 7, 1, False),  # odd, non-square, one query tile with a ragged edge
    ((2, 1, 16, 10, 7), 5, 2, True),  # stride 2, channels_last views
    ((1, 2, 16, 1, 1), 7, 1, False),  # 1 x 1 map: the output is v
    ((1, 1, 16, 2, 9), 7, 1, True),  # window larger than one axis only (repeated reflection on H)
    ((1, 1, 16, 3, 2), 7, 3, False),  # tiny map, stride 3
    ((1, 1, 24, 17, 9), 3, 2, False),  # head_dim not a power of two; two query tiles down H
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda c: f"{c[0]}-k{c[1]}-s{c[2]}{'-cl' if c[3] else ''}")
def test_attention_matches_reference(case, dtype, fresh_seed):
    shape, kernel_size, stride, channels_last = case
    _check_attention(shape, kernel_size, stride, dtype, channels_last)


@pytest.mark.parametrize("head_dim", [5, 128])
def test_attention_head_dims_outside_the_tile_sizes(head_dim, fresh_seed):
    """head_dim below 16 (zero-padded inside the kernel) and the largest one supported."""
    _check_attention((1, 1, head_dim, 5, 6), 3, 1, torch.float32)


@pytest.mark.parametrize("tiles", [((8, 8), (8, 8)), ((2, 8), (8, 2)), ((16, 4), (4, 4))], ids=str)
@pytest.mark.parametrize("stride", [1, 2])
def test_attention_every_tile_shape(tiles, stride, monkeypatch, fresh_seed):
    """The tile tables are tuning knobs (benchmarks/gpu_check.py sweeps them): every legal choice is exact."""
    monkeypatch.setitem(triton_attention.QUERY_TILES, stride, tiles[0])
    monkeypatch.setitem(triton_attention.KEY_TILES, stride, tiles[1])
    monkeypatch.setattr(triton_attention, "SMALL_MAP_TILE", (4, 4))
    _check_attention((1, 1, 16, 11, 13), 5, stride, torch.float32)


def test_attention_without_position_and_with_scale(fresh_seed):
    _check_attention((1, 2, 16, 6, 5), 5, 2, torch.float32, with_pos=False, scale=0.3)


def test_attention_per_batch_position_map(fresh_seed):
    """A 5-D rel_pos broadcast over heads gets its own (summed) gradient."""
    q, k, v, _ = _qkv((2, 2, 16, 5, 6), torch.float32)
    pos = torch.randn(2, 1, 16, 5, 6, device=DEVICE)
    got, got_g = _grads(lambda *t: local_attention(*t[:3], 5, 1, t[3], backend="triton"), (q, k, v, pos))
    want, want_g = _grads(
        lambda *t: local_attention_reference(*t[:3], 5, 1, t[3]), [t.double().cpu() for t in (q, k, v, pos)]
    )
    torch.testing.assert_close(got.double().cpu(), want, atol=1e-4, rtol=1e-4)
    for a, b in zip(got_g, want_g):
        assert a.shape == b.shape
        torch.testing.assert_close(a.double().cpu(), b, atol=1e-4, rtol=1e-4)


@settings(max_examples=6)
@given(
    h=st.integers(1, 12),
    w=st.integers(1, 12),
    half_k=st.integers(0, 4),
    stride=st.integers(1, 3),
    heads=st.integers(1, 2),
    head_dim=st.sampled_from([8, 16, 32]),
)
def test_attention_property_any_shape(h, w, half_k, stride, heads, head_dim):
    _check_attention((1, heads, head_dim, h, w), 2 * half_k + 1, stride, torch.float32, channels_last=h % 2 == 0)


def test_attention_output_follows_the_input_layout(fresh_seed):
    """channels_last views in -> a channels_last (B, C, Ho, Wo) view out; NCHW views -> contiguous."""
    for channels_last in (False, True):
        q, k, v, pos = _qkv((1, 2, 16, 6, 7), torch.float32, channels_last)
        out = local_attention(q, k, v, 3, 1, pos, backend="triton")
        flat = out.view(1, 32, 6, 7)  # a view, no copy
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        assert flat.is_contiguous(memory_format=fmt)


def test_attention_layer_with_triton_matches_reference_layer(fresh_seed):
    """The ACmix layer (strided q/k/v views of its projection, rel_pos, stride 2): every parameter's gradient."""
    layer = ACmix(32, stride=2, num_heads=2).to(DEVICE)
    x = torch.randn(2, 32, 7, 9, device=DEVICE)

    def run(backend):
        layer.backend = backend
        layer.zero_grad()
        xi = x.clone().requires_grad_(True)
        out = layer(xi)
        (out * torch.linspace(-1, 1, out.numel(), device=DEVICE).view_as(out)).sum().backward()
        return out.detach(), xi.grad, {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}

    out_t, gx_t, gp_t = run("triton")
    out_r, gx_r, gp_r = run("reference")
    torch.testing.assert_close(out_t, out_r, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gx_t, gx_r, atol=1e-4, rtol=1e-4)
    assert gp_t.keys() == gp_r.keys() and "pos_proj.weight" in gp_t
    for name in gp_r:
        torch.testing.assert_close(gp_t[name], gp_r[name], atol=1e-4, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_attention_compiles_without_graph_break(fresh_seed):
    """torch.compile(fullgraph=True) traces through the torch.library op (aot_eager: no Inductor on the CPU)."""
    q, k, v, pos = _qkv((1, 2, 16, 5, 6), torch.float32)

    def f(q, k, v, p):
        return local_attention(q, k, v, 3, 2, p, backend="triton").square().sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v, pos)]
    got = compiled(*leaves)
    got_g = torch.autograd.grad(got, leaves)
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v, pos)]
    want = f(*leaves)
    want_g = torch.autograd.grad(want, leaves)
    torch.testing.assert_close(got, want)
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b)


def test_attention_registered_ops_pass_opcheck(fresh_seed):
    """torch.library's own consistency checks (schema, fake tensor, autograd registration) on the forward op."""
    q, k, v, pos = _qkv((1, 1, 16, 4, 5), torch.float32)
    args = (q, k, v, pos, 3, 1, 0.25)
    torch.library.opcheck(
        torch.ops.acmix.local_attention_triton.default,
        args,
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )


def test_triton_is_opt_in_until_timed():
    """Automatic selection never picks 'triton' (opt-in with a reason); naming it does."""
    q = torch.randn(1, 1, 16, 4, 4, device=DEVICE)
    assert ops.choose_backend(q).name != "triton"
    assert ops.choose_backend(q, "triton").name == "triton"
    x = torch.randn(1, 4, 4, 4, device=DEVICE)
    assert ops.choose_aggregate_backend(x).name != "triton"
    assert ops.choose_aggregate_backend(x, "triton").name == "triton"


def test_float64_is_declined_with_a_reason():
    with pytest.raises(ValueError, match="triton supports float32/float16/bfloat16"):
        ops.choose_backend(torch.randn(1, 1, 16, 4, 4, dtype=torch.float64, device=DEVICE), "triton")


# ------------------------------------------------------------------------------------------------- SAN aggregation
AGG_CASES = [
    # (B, C, H, W), Wc, k, stride, channels_last
    ((2, 8, 6, 7), 4, 5, 1, False),
    ((1, 6, 5, 4), 3, 3, 2, True),
    ((1, 4, 1, 1), 2, 7, 1, False),  # 1 x 1 map
    ((1, 4, 2, 3), 1, 7, 3, False),  # tiny map, one shared weight, stride 3
    ((1, 8, 4, 5), 8, 3, 1, True),  # Wc = C: no sharing
]


def _check_aggregate(case, dtype):
    (b, c, h, w), wc, kernel_size, stride, channels_last = case
    ho, wo = -(-h // stride), -(-w // stride)
    x = torch.randn(b, c, h, w, device=DEVICE).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    wt = torch.randn(b, wc, kernel_size * kernel_size, ho, wo, device=DEVICE).to(dtype)
    got, got_g = _grads(lambda a, bb: local_aggregate(a, bb, kernel_size, stride, backend="triton"), (x, wt))
    want, want_g = _grads(
        lambda a, bb: local_aggregate_reference(a, bb, kernel_size, stride), (x.double().cpu(), wt.double().cpu())
    )
    fwd, bwd = TOL[dtype]
    assert got.dtype == dtype
    torch.testing.assert_close(got.double().cpu(), want, atol=fwd, rtol=fwd)
    for name, a, bb in zip(("dx", "dweight"), got_g, want_g):
        assert a.dtype == dtype and a.shape == bb.shape, name
        torch.testing.assert_close(a.double().cpu(), bb, atol=bwd, rtol=bwd, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("case", AGG_CASES, ids=lambda c: f"{c[0]}-wc{c[1]}-k{c[2]}-s{c[3]}{'-cl' if c[4] else ''}")
def test_aggregate_matches_reference(case, fresh_seed):
    _check_aggregate(case, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_aggregate_low_precision(dtype, fresh_seed):
    _check_aggregate(((1, 4, 5, 4), 2, 3, 2, False), dtype)


@settings(max_examples=4)
@given(
    h=st.integers(1, 9),
    w=st.integers(1, 9),
    half_k=st.integers(0, 3),
    stride=st.integers(1, 2),
    groups=st.integers(1, 2),
    wc=st.sampled_from([1, 2, 3]),
)
def test_aggregate_property_any_shape(h, w, half_k, stride, groups, wc):
    _check_aggregate(((1, groups * wc, h, w), wc, 2 * half_k + 1, stride, w % 2 == 0), torch.float32)


def test_aggregate_compiles_without_graph_break(fresh_seed):
    x = torch.randn(1, 4, 5, 5, device=DEVICE, requires_grad=True)
    wt = torch.randn(1, 2, 9, 5, 5, device=DEVICE, requires_grad=True)

    def f(x, w):
        return local_aggregate(x, w, 3, backend="triton").square().sum()

    got = torch.compile(f, backend="aot_eager", fullgraph=True)(x, wt)
    torch.testing.assert_close(got, f(x, wt))
    got.backward()
    assert x.grad is not None and wt.grad is not None


# ------------------------------------------------------------------------------------------------- layer memory
def _large_saved_storages(fn, x: torch.Tensor, min_bytes: int) -> list[int]:
    """Sizes of the distinct storages of at least ``min_bytes`` that autograd saves for backward (input excluded)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr, size = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
        if ptr != x.untyped_storage().data_ptr() and size >= min_bytes:
            seen[ptr] = size
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return sorted(seen.values())


def test_layer_saves_the_qkv_map_once(fresh_seed):
    """With the triton backend on strided views of the group-ordered projection, the conv path and the attention
    share one saved 3C-channel map (a copy for either path would be a second storage of that size)."""
    layer = ACmix(16, 32, num_heads=2, backend="triton").to(DEVICE)
    x = torch.randn(2, 16, 6, 7, device=DEVICE, requires_grad=True)
    qkv_bytes = 2 * 3 * 32 * 6 * 7 * 4
    assert _large_saved_storages(layer, x, qkv_bytes) == [qkv_bytes]
