"""acmix.ops.use_backend / set_backend: one switch for every op's implementation (thread-local, nestable)."""

from __future__ import annotations

import threading

import pytest
import torch

import acmix
from acmix.ops import choose_aggregate_backend, choose_backend, current_backend, set_backend, use_backend
from acmix.ops.conv_path import FUSED_MAC_RATIO, resolve_conv_impl


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    monkeypatch.delenv("ACMIX_BACKEND", raising=False)
    monkeypatch.delenv("ACMIX_AGGREGATE_BACKEND", raising=False)
    yield
    set_backend(attention="auto", aggregate="auto", conv="auto")


def _q():
    return torch.randn(1, 1, 2, 3, 3)


def test_context_nests_and_restores():
    assert current_backend("attention") is None
    with use_backend(attention="reference"):
        assert choose_backend(_q()).name == "reference"
        with use_backend(attention="offset", conv="reference"):
            assert choose_backend(_q()).name == "offset"
            assert current_backend("conv") == "reference"
        with use_backend(attention="auto"):  # "auto": the automatic choice inside this block
            assert current_backend("attention") is None
        assert choose_backend(_q()).name == "reference" and current_backend("conv") is None
    assert current_backend("attention") is None


def test_context_restores_after_an_exception():
    with pytest.raises(RuntimeError), use_backend(aggregate="reference"):
        raise RuntimeError("boom")
    assert current_backend("aggregate") is None


def test_decorator():
    @use_backend(attention="offset")
    def which() -> str:
        return choose_backend(_q()).name

    assert which() == "offset" and which() == "offset"
    assert current_backend("attention") is None


def test_precedence_argument_context_global_environment(monkeypatch):
    automatic = choose_backend(_q()).name  # cpp where it builds, else tiled
    monkeypatch.setenv("ACMIX_BACKEND", "offset")
    assert choose_backend(_q()).name == "offset"  # environment
    set_backend(attention="reference")
    assert choose_backend(_q()).name == "reference"  # global default beats the environment
    with use_backend(attention="tiled"):
        assert choose_backend(_q()).name == "tiled"  # context beats the default
        assert choose_backend(_q(), "offset").name == "offset"  # the explicit argument beats everything
    with use_backend(attention="auto"):
        assert choose_backend(_q()).name == automatic  # automatic, whatever the default and environment say
    set_backend(attention="auto")  # removes the default: the environment decides again
    assert choose_backend(_q()).name == "offset"


def test_thread_local():
    seen: dict[str, str | None] = {}
    entered, release = threading.Event(), threading.Event()

    def other() -> None:
        entered.wait()
        seen["other"] = current_backend("attention")
        release.set()

    t = threading.Thread(target=other)
    t.start()
    with use_backend(attention="reference"):
        entered.set()
        release.wait(10)
        seen["main"] = current_backend("attention")
    t.join()
    assert seen == {"other": None, "main": "reference"}


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(attention="nope"), "unknown attention backend 'nope'; valid backends: auto, .*reference"),
        (dict(aggregate="nope"), "unknown aggregate backend 'nope'; valid backends: auto, .*offset"),
        (dict(conv="nope"), "unknown conv backend 'nope'; valid backends: auto, fused, reference"),
        (dict(conv=3), "conv backend must be a string name, got int"),
    ],
)
def test_unknown_names_are_one_line_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        use_backend(**kwargs)
    with pytest.raises(ValueError, match=match):
        set_backend(**kwargs)


def test_current_backend_rejects_unknown_op():
    with pytest.raises(ValueError, match="op must be one of"):
        current_backend("softmax")


def test_aggregate_and_conv_follow_the_context():
    x = torch.randn(1, 8, 5, 5)
    assert choose_aggregate_backend(x).name == "offset"
    with use_backend(aggregate="reference"):
        assert choose_aggregate_backend(x).name == "reference"
    assert resolve_conv_impl(None, 12, 16, 64, 3) == "fused"
    with use_backend(conv="reference"):
        assert resolve_conv_impl(None, 12, 16, 64, 3) == "reference"
        assert resolve_conv_impl("fused", 12, 16, 64, 3) == "fused"  # an explicit impl wins


def test_auto_conv_impl_follows_the_measured_mac_ratio():
    """fused costs C_out M k^2, reference k^2 M hd + C_out k^4 per pixel; fused while <= FUSED_MAC_RATIO x."""
    for heads in (1, 3, 4, 6, 8, 12, 24):
        c = 32 * heads
        fused, ref = c * 3 * heads * 9, 9 * 3 * heads * 32 + c * 81
        want = "fused" if fused <= FUSED_MAC_RATIO * ref else "reference"
        assert resolve_conv_impl("auto", 3 * heads, 32, c, 3) == want
    assert resolve_conv_impl("auto", 24, 32, 256, 3) == "fused"  # N = 8
    assert resolve_conv_impl("auto", 36, 32, 384, 3) == "reference"  # N = 12


def test_layers_follow_the_context_and_give_the_same_numbers():
    """The official-style formulation of every op, switched from outside the model, changes no output."""
    torch.manual_seed(0)
    layer = acmix.ACmix(8, num_heads=2).double()
    san = acmix.layers.ACmixSanAttention(64, 4, 16, kernel_size=3).double()
    x, xs = torch.randn(2, 8, 9, 7, dtype=torch.float64), torch.randn(2, 64, 6, 5, dtype=torch.float64)
    fast = layer(x), san(xs)
    calls: list[str] = []
    reference = acmix.ops._dispatch.ATTENTION.get("reference")
    spy = acmix.ops._dispatch.Backend(
        "reference", lambda *a: calls.append("attn") or reference.fn(*a), reference.can_run, reference.priority
    )
    acmix.ops._dispatch.ATTENTION._backends["reference"] = spy
    try:
        with use_backend(attention="reference", aggregate="reference", conv="reference"):
            assert layer.resolved_conv_impl() == "reference" and san.resolved_conv_impl() == "reference"
            slow = layer(x), san(xs)
    finally:
        acmix.ops._dispatch.ATTENTION._backends["reference"] = reference
    assert calls == ["attn"]
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b)
    assert layer.resolved_conv_impl() == "fused"
