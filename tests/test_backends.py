"""Every fast backend against the unfold reference: forward and all gradients, per dtype; dispatch behaviour."""

from __future__ import annotations

import logging
import random

import pytest
import torch

from acmix import ops
from acmix.layers import ACmix
from acmix.ops import local_aggregate, local_aggregate_reference, local_attention, local_attention_reference
from acmix.ops._backends.cpp import can_run_cpp
from acmix.ops._backends.flex import local_attention_flex

#: (forward atol, backward atol) against the float64 reference of the same (rounded) inputs; rtol = atol.
#: Calibrated on these shapes (tiled / offset, max abs error): float32 fwd 2e-6, bwd 3e-6; fp16 fwd 1.5e-3,
#: bwd 3e-3; bf16 fwd 1e-2, bwd 3.6e-2.
TOL: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (1e-2, 2e-2),
    torch.bfloat16: (5e-2, 1e-1),
}

CPU_GRAD_BACKENDS = ["tiled", "offset"]


def _random_cases(n: int, seed: int) -> list[tuple[tuple[int, int, int, int, int], int, int]]:
    """Seeded random (shape, kernel, stride): odd, non-square and tiny maps; k in {3, 5, 7}; stride 1 or 2."""
    rng = random.Random(seed)
    cases = []
    for _ in range(n):
        shape = (rng.randint(1, 2), rng.randint(1, 3), rng.choice([1, 2, 4, 5]), rng.randint(1, 17), rng.randint(1, 17))
        cases.append((shape, rng.choice([3, 5, 7]), rng.choice([1, 2])))
    return cases


FIXED_CASES = [
    ((2, 2, 4, 1, 1), 7, 1),  # 1 x 1: output is v
    ((1, 2, 3, 2, 3), 7, 1),  # tiny, smaller than the window
    ((1, 1, 4, 2, 3), 7, 2),  # tiny with stride
    ((2, 2, 8, 9, 6), 7, 2),  # odd with stride 2
    ((1, 2, 4, 23, 30), 7, 1),  # several tiles, non-square, ragged last tile
    ((1, 1, 4, 31, 29), 7, 2),
    ((1, 1, 4, 12, 11), 3, 1),
]
CASES = FIXED_CASES + _random_cases(8, seed=4)


def _inputs(shape, dtype, with_pos=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(shape, generator=g).to(dtype) for _ in range(3))
    pos = torch.randn(shape[2:], generator=g).to(dtype) if with_pos else None
    return q, k, v, pos


def _run(fn, q, k, v, pos, kernel_size, stride, grads=True):
    """Output and the gradients of a fixed random projection of it w.r.t. q, k, v (and rel_pos)."""
    leaves = [t.detach().clone().requires_grad_(grads) for t in (q, k, v)]
    p = None if pos is None else pos.detach().clone().requires_grad_(grads)
    out = fn(*leaves, kernel_size, stride, p)
    if not grads:
        return out.detach(), []
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device, out.dtype)
    inputs = leaves + ([p] if p is not None else [])
    return out.detach(), list(torch.autograd.grad((out * w).sum(), inputs))


def _check(backend_fn, dtype, shape, kernel_size, stride, with_pos=True, grads=True):
    q, k, v, pos = _inputs(shape, dtype, with_pos)
    got, got_g = _run(backend_fn, q, k, v, pos, kernel_size, stride, grads)
    up = [None if t is None else t.double() for t in (q, k, v, pos)]
    want, want_g = _run(local_attention_reference, *up, kernel_size, stride, grads)
    fwd, bwd = TOL[dtype]
    assert got.dtype == dtype and got.shape == want.shape
    torch.testing.assert_close(got.double(), want, atol=fwd, rtol=fwd)
    for name, a, b in zip(("dq", "dk", "dv", "drel_pos"), got_g, want_g):
        assert a.dtype == dtype, name
        torch.testing.assert_close(a.double(), b, atol=bwd, rtol=bwd, msg=lambda m, n=name: f"{n}: {m}")


def _by_name(name):
    return lambda *a: local_attention(*a[:5], rel_pos=a[5], backend=name)


