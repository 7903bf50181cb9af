"""ACmix(recompute=True): the same outputs and gradients as the plain layer, and less saved for backward."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import acmix
from acmix import ACmix


def _pair(dim: int, heads: int, stride: int, kernel: int) -> tuple[ACmix, ACmix]:
    plain = ACmix(dim, num_heads=heads, stride=stride, attn_kernel_size=kernel).double()
    twin = ACmix(dim, num_heads=heads, stride=stride, attn_kernel_size=kernel, recompute=True).double()
    twin.load_state_dict(plain.state_dict())
    return plain, twin


def _grads(layer: ACmix, x: torch.Tensor, g: torch.Tensor) -> list[torch.Tensor]:
    x = x.clone().requires_grad_(True)
    out = layer(x)
    out.backward(g)
    return [out.detach(), x.grad] + [p.grad.clone() for p in layer.parameters() if p.grad is not None]


def _check(dim: int, heads: int, stride: int, kernel: int, h: int, w: int, backend: str | None = None) -> None:
    plain, twin = _pair(dim, heads, stride, kernel)
    x = torch.randn(2, dim, h, w, dtype=torch.float64)
    g = torch.randn(plain(x).shape, dtype=torch.float64)
    with acmix.use_backend(backend):
        want, got = _grads(plain, x, g), _grads(twin, x, g)
    assert len(want) == len(got) == 2 + sum(1 for _ in plain.parameters())
    for a, b in zip(want, got, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", ["reference", "tiled", None])
@pytest.mark.parametrize(("h", "w", "stride"), [(9, 7, 1), (9, 7, 2), (1, 1, 1), (5, 6, 2)])
def test_recompute_matches_the_plain_layer(fresh_seed, backend, h, w, stride):
    _check(8, 2, stride, 5, h, w, backend)


@given(
    heads=st.sampled_from([1, 2, 4]),
    head_dim=st.sampled_from([1, 2, 3]),
    kernel=st.sampled_from([1, 3, 5, 7]),
    stride=st.sampled_from([1, 2]),
    h=st.integers(1, 10),
    w=st.integers(1, 10),
    seed=st.integers(0, 2**31 - 1),
)
def test_recompute_matches_over_shapes(heads, head_dim, kernel, stride, h, w, seed):
    torch.manual_seed(seed)
    _check(heads * head_dim, heads, stride, kernel, h, w)


def _saved_bytes(layer: ACmix, x: torch.Tensor) -> int:
    """Bytes of the tensors autograd saves for backward during one forward (distinct storages)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "meta":
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    return sum(seen.values())


def test_recompute_saves_only_the_input_and_parameters():
    plain, twin = _pair(32, 4, 1, 7)
    x = torch.randn(2, 32, 14, 14, dtype=torch.float64, requires_grad=True)
    params = sum(p.numel() * p.element_size() for p in plain.parameters())
    saved_twin, saved_plain = _saved_bytes(twin, x), _saved_bytes(plain, x)
    # the input (x itself) and at most the parameters: no activation of the projection or the paths
    assert saved_twin <= x.numel() * x.element_size() + params, (saved_twin, saved_plain)
    assert saved_plain > 4 * saved_twin, (saved_twin, saved_plain)


def test_recompute_is_a_plain_forward_without_grad_and_survives_scripting():
    plain, twin = _pair(8, 2, 1, 3)
    x = torch.randn(1, 8, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), plain(x))
    scripted = torch.jit.script(twin)
    torch.testing.assert_close(scripted(x), plain(x))
    traced = torch.fx.symbolic_trace(twin)
    torch.testing.assert_close(traced(x), plain(x))


def test_models_pass_recompute_to_every_layer():
    model = acmix.create_model("acmix_resnet26", num_classes=3, acmix_kwargs={"recompute": True})
    layers = [m for m in model.modules() if isinstance(m, ACmix)]
    assert layers and all(m.recompute for m in layers)
    assert "recompute=True" in repr(layers[0])
    assert "recompute" not in repr(ACmix(8, num_heads=2))
