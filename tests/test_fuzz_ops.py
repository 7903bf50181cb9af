"""Property-based tests (hypothesis) of every local-attention and aggregation backend and of the ACmix layer.

Each registered backend (``acmix.ops.available_backends()`` / ``available_aggregate_backends()``, so backends added
later join automatically) is checked against the readable reference on drawn inputs: maps from 1 x 1 up, odd and
non-square sizes, strides 1-3, windows 1-7, float64/float32/bfloat16/float16, with and without the position term,
channels_last and non-contiguous (transposed, sliced, broadcast) inputs; forward and every input gradient. A
backend that cannot run on a drawn input (its ``can_run`` says why) is skipped for that input. The reference itself
is checked against the Python-loop attention of ``tests/_utils.py``.

The number of examples per test comes from the hypothesis profile in ``conftest.py`` (12 by default;
``ACMIX_HYPOTHESIS_EXAMPLES`` raises it).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from _utils import naive_local_attention
from acmix import ops
from acmix.layers import ACmix

#: (forward atol, backward atol) against float64 on the same rounded inputs (rtol = atol); test_backends.py's table
TOL: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (1e-2, 2e-2),
    torch.bfloat16: (5e-2, 1e-1),
}
DTYPES = list(TOL)
LAYOUTS = ["contiguous", "channels_last", "transposed", "sliced", "broadcast"]


def _runnable_on_cpu(backend) -> bool:
    samples = [torch.zeros(1, 1, d, 3, 3, dtype=t) for d in (4, 16) for t in (torch.float32, torch.float64)]
    return any(backend.can_run(s)[0] for s in samples)


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as ``t`` (a fresh leaf) in another memory layout; gradients flow to the returned tensor's
    ``.leaf`` attribute."""
    leaf = t.detach().clone()
    if layout == "broadcast":  # batch 1 broadcast over the batch: stride 0
        leaf = t[:1].detach().clone().requires_grad_(True)
        out = leaf.expand(t.shape)
        out.leaf = leaf  # type: ignore[attr-defined]
        return out
    leaf.requires_grad_(True)
    if layout == "channels_last":
        fmt = torch.channels_last_3d if t.dim() == 5 else torch.channels_last
        out = leaf.contiguous(memory_format=fmt)
    elif layout == "transposed":  # H and W strides swapped
        out = leaf.transpose(-1, -2).contiguous().transpose(-1, -2)
    elif layout == "sliced":  # every other element of a wider tensor
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        wide[..., ::2] = leaf
        out = wide[..., ::2]
    else:
        out = leaf * 1
    out.leaf = leaf  # type: ignore[attr-defined]
    return out


def _as_leaf_grad(grad: torch.Tensor, layout: str) -> torch.Tensor:
    """The reference gradient of a full tensor as the gradient of ``_layout``'s leaf (summed over a broadcast)."""
    return grad.sum(0, keepdim=True) if layout == "broadcast" else grad


