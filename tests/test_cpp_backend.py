"""The C++ CPU backend (``cpp``) against the unfold reference: forward, every gradient, dtypes, strided inputs,
torch.compile / torch.export, thread counts, and the fallback to ``tiled`` when it cannot be built.

The extension is built (or loaded from the cache) once per test process; the shapes are tiny. Without a C++
toolchain the whole file is skipped with the reason.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from acmix import ops
from acmix.ops import local_attention, local_attention_reference
from acmix.ops._backends import cpp

_TOOLCHAIN_OK, _TOOLCHAIN_WHY = cpp.toolchain()
pytestmark = pytest.mark.skipif(not _TOOLCHAIN_OK, reason=f"cpp backend needs a C++ toolchain: {_TOOLCHAIN_WHY}")

#: (forward, backward) atol = rtol against the float64 reference of the same (rounded) inputs. Measured max abs
#: errors on these shapes: float64 ~5e-15, float32 ~3e-6; half precision is computed in float32, so only the
#: rounding of inputs / outputs to the dtype remains (as for ``tiled``).
TOL: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (3e-5, 5e-5),
    torch.float16: (1e-2, 2e-2),
    torch.bfloat16: (5e-2, 1e-1),
}


@pytest.fixture(scope="module", autouse=True)
def _built() -> None:
    """Build or load once; the tests below must run the C++ kernel, never the fallback."""
    if os.environ.get("ACMIX_NO_CPP", "").strip() not in ("", "0"):
        pytest.skip("ACMIX_NO_CPP is set")
    assert cpp.load_library(), f"the cpp backend failed to build with a toolchain present: {cpp._STATE.reason}"


def _cpp(q, k, v, kernel_size, stride, rel_pos, scale=None):
    assert cpp._STATE.status == "loaded"
    return local_attention(q, k, v, kernel_size, stride, rel_pos, scale, backend="cpp")


def _run(fn, q, k, v, pos, kernel_size, stride, scale=None):
    """Output and the gradients of a random projection of it w.r.t. q, k, v (and rel_pos)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    p = None if pos is None else pos.detach().clone().requires_grad_(True)
    out = fn(*leaves, kernel_size, stride, p, scale)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out.dtype)
    inputs = leaves + ([p] if p is not None else [])
    return out.detach(), list(torch.autograd.grad((out * w).sum(), inputs))


def _check(q, k, v, pos, kernel_size, stride, scale=None, dtype=None):
    dtype = q.dtype if dtype is None else dtype
    got, got_g = _run(_cpp, q, k, v, pos, kernel_size, stride, scale)
    up = [None if t is None else t.detach().double() for t in (q, k, v, pos)]
    want, want_g = _run(local_attention_reference, *up, kernel_size, stride, scale)
    fwd, bwd = TOL[dtype]
    assert got.dtype == dtype and got.shape == want.shape
    torch.testing.assert_close(got.double(), want, atol=fwd, rtol=fwd)
    assert len(got_g) == len(want_g)
    for name, a, b in zip(("dq", "dk", "dv", "drel_pos"), got_g, want_g):
        assert a.dtype == dtype and a.shape == b.shape, name
        torch.testing.assert_close(a.double(), b, atol=bwd, rtol=bwd, msg=lambda m, n=name: f"{n}: {m}")


def _inputs(shape, dtype=torch.float64, pos="3d"):
    q, k, v = (torch.randn(shape).to(dtype) for _ in range(3))
    b, n, d, h, w = shape
    p = {"none": None, "3d": torch.randn(d, h, w), "5d": torch.randn(b, 1, d, h, w)}[pos]
    return q, k, v, None if p is None else p.to(dtype)


