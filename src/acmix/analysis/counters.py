"""Cross-check of the analytic MACs with ``torch.utils.flop_counter.FlopCounterMode``.

FlopCounterMode counts the operators that have a registered formula: convolutions (grouped too), ``mm`` /
``addmm`` / ``bmm`` (so Linear layers and matmul / einsum attention) and scaled-dot-product attention on the kernels
it knows (it has no formula for the fused CPU flash kernel, so counting runs SDPA on its math kernel). It reports
FLOPs = 2 x MACs; this module halves them. What it **cannot see** (:data:`COUNTER_BLIND`):

- the unfold-based local attention of ACmix / SASA / SAN: ``unfold`` copies and the elementwise products and sums
  of the logits and of the aggregation (2 * k_att^2 * C MACs per output pixel);
- the tensor shifts of Fig. 3 (a) (``roll`` + add);
- the Table 1 shift-and-sum of a decomposed k x k convolution (inside the conv's own count by construction);
- bias adds, norms, activations, softmax, pooling (not counted by the analytic side either).

So :func:`cross_check` compares only the counter-visible part of the analytic count (``CostItem.counter_visible``)
and reports the blind part separately.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from .walk import ModelCost, reference_attention, walk

__all__ = ["COUNTER_BLIND", "CrossCheck", "counter_macs", "cross_check"]

logger = logging.getLogger(__name__)

COUNTER_BLIND = (
    "unfold-based local attention (ACmix/SASA/SAN): logits and aggregation are elementwise products and sums",
    "tensor shifts (Fig. 3 a): roll + add",
    "the Table 1 shift-and-sum of a decomposed k x k conv (already inside the conv count)",
    "bias adds, norms, activations, softmax, pooling (not counted analytically either)",
)


def counter_macs(
    model: nn.Module,
    input_size: int | tuple[int, int] = 224,
    *,
    in_chans: int = 3,
    fake: bool = True,
    reference_attention_backend: bool = True,
) -> tuple[int, dict[str, int]]:
    """FlopCounterMode MACs (FLOPs / 2) of one forward on a (1, in_chans, H, W) input.

    Args:
        reference_attention_backend: run acmix's local attention on its ``"reference"`` backend while counting (the
            formulation the analytic count describes). Faster backends (``tiled``, ``flex``) compute the attention
            with matmuls over padded tiles, which the counter sees, tile padding included.

    Returns:
        (total MACs, ``{module name: MACs}``) with module names relative to ``model`` (``""`` for the root),
        each including its children.
    """
    h, w = (input_size, input_size) if isinstance(input_size, int) else input_size
    counter = FlopCounterMode(display=False)
    scope = _counting_scope(model, reference_attention_backend)
    training = {m: m.training for m in model.modules()}
    model.eval()
    try:
        ran = False
        if fake:
            from torch._subclasses.fake_tensor import FakeTensorMode

            try:
                with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad(), scope, counter:
                    model(torch.empty(1, in_chans, h, w))
                ran = True
            except Exception as exc:  # noqa: BLE001 - fall back to real tensors
                logger.info("fake-tensor count failed (%s); counting a real forward", exc)
                counter = FlopCounterMode(display=False)
                scope = _counting_scope(model, reference_attention_backend)
        if not ran:
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
            with torch.no_grad(), scope, counter:
                model(torch.zeros(1, in_chans, h, w, device=device))
    finally:
        for m, t in training.items():
            m.train(t)
    root = type(model).__name__
    per: dict[str, int] = {}
    for key, ops in counter.get_flop_counts().items():
        if key == "Global":
            continue
        rel = "" if key == root else key[len(root) + 1 :] if key.startswith(root + ".") else key
        per[rel] = sum(int(v) for v in ops.values()) // 2
    return counter.get_total_flops() // 2, per


@dataclass
class CrossCheck:
    """Analytic vs FlopCounterMode MACs of one model (per image).

    Attributes:
        analytic_macs: the walker's total.
        analytic_visible_macs: the part of it FlopCounterMode can see.
        blind_macs: the part it cannot see (:data:`COUNTER_BLIND`).
        counter_macs: FlopCounterMode's total (FLOPs / 2).
        mismatches: costed modules whose visible analytic MACs differ from the counter's, as
            ``(name, analytic, counter)``.
    """

    name: str
    analytic_macs: int
    analytic_visible_macs: int
    blind_macs: int
    counter_macs: int
    mismatches: list[tuple[str, int, int]] = field(default_factory=list)

    @property
    def rel_diff(self) -> float:
        """(counter - analytic visible) / analytic visible."""
        return (self.counter_macs - self.analytic_visible_macs) / max(self.analytic_visible_macs, 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "analytic_macs": self.analytic_macs,
            "analytic_visible_macs": self.analytic_visible_macs,
            "blind_macs": self.blind_macs,
            "counter_macs": self.counter_macs,
            "rel_diff": self.rel_diff,
            "mismatches": [list(m) for m in self.mismatches],
            "counter_blind_to": list(COUNTER_BLIND),
        }


def cross_check(
    model: nn.Module,
    input_size: int | tuple[int, int] = 224,
    *,
    name: str | None = None,
    model_cost: ModelCost | None = None,
    rel_tol: float = 1e-6,
) -> CrossCheck:
    """Compare the walker's counter-visible MACs with FlopCounterMode, in total and module by module."""
    mc = model_cost or walk(model, input_size, name=name)
    total, per = counter_macs(model, mc.input_size, in_chans=mc.in_chans)
    visible = mc.total.counter_visible_macs
    mismatches = []
    for m in mc.modules:
        if not m.calls:
            continue
        key = "" if m.name == "<root>" else m.name
        analytic, counted = m.cost.counter_visible_macs, per.get(key, 0)
        if abs(analytic - counted) > rel_tol * max(analytic, 1):
            mismatches.append((m.name, analytic, counted))
    return CrossCheck(mc.name, mc.macs, visible, mc.macs - visible, total, mismatches)


@contextlib.contextmanager
def _counting_scope(model: nn.Module, reference_backend: bool) -> Iterator[None]:
    """SDPA on its math kernel (the counter has no formula for the fused CPU kernels) and, optionally, acmix's
    reference local attention."""
    with sdpa_kernel([SDPBackend.MATH]), reference_attention() if reference_backend else contextlib.nullcontext():
        yield