@pytest.mark.parametrize("backend", CPU_GRAD_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-k{c[1]}-s{c[2]}")
def test_backend_matches_reference_float64(backend, case):
    shape, kernel_size, stride = case
    _check(_by_name(backend), torch.float64, shape, kernel_size, stride)


@pytest.mark.parametrize("backend", CPU_GRAD_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", FIXED_CASES[:5], ids=lambda c: f"{c[0]}-k{c[1]}-s{c[2]}")
def test_backend_matches_reference_low_precision(backend, dtype, case):
    shape, kernel_size, stride = case
    _check(_by_name(backend), dtype, shape, kernel_size, stride)


@pytest.mark.parametrize("backend", CPU_GRAD_BACKENDS)
def test_backend_without_position_and_with_scale(backend):
    q, k, v, _ = _inputs((2, 2, 4, 7, 9), torch.float64, with_pos=False)
    want = local_attention_reference(q, k, v, 5, 2, None, 0.3)
    torch.testing.assert_close(local_attention(q, k, v, 5, 2, None, 0.3, backend=backend), want)


@pytest.mark.parametrize("backend", CPU_GRAD_BACKENDS)
def test_backend_per_batch_position_map(backend):
    """A 5-D rel_pos (broadcast over heads only) gets its own gradient."""
    shape = (2, 2, 4, 6, 7)
    q, k, v, _ = _inputs(shape, torch.float64)
    pos = torch.randn(2, 1, 4, 6, 7, dtype=torch.float64)
    fns = {n: (lambda *a, n=n: local_attention(*a[:5], rel_pos=a[5], backend=n)) for n in (backend, "reference")}
    got, got_g = _run(fns[backend], q, k, v, pos, 7, 1)
    want, want_g = _run(fns["reference"], q, k, v, pos, 7, 1)
    torch.testing.assert_close(got, want)
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("case", [FIXED_CASES[0], FIXED_CASES[2], FIXED_CASES[3], FIXED_CASES[4]], ids=str)
def test_flex_eager_forward_on_cpu(case):
    """FlexAttention's eager form runs on CPU (forward only in this torch); the CUDA test covers the backward."""
    shape, kernel_size, stride = case
    q, k, v, pos = _inputs(shape, torch.float32)
    with torch.no_grad():
        got = local_attention_flex(q, k, v, kernel_size, stride, pos, compiled=False)
        want = local_attention_reference(q.double(), k.double(), v.double(), kernel_size, stride, pos.double())
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flex", "tiled", "offset"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_backend_on_cuda(backend, dtype):
    for shape, kernel_size, stride in [
        ((2, 4, 16, 56, 56), 7, 1),
        ((2, 4, 16, 28, 28), 7, 2),
        ((1, 2, 16, 5, 7), 7, 1),
    ]:
        q, k, v, pos = (None if t is None else t.cuda() for t in _inputs(shape, dtype))
        got, got_g = _run(_by_name(backend), q, k, v, pos, kernel_size, stride)
        up = [t.double() for t in (q, k, v, pos)]
        want, want_g = _run(local_attention_reference, *up, kernel_size, stride)
        fwd, bwd = TOL[dtype]
        torch.testing.assert_close(got.double(), want, atol=fwd, rtol=fwd)
        for a, b in zip(got_g, want_g):
            torch.testing.assert_close(a.double(), b, atol=bwd, rtol=bwd)


# ---------------------------------------------------------------------------------------------- the ACmix layer
@pytest.mark.parametrize("stride,hw", [(1, (9, 8)), (2, (11, 10)), (1, (2, 3))])
def test_layer_default_backend_matches_reference_all_gradients(stride, hw):
    torch.manual_seed(3)
    layer = ACmix(16, stride=stride, num_heads=2).double()
    x = torch.randn(2, 16, *hw, dtype=torch.float64)

    def run(backend):
        layer.backend = backend
        layer.zero_grad()
        xi = x.clone().requires_grad_(True)
        out = layer(xi)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        return out.detach(), xi.grad, {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}

    out_f, gx_f, gp_f = run(None)
    out_r, gx_r, gp_r = run("reference")
    torch.testing.assert_close(out_f, out_r)
    torch.testing.assert_close(gx_f, gx_r)
    assert gp_f.keys() == gp_r.keys() and "pos_proj.weight" in gp_f
    for name in gp_r:
        torch.testing.assert_close(gp_f[name], gp_r[name], msg=lambda m, n=name: f"{n}: {m}")


# ---------------------------------------------------------------------------------------------- dispatch
def _cpu_default(q: torch.Tensor) -> str:
    """``cpp`` where this machine can build it (tests/test_cpp_backend.py), else ``tiled``."""
    return "cpp" if can_run_cpp(q)[0] else "tiled"


def test_auto_choice_on_cpu_is_cpp_else_tiled():
    for q in (torch.randn(1, 2, 16, 8, 8), torch.randn(1, 2, 4, 8, 8, dtype=torch.float64)):
        assert ops.choose_backend(q).name == _cpu_default(q)


def test_env_override_picks_the_named_backend(monkeypatch):
    q = torch.randn(1, 1, 2, 5, 5)
    monkeypatch.setenv("ACMIX_BACKEND", "offset")
    assert ops.choose_backend(q).name == "offset"
    assert ops.choose_backend(q, "reference").name == "reference"  # the argument beats the environment
    monkeypatch.setenv("ACMIX_BACKEND", "auto")
    assert ops.choose_backend(q).name == _cpu_default(q)


def test_unknown_backend_lists_every_valid_one():
    q = torch.randn(1, 1, 2, 3, 3)
    with pytest.raises(ValueError, match="unknown backend 'fast'") as info:
        local_attention(q, q, q, 3, backend="fast")
    for name in ("flex", "cpp", "tiled", "offset", "reference"):
        assert name in str(info.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_unavailable_optional_backend_degrades_with_logged_reason(caplog):
    q = torch.randn(1, 1, 16, 4, 4)
    with caplog.at_level(logging.DEBUG, logger="acmix"):
        chosen = ops.choose_backend(q)
    assert chosen.name == _cpu_default(q)
    skipped = [r.getMessage() for r in caplog.records if "skipping backend 'flex'" in r.getMessage()]
    assert skipped and "CUDA" in skipped[0]
    with pytest.raises(ValueError, match="backend 'flex' cannot run here: .*CUDA"):
        ops.choose_backend(q, "flex")


def test_backend_status_reports_reasons():
    status = {name: (ok, reason) for name, ok, reason in ops.backend_status()}
    assert status["tiled"][0] and status["offset"][0] and status["reference"][0]
    if not torch.cuda.is_available():
        assert not status["flex"][0] and status["flex"][1]


# ---------------------------------------------------------------------------------------------- aggregation
AGG_CASES = [
    ((2, 8, 9, 7), 2, 3, 1),
    ((1, 6, 11, 10), 3, 7, 2),
    ((1, 4, 1, 1), 4, 7, 1),
    ((2, 4, 2, 3), 1, 7, 2),
    ((1, 16, 16, 15), 4, 5, 1),
]


@pytest.mark.parametrize("backend", ["offset"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", AGG_CASES, ids=str)
def test_aggregate_backend_matches_reference(backend, dtype, case):
    (b, c, h, w), wc, kernel_size, stride = case
    ho, wo = -(-h // stride), -(-w // stride)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, c, h, w, generator=g).to(dtype)
    wt = torch.randn(b, wc, kernel_size * kernel_size, ho, wo, generator=g).to(dtype)

    def run(fn, xx, ww):
        xx, ww = xx.clone().requires_grad_(True), ww.clone().requires_grad_(True)
        out = fn(xx, ww)
        proj = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
        return (out.detach(), *torch.autograd.grad((out * proj).sum(), (xx, ww)))

    got = run(lambda a, bb: local_aggregate(a, bb, kernel_size, stride, backend=backend), x, wt)
    want = run(lambda a, bb: local_aggregate_reference(a, bb, kernel_size, stride), x.double(), wt.double())
    tol = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 1e-1}[dtype]
    for a, bb in zip(got, want):
        assert a.dtype == dtype
        torch.testing.assert_close(a.double(), bb, atol=tol, rtol=tol)


def test_aggregate_default_is_fast_and_unknown_lists_valid():
    x = torch.randn(1, 4, 5, 5)
    wt = torch.randn(1, 2, 9, 5, 5)
    with pytest.raises(ValueError, match="valid backends: .*offset.*reference"):
        local_aggregate(x, wt, 3, backend="nope")
    assert ops.choose_aggregate_backend(x).name == "offset"


def _saved_bytes(backend: str, shape, kernel_size: int, stride: int) -> int:
    """Bytes of the distinct storages autograd keeps for backward (inputs themselves excluded)."""
    q, k, v, pos = (t.requires_grad_(True) for t in _inputs(shape, torch.float32))
    inputs = {t.untyped_storage().data_ptr() for t in (q, k, v, pos)}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in inputs:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        local_attention(q, k, v, kernel_size, stride, pos, backend=backend)
    return sum(seen.values())


@pytest.mark.parametrize("stride", [1, 2])
def test_fast_backends_keep_a_fraction_of_the_reference_activations(stride):
    """The point of the backends: no k^2 expansion kept for backward (structural, not timed).

    Measured at this shape, in feature maps: reference 102 (stride 1) / 25.5 (stride 2), tiled 9.7 / 4.8 (q, the
    key and value halos, out), offset 4.9 / 3.3.
    """
    shape = (2, 4, 16, 32, 32)
    ref = _saved_bytes("reference", shape, 7, stride)
    feature_map = 2 * 4 * 16 * 32 * 32 * 4
    assert ref > 49 * feature_map / stride**2  # the unfold keeps at least one 49x expansion
    for backend in CPU_GRAD_BACKENDS:
        assert _saved_bytes(backend, shape, 7, stride) < ref / (8 if stride == 1 else 4), backend