@st.composite
def attention_inputs(draw: st.DrawFn) -> dict:
    dtype = draw(st.sampled_from(DTYPES))
    shape = (
        draw(st.integers(1, 2)),
        draw(st.integers(1, 3)),
        draw(st.sampled_from([1, 2, 3, 4, 8, 16])),
        draw(st.integers(1, 11)),
        draw(st.integers(1, 11)),
    )
    exact = dtype in (torch.float64, torch.float32)
    return dict(
        dtype=dtype,
        shape=shape,
        kernel_size=draw(st.sampled_from([1, 3, 5, 7])),
        stride=draw(st.integers(1, 3)),
        pos=draw(st.sampled_from(["none", "shared", "per_batch"])),
        scale=draw(st.none() | st.floats(0.1, 1.0)) if exact else None,
        layout=draw(st.sampled_from(LAYOUTS)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _attention_run(fn, q, k, v, pos, case, layout: str):
    """Output and the gradients of a fixed random projection of it w.r.t. q, k, v (and rel_pos)."""
    views = [_layout(t, layout) for t in (q, k, v)]
    p = None if pos is None else pos.detach().clone().requires_grad_(True)
    out = fn(*views, case["kernel_size"], case["stride"], p, case["scale"])
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(case["seed"] + 1), dtype=torch.float64)
    leaves = [t.leaf for t in views] + ([p] if p is not None else [])
    return out.detach(), list(torch.autograd.grad((out * w.to(out.dtype)).sum(), leaves))


def _attention_inputs(case):
    g = torch.Generator().manual_seed(case["seed"])
    shape, dtype = case["shape"], case["dtype"]
    q, k, v = (torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for _ in range(3))
    pos = None
    if case["pos"] == "shared":
        pos = torch.randn(shape[2:], generator=g, dtype=torch.float64).to(dtype)
    elif case["pos"] == "per_batch":
        pos = torch.randn(shape[0], 1, *shape[2:], generator=g, dtype=torch.float64).to(dtype)
    return q, k, v, pos


@pytest.mark.parametrize("name", ops.available_backends())
@given(case=attention_inputs())
def test_attention_backend_matches_reference(name, case):
    backend = ops.get_backend(name)
    if not _runnable_on_cpu(backend):
        pytest.skip(f"backend {name!r} cannot run on this machine: {backend.can_run(torch.zeros(1, 1, 16, 3, 3))[1]}")
    q, k, v, pos = _attention_inputs(case)
    assume(backend.can_run(q)[0])
    if case["layout"] == "broadcast":  # equal batch entries, so the comparison sees the same data
        q, k, v = (t[:1].expand_as(t).contiguous() for t in (q, k, v))

    def run(*a):
        return ops.local_attention(*a[:5], rel_pos=a[5], scale=a[6], backend=name)

    def ref(*a):
        return ops.local_attention(*a[:5], rel_pos=a[5], scale=a[6], backend="reference")

    got, got_g = _attention_run(run, q, k, v, pos, case, case["layout"])
    up = [None if t is None else t.double() for t in (q, k, v, pos)]
    want, want_g = _attention_run(ref, *up, case, "contiguous")
    fwd, bwd = TOL[case["dtype"]]
    assert got.dtype == case["dtype"] and got.shape == want.shape
    ho, wo = -(-case["shape"][3] // case["stride"]), -(-case["shape"][4] // case["stride"])
    assert got.shape == (*case["shape"][:3], ho, wo)
    torch.testing.assert_close(got.double(), want, atol=fwd, rtol=fwd)
    for i, (label, a, b) in enumerate(zip(("dq", "dk", "dv", "drel_pos"), got_g, want_g)):
        b = _as_leaf_grad(b, case["layout"]) if i < 3 else b
        assert a.shape == b.shape and a.dtype == case["dtype"], label
        torch.testing.assert_close(a.double(), b, atol=bwd, rtol=bwd, msg=lambda m, n=label: f"{n}: {m}")


@given(
    shape=st.tuples(st.just(1), st.integers(1, 2), st.integers(1, 3), st.integers(1, 6), st.integers(1, 6)),
    kernel_size=st.sampled_from([1, 3, 5]),
    stride=st.integers(1, 3),
    with_pos=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_reference_matches_python_loops(shape, kernel_size, stride, with_pos, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3))
    pos = torch.randn(shape[2:], generator=g, dtype=torch.float64) if with_pos else None
    got = ops.local_attention_reference(q, k, v, kernel_size, stride, pos)
    torch.testing.assert_close(got, naive_local_attention(q, k, v, kernel_size, stride, pos))


@st.composite
def aggregate_inputs(draw: st.DrawFn) -> dict:
    wc = draw(st.integers(1, 3))
    return dict(
        dtype=draw(st.sampled_from(DTYPES)),
        b=draw(st.integers(1, 2)),
        c=wc * draw(st.integers(1, 3)),
        wc=wc,
        h=draw(st.integers(1, 11)),
        w=draw(st.integers(1, 11)),
        kernel_size=draw(st.sampled_from([1, 3, 5, 7])),
        stride=draw(st.integers(1, 3)),
        layout=draw(st.sampled_from(LAYOUTS)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@pytest.mark.parametrize("name", ops.available_aggregate_backends())
@given(case=aggregate_inputs())
def test_aggregate_backend_matches_reference(name, case):
    from acmix.ops._dispatch import AGGREGATE

    backend = AGGREGATE.get(name)
    g = torch.Generator().manual_seed(case["seed"])
    k2, s = case["kernel_size"] ** 2, case["stride"]
    ho, wo = -(-case["h"] // s), -(-case["w"] // s)
    x = torch.randn(case["b"], case["c"], case["h"], case["w"], generator=g, dtype=torch.float64)
    weight = torch.randn(case["b"], case["wc"], k2, ho, wo, generator=g, dtype=torch.float64).softmax(2)
    x, weight = x.to(case["dtype"]), weight.to(case["dtype"])
    if not backend.can_run(x)[0]:
        pytest.skip(f"aggregation backend {name!r} cannot run here: {backend.can_run(x)[1]}")
    if case["layout"] == "broadcast":
        x, weight = x[:1].expand_as(x).contiguous(), weight[:1].expand_as(weight).contiguous()

    def run(fn, xs, ws, layout):
        xv, wv = _layout(xs, layout), _layout(ws, layout)
        out = fn(xv, wv)
        proj = torch.randn(out.shape, generator=torch.Generator().manual_seed(case["seed"] + 1), dtype=torch.float64)
        return out.detach(), torch.autograd.grad((out * proj.to(out.dtype)).sum(), [xv.leaf, wv.leaf])

    got, got_g = run(
        lambda a, b: ops.local_aggregate(a, b, case["kernel_size"], s, backend=name), x, weight, case["layout"]
    )
    want, want_g = run(
        lambda a, b: ops.local_aggregate_reference(a, b, case["kernel_size"], s),
        x.double(),
        weight.double(),
        "contiguous",
    )
    fwd, bwd = TOL[case["dtype"]]
    assert got.shape == (case["b"], case["c"], ho, wo) and got.dtype == case["dtype"]
    torch.testing.assert_close(got.double(), want, atol=fwd, rtol=fwd)
    for label, a, b in zip(("dx", "dweight"), got_g, want_g):
        b = _as_leaf_grad(b, case["layout"])
        torch.testing.assert_close(a.double(), b, atol=bwd, rtol=bwd, msg=lambda m, n=label: f"{n}: {m}")


@st.composite
def acmix_configs(draw: st.DrawFn) -> dict:
    heads = draw(st.integers(1, 3))
    return dict(
        dim=draw(st.integers(1, 6)),
        dim_out=heads * draw(st.integers(1, 3)),
        num_heads=heads,
        stride=draw(st.integers(1, 2)),
        attn_kernel_size=draw(st.sampled_from([1, 3, 5, 7])),
        conv_kernel_size=draw(st.sampled_from([1, 3, 5])),
        qkv_bias=draw(st.booleans()),
        fc_bias=draw(st.booleans()),
        use_rel_pos=draw(st.booleans()),
        shift_mode=draw(st.sampled_from(["tensor", "fixed", "frozen", "learnable", "group"])),
        shift_init=draw(st.booleans()),
        mix=draw(st.sampled_from(["learned", "fixed", "attn", "conv"])),
    )


@pytest.mark.parametrize("name", ops.available_backends())
@given(
    cfg=acmix_configs(),
    batch=st.integers(1, 2),
    hw=st.tuples(st.integers(1, 9), st.integers(1, 9)),
    dtype=st.sampled_from([torch.float64, torch.float32]),
    layout=st.sampled_from(["contiguous", "channels_last", "transposed", "sliced"]),
    conv_impl=st.sampled_from(["fused", "reference"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_acmix_layer_matches_reference(name, cfg, batch, hw, dtype, layout, conv_impl, seed):
    """The layer on backend ``name`` (and either conv implementation) against the same weights on the reference
    backend and the reference conv path in float64: output, input gradient and every parameter gradient."""
    backend = ops.get_backend(name)
    if not _runnable_on_cpu(backend):
        pytest.skip(f"backend {name!r} cannot run on this machine")
    torch.manual_seed(seed)
    layer = ACmix(**cfg, backend=name, conv_impl=conv_impl).to(dtype)
    ref = ACmix(**cfg, backend="reference", conv_impl="reference").double()
    ref.load_state_dict({k: v.double() for k, v in layer.state_dict().items()})
    head_dim = cfg["dim_out"] // cfg["num_heads"]
    assume(backend.can_run(torch.zeros(1, 1, head_dim, *hw, dtype=dtype))[0])
    x = torch.randn(batch, cfg["dim"], *hw, dtype=torch.float64).to(dtype)
    if layout == "channels_last":
        layer = layer.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    xv = _layout(x, layout)
    out = layer(xv)
    want_x = x.double().requires_grad_(True)
    want = ref(want_x)
    assert out.shape == want.shape == (batch, cfg["dim_out"], -(-hw[0] // cfg["stride"]), -(-hw[1] // cfg["stride"]))
    proj = torch.randn(want.shape, dtype=torch.float64)
    params = [p for p in layer.parameters() if p.requires_grad]
    ref_params = [p for p in ref.parameters() if p.requires_grad]
    got_g = torch.autograd.grad((out * proj.to(dtype)).sum(), [xv.leaf, *params], allow_unused=True)
    want_g = torch.autograd.grad((want * proj).sum(), [want_x, *ref_params], allow_unused=True)
    tol = 1e-9 if dtype == torch.float64 else 2e-4
    torch.testing.assert_close(out.double(), want.detach(), atol=tol, rtol=tol)
    names = ["input", *(n for n, p in layer.named_parameters() if p.requires_grad)]
    for label, a, b in zip(names, got_g, want_g):
        assert (a is None) == (b is None), label  # a path the mix leaves out gets no gradient in either
        if a is not None:
            torch.testing.assert_close(a.double(), b, atol=tol * 10, rtol=tol * 10, msg=lambda m, n=label: f"{n}: {m}")
