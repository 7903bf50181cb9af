"""The triton backends' registration and availability rules, checked without running a kernel (no interpreter)."""

from __future__ import annotations

import json

import pytest
import torch

from acmix import ops
from acmix.cli.main import main
from acmix.ops._backends import triton_attention
from acmix.ops._backends.triton_attention import axis_reflection, can_run_on, can_run_triton, empty_like_layout
from acmix.ops._indexing import multiplicity, reflect_index


def test_both_ops_register_triton_as_opt_in():
    assert "triton" in ops.available_backends() and "triton" in ops.available_aggregate_backends()
    assert ops.get_backend("triton").opt_in
    assert ops.choose_backend(torch.randn(1, 1, 16, 4, 4)).name != "triton"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU rules")
def test_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    ok, why = can_run_on(torch.empty(1))
    assert not ok and "CUDA" in why and "TRITON_INTERPRET=1" in why
    with pytest.raises(ValueError, match="backend 'triton' cannot run here: .*TRITON_INTERPRET"):
        ops.choose_backend(torch.randn(1, 1, 16, 4, 4), "triton")
    if triton_attention.triton_status()[0] and triton_attention._kernels_interpreted() is None:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert can_run_on(torch.empty(1)) == (True, "")
        assert not can_run_on(torch.empty(1, dtype=torch.float64))[0]
        ok, why = can_run_triton(torch.empty(1, 1, 256, 2, 2))
        assert not ok and "head_dim <= 128" in why


def test_info_lists_every_backend_of_both_ops_with_reasons(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    for key, registry_names in (
        ("backends", ops.available_backends()),
        ("aggregate_backends", ops.available_aggregate_backends()),
    ):
        rows = {r["name"]: r for r in info[key]}
        assert list(rows) == registry_names
        for r in rows.values():
            assert r["runnable_on_cpu"] or r["reason"], r  # a backend that cannot run says why
            assert r["runnable_on_cuda"] or r["reason_cuda"], r
        assert rows["triton"]["opt_in"]
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "SAN aggregation backends" in out and "triton" in out and "opt-in only" in out


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("kernel_size", [1, 3, 7, 11])
def test_kernel_reflection_constants_reproduce_the_multiplicity(n, kernel_size):
    """The closed forms the kernels evaluate (in Python here) equal acmix.ops._indexing on every (centre, key)."""
    pad = kernel_size // 2
    period, off, once = axis_reflection(n, pad)
    assert off % period == 0 and off >= pad + n
    want = multiplicity(n, kernel_size, 1)  # (n, n): centre c, key r
    for c in range(n):
        for r in range(n):
            if once:
                got = (
                    int(abs(r - c) <= pad)
                    + int(r >= 1 and r + c <= pad)
                    + int(r <= n - 2 and abs(2 * (n - 1) - r - c) <= pad)
                )
            else:
                got = (c + pad - r + off) // period - (c - pad - 1 - r + off) // period
                if 0 < r < n - 1:
                    got += (c + pad + r + off) // period - (c - pad - 1 + r + off) // period
            assert got == want[c, r], (c, r)
    i = torch.arange(-pad, n + pad)  # every position a window reaches
    assert bool((i + off >= 0).all())  # Triton's % truncates: the offset keeps the dividend non-negative
    j = (i + off) % period
    assert torch.equal(torch.where(j >= n, period - j, j), reflect_index(i, n))


def test_output_layout_helper_matches_the_views():
    x = torch.empty(2, 3 * 32, 5, 6).contiguous(memory_format=torch.channels_last)
    q = x[:, :32].reshape(2, 2, 16, 5, 6)
    assert empty_like_layout(q, (2, 2, 16, 3, 3)).reshape(2, 32, 3, 3).is_contiguous(memory_format=torch.channels_last)
    q = torch.empty(2, 96, 5, 6)[:, :32].reshape(2, 2, 16, 5, 6)
    assert empty_like_layout(q, (2, 2, 16, 3, 3)).is_contiguous()