# (B, N, D, H, W), kernel, stride, rel_pos kind: tiny, odd, non-square and degenerate maps, every stride and window
CASES = [
    ((2, 2, 4, 1, 1), 7, 1, "3d"),  # 1 x 1: the output is v
    ((1, 2, 3, 1, 9), 5, 1, "3d"),  # 1 x N
    ((1, 1, 5, 9, 1), 3, 2, "5d"),  # N x 1
    ((2, 1, 4, 2, 3), 7, 1, "3d"),  # 2 x 3, smaller than the window
    ((1, 2, 2, 3, 2), 9, 3, "none"),  # window far larger than the map, stride 3
    ((2, 2, 8, 9, 6), 7, 2, "3d"),
    ((1, 2, 1, 7, 11), 1, 1, "3d"),  # 1 x 1 window, head_dim 1
    ((1, 1, 16, 12, 13), 3, 3, "5d"),
    ((1, 2, 64, 5, 7), 7, 1, "3d"),  # head_dim 64
    ((1, 1, 33, 6, 10), 9, 2, "none"),  # odd head_dim, window 9
    ((1, 1, 4, 40, 9), 7, 1, "3d"),  # several row blocks per (b, n)
    ((1, 1, 2, 23, 30), 5, 2, "3d"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-k{c[1]}-s{c[2]}-{c[3]}")
def test_matches_reference_float64(case, fresh_seed):
    shape, kernel_size, stride, pos = case
    _check(*_inputs(shape, torch.float64, pos), kernel_size, stride)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [CASES[3], CASES[5], CASES[8], CASES[11]], ids=lambda c: f"{c[0]}-s{c[2]}")
def test_matches_reference_low_precision(dtype, case, fresh_seed):
    shape, kernel_size, stride, pos = case
    _check(*_inputs(shape, dtype, pos), kernel_size, stride, dtype=dtype)


def test_scale_argument(fresh_seed):
    _check(*_inputs((2, 2, 4, 7, 9)), 5, 2, scale=0.3)
    _check(*_inputs((1, 1, 3, 5, 5), pos="none"), 3, 1, scale=2.5)


def test_strided_views_of_a_fused_projection(fresh_seed):
    """The layer's q, k, v: chunks of one (B, 3C, H, W) projection (batch stride 3 C H W), not copied first."""
    b, n, d, h, w = 2, 2, 4, 9, 10
    qkv = torch.randn(b, 3 * n * d, h, w, dtype=torch.float64)
    q, k, v = (t.reshape(b, n, d, h, w) for t in qkv.chunk(3, dim=1))
    assert not q.is_contiguous() and q.stride(0) == 3 * n * d * h * w
    pos = torch.randn(d, h, w, dtype=torch.float64)
    _check(q, k, v, pos, 7, 1)
    _check(q, k, v, pos, 5, 2)
    # the raw op reads the views in place and gives exactly what it gives on contiguous copies
    out, lse = torch.ops.acmix_cpp.local_attention_fwd(q, k, v, pos, 7, 1, 0.5)
    out_c, lse_c = torch.ops.acmix_cpp.local_attention_fwd(
        q.contiguous(), k.contiguous(), v.contiguous(), pos, 7, 1, 0.5
    )
    assert torch.equal(out, out_c) and torch.equal(lse, lse_c)


def test_non_unit_width_stride_and_expanded_position(fresh_seed):
    """Views whose W axis is not contiguous (transposed maps) and a rel_pos expanded over batch / heads."""
    q, k, v = (torch.randn(1, 2, 3, 8, 6, dtype=torch.float64).transpose(-1, -2) for _ in range(3))
    assert q.stride(-1) != 1
    pos = torch.randn(1, 2, 3, 6, 8, dtype=torch.float64).expand(1, 2, 3, 6, 8)
    _check(q, k, v, pos, 5, 1)


def test_output_layout_and_saved_tensors():
    q, k, v, pos = _inputs((2, 3, 4, 9, 7), torch.float32)
    out, lse = torch.ops.acmix_cpp.local_attention_fwd(q, k, v, pos, 7, 2, 0.5)
    assert out.shape == (2, 3, 4, 5, 4) and out.is_contiguous()
    assert lse.shape == (2, 3, 5, 4)  # the only tensor the forward adds for the backward
    # lse is the log-sum-exp of the window logits: recompute it from the reference's unfolded windows
    from acmix.ops._reference import _unfold_windows

    kw = _unfold_windows(k.double() - pos.double(), 7, 2)  # (B, N, D, 49, Ho, Wo)
    logits = (q.double()[..., ::2, ::2].unsqueeze(3) * 0.5 * kw).sum(2)
    torch.testing.assert_close(lse.double(), logits.logsumexp(2), atol=1e-5, rtol=1e-5)


def test_gradcheck_float64():
    q, k, v, pos = (t.requires_grad_(True) for t in _inputs((1, 2, 3, 4, 5)))
    assert torch.autograd.gradcheck(lambda *a: _cpp(*a[:3], 3, 2, a[3]), (q, k, v, pos))
    assert torch.autograd.gradcheck(lambda *a: _cpp(*a[:3], 5, 1, a[3]), (q, k, v, pos))


@given(
    b=st.integers(1, 2),
    n=st.integers(1, 2),
    d=st.integers(1, 9),
    h=st.integers(1, 12),
    w=st.integers(1, 12),
    kernel_size=st.sampled_from([1, 3, 5, 7, 9]),
    stride=st.integers(1, 3),
    pos=st.sampled_from(["none", "3d", "5d"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_matches_reference(b, n, d, h, w, kernel_size, stride, pos, seed):
    torch.manual_seed(seed)
    _check(*_inputs((b, n, d, h, w), torch.float64, pos), kernel_size, stride)


@pytest.mark.parametrize("shape", [(1, 1, 4, 30, 11), (3, 2, 5, 13, 17)], ids=str)
def test_thread_counts_agree(shape, fresh_seed):
    """1 and 3 threads give the same results (B * N below the thread count splits rows over private slabs)."""
    q, k, v, pos = _inputs(shape)
    old = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 3):
            torch.set_num_threads(threads)
            results.append(_run(_cpp, q, k, v, pos, 7, 1))
    finally:
        torch.set_num_threads(old)
    (o1, g1), (o3, g3) = results
    assert torch.equal(o1, o3)
    for a, c in zip(g1, g3):
        torch.testing.assert_close(a, c, atol=1e-13, rtol=1e-13)


def test_bad_input_is_a_clear_error():
    q = torch.randn(1, 1, 2, 4, 4)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        torch.ops.acmix_cpp.local_attention_fwd(q.int(), q.int(), q.int(), None, 3, 1, 1.0)
    with pytest.raises(RuntimeError, match="positive odd"):
        torch.ops.acmix_cpp.local_attention_fwd(q, q, q, None, 4, 1, 1.0)
    with pytest.raises(RuntimeError, match="rel_pos must be"):
        torch.ops.acmix_cpp.local_attention_fwd(q, q, q, torch.randn(2, 4, 5), 3, 1, 1.0)


# ---------------------------------------------------------------------------------------------- compile / export
def test_torch_compile_without_graph_breaks(fresh_seed):
    q, k, v, pos = (t.requires_grad_(True) for t in _inputs((2, 2, 4, 9, 7), torch.float32))

    def f(q, k, v, pos):
        return local_attention(q, k, v, 7, 2, pos)  # automatic choice: cpp

    explained = torch._dynamo.explain(f)(q, k, v, pos)
    assert explained.graph_break_count == 0, explained.break_reasons
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    got, got_g = _run(lambda *a: compiled(*a[:3], a[5]), q, k, v, pos, 7, 2)
    want, want_g = _run(_cpp, q, k, v, pos, 7, 2)
    torch.testing.assert_close(got, want)
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b)


def test_torch_export_records_the_op():
    class Attn(torch.nn.Module):
        def forward(self, q, k, v, pos):
            return local_attention(q, k, v, 5, 1, pos, backend="cpp")

    args = _inputs((1, 2, 4, 6, 5), torch.float32)
    exported = torch.export.export(Attn(), args)
    targets = [str(n.target) for n in exported.graph.nodes if n.op == "call_function"]
    assert targets == ["acmix.local_attention.default"], targets  # the switchable op, kept whole
    lowered = exported.run_decompositions()  # its kernel runs: the chosen backend's op is recorded
    targets = [str(n.target) for n in lowered.graph.nodes if n.op == "call_function"]
    assert any("acmix_cpp.local_attention_fwd" in t for t in targets), targets
    torch.testing.assert_close(exported.module()(*args), Attn()(*args))


# ---------------------------------------------------------------------------------------------- dispatch / fallback
def test_default_on_cpu_and_not_on_other_devices():
    assert ops.choose_backend(torch.randn(1, 2, 16, 8, 8)).name == "cpp"
    assert ops.choose_backend(torch.randn(1, 2, 4, 8, 8, dtype=torch.float64)).name == "cpp"
    ok, reason = cpp.can_run_cpp(torch.empty(1, 1, 1, 1, 1, device="meta"))
    assert not ok and "CPU only" in reason


def test_no_cpp_environment_switch(monkeypatch):
    monkeypatch.setenv("ACMIX_NO_CPP", "1")
    q = torch.randn(1, 1, 2, 5, 5)
    assert cpp.can_run_cpp(q) == (False, "disabled by ACMIX_NO_CPP=1")
    assert ops.choose_backend(q).name == "tiled"
    with pytest.raises(ValueError, match="backend 'cpp' cannot run here: disabled by ACMIX_NO_CPP"):
        ops.choose_backend(q, "cpp")
    assert "disabled" in cpp.build_state()


def test_build_failure_falls_back_to_tiled_with_one_warning(monkeypatch, caplog):
    """A failing build (simulated): one WARNING with the reason, the call still answers (via tiled), can_run then
    reports the reason and dispatch picks tiled."""

    def broken() -> str:
        raise RuntimeError("Error building extension 'acmix_cpp': simulated compiler failure")

    monkeypatch.setattr(cpp, "_STATE", cpp._State())  # this process has not tried yet
    monkeypatch.setattr(cpp, "_compile_and_load", broken)
    q, k, v, pos = _inputs((1, 2, 4, 6, 7), torch.float32)
    assert cpp.can_run_cpp(q) == (True, "")  # not tried yet: optimistic
    assert "on first use" in cpp.build_state()  # "not built yet (builds ...)" or "built, loads ..."
    with caplog.at_level(logging.WARNING, logger="acmix"):
        out = local_attention(q, k, v, 7, 1, pos)  # dispatch picks cpp, whose build fails
        out2 = local_attention(q, k, v, 7, 1, pos)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "cpp backend unavailable" in r.message]
    assert len(warnings) == 1 and "simulated compiler failure" in warnings[0].getMessage()
    want = local_attention(q, k, v, 7, 1, pos, backend="tiled")
    assert torch.equal(out, want) and torch.equal(out2, want)
    ok, reason = cpp.can_run_cpp(q)
    assert not ok and "build failed" in reason and "simulated compiler failure" in reason
    assert ops.choose_backend(q).name == "tiled"
    assert "simulated compiler failure" in cpp.build_state()


def test_missing_toolchain_is_reported(monkeypatch):
    monkeypatch.setattr(cpp, "_STATE", cpp._State())
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    ok, reason = cpp.can_run_cpp(torch.randn(1, 1, 1, 2, 2))
    assert not ok and "no C++ compiler" in reason
    assert ops.choose_backend(torch.randn(1, 1, 1, 2, 2)).name == "tiled"


def test_info_reports_the_build_state_without_building(monkeypatch, tmp_path, capsys):
    from acmix.cli.main import main

    monkeypatch.setattr(cpp, "_STATE", cpp._State())
    monkeypatch.setenv("ACMIX_EXTENSIONS_DIR", str(tmp_path))  # an empty cache: nothing built there
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["cpp_extension"] == "not built yet (builds on first use)"
    assert list(tmp_path.iterdir()) == [] and cpp._STATE.status == "unbuilt"
    row = next(b for b in info["backends"] if b["name"] == "cpp")
    assert row["runnable_on_cpu"] is True


_CHILD = textwrap.dedent(
    """
    import torch
    from acmix.ops._backends import cpp
    from acmix.ops import local_attention, local_attention_reference
    assert cpp.load_library(), cpp._STATE.reason
    q = torch.randn(1, 2, 4, 6, 5, dtype=torch.float64)
    out = local_attention(q, q, q, 3, 1, None, backend="cpp")
    torch.testing.assert_close(out, local_attention_reference(q, q, q, 3, 1))
    print(cpp._STATE.path)
    """
)


@pytest.mark.slow
def test_two_processes_building_at_once_share_one_cache(tmp_path):
    """Both processes start on an empty cache: torch's file lock lets one build while the other waits, then both
    load the same library."""
    env = {**os.environ, "ACMIX_EXTENSIONS_DIR": str(tmp_path)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (_out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    paths = {out.strip().splitlines()[-1] for out, _ in outs}
    assert len(paths) == 1 and paths.pop().startswith(str(tmp_path))
