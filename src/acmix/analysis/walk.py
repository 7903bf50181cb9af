"""Walk a built model and sum the analytic cost of every module, per model stage and per component.

Counts come from the modules actually built: the walker hooks the modules it has a rule for (``nn.Conv2d``,
``nn.Linear``, norms, ``acmix.ACmix`` and the attention modules in :data:`RULES`), runs one forward pass to record
the real feature-map sizes (on fake tensors by default: shapes without arithmetic, so a 224 x 224 ACmix-ResNet-50
costs about a second), and evaluates the formulas of :mod:`acmix.analysis.cost` with the modules' own attributes.
Every parameter is attributed to exactly one module, so ``ModelCost.params == sum(p.numel())``; a rule whose
parameter count disagrees with its module's parameters is logged as a warning.

Model stages come from module names: ``layer1`` ... (ResNet, SAN), ``layers.0`` / ``stages.0`` (Swin, timm),
``block1`` / ``patch_embed1`` (PVT); modules before the first stage are ``"stem"``, after the last ``"head"``.

A *mixer position* is the module the paper replaces: a k x k (k > 1, ungrouped, overlapping) convolution inside
a stage, or an attention / ACmix module. :meth:`ModelCost.stage_split` sums their Table 1 Stage I and Stage II
(paper Sec. 3.3: "sum up the cost of all 3 x 3 convolution modules" of ResNet-50).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from timm.models.swin_transformer import WindowAttention

from ..layers import ACmix, ACmixWindowAttention, SanAttention, SpatialReductionAttention
from ..ops import use_backend
from .cost import (
    MAC_CONVENTION,
    NO_STAGE,
    STAGE_I,
    STAGE_II,
    Component,
    Cost,
    CostItem,
    ProjAt,
    acmix_cost,
    conv_cost,
    linear_cost,
    san_attention_cost,
    spatial_reduction_attention_cost,
    window_attention_cost,
)

__all__ = [
    "MIXER_KINDS",
    "RULES",
    "Call",
    "ModelCost",
    "ModuleCost",
    "WalkContext",
    "register_rule",
    "stage_of",
    "walk",
]

logger = logging.getLogger(__name__)

#: kinds of module that sit at a mixer position (what ACmix replaces), summed by :meth:`ModelCost.stage_split`
MIXER_KINDS = frozenset(
    {"conv_kxk", "acmix", "local_attention", "window_attention", "acmix_window_attention", "sra", "acmix_sra", "san"}
)

Shape = tuple[int, ...]


@dataclass(frozen=True)
class WalkContext:
    """Counting options.

    Attributes:
        proj_at: count strided projections at ``"input"`` (as built) or ``"output"`` resolution.
        conv_impl: count ACmix conv paths as ``"reference"`` (FC + group conv, the paper's formulation) or
            ``"fused"`` (one grouped conv); ``None`` counts what each module is built to run.
        elementwise: also count what SAN's counter (``util/complexity.py``, a ptflops derivative, used for the
            SAN and ResNet numbers of docs/paper-numbers.md) counts: conv bias adds (1 per output element),
            BatchNorm (2 per element), ReLU (1 per element) and pooling (1 per input element), as component
            ``elementwise``.
    """

    proj_at: ProjAt = "input"
    conv_impl: str | None = None
    elementwise: bool = False


@dataclass(frozen=True)
class Call:
    """One recorded forward call: first tensor input / output shapes, and the arguments (tensors as shapes)."""

    input_shape: Shape
    output_shape: Shape | None
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    def arg(self, index: int, name: str, default: Any = None) -> Any:
        """Positional argument ``index`` (0 = the first input) or keyword ``name``."""
        if name in self.kwargs:
            return self.kwargs[name]
        return self.args[index] if index < len(self.args) else default


#: rule(module, call or None when the module never ran, ctx) -> (kind, cost)
Rule = Callable[[nn.Module, Call | None, WalkContext], tuple[str, Cost]]
RULES: dict[type, Rule] = {}


def register_rule(cls: type) -> Callable[[Rule], Rule]:
    """Register the cost rule of a module class (the most derived registered class of a module wins)."""

    def deco(fn: Rule) -> Rule:
        RULES[cls] = fn
        return fn

    return deco


def _rule_for(module: nn.Module) -> Rule | None:
    for cls in type(module).__mro__:
        if cls in RULES:
            return RULES[cls]
    return None


def _own_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _ran(cost: Cost, call: Call | None) -> Cost:
    return cost if call is not None else cost.with_macs_scaled(0)


# ---------------------------------------------------------------------------------------------------- rules
@register_rule(nn.Conv2d)
def _conv_rule(m: nn.Module, call: Call | None, ctx: WalkContext) -> tuple[str, Cost]:
    assert isinstance(m, nn.Conv2d)
    kh, kw = m.kernel_size
    h, w = (call.input_shape[-2], call.input_shape[-1]) if call else (1, 1)
    out_hw = (call.output_shape[-2], call.output_shape[-1]) if call and call.output_shape else None
    # a mixer position: k x k, ungrouped, overlapping windows (not a patch embedding); the stage is checked later
    mixer = max(kh, kw) > 1 and m.groups == 1 and max(m.stride) < max(kh, kw)
    cost = conv_cost(
        m.in_channels, m.out_channels, (kh, kw), h, w, stride=(m.stride[0], m.stride[1]), groups=m.groups,
        bias=m.bias is not None, decompose=mixer, out_hw=out_hw,
    )  # fmt: skip
    if ctx.elementwise and m.bias is not None and call and call.output_shape:
        cost = cost + _elementwise(_prod(call.output_shape))
    return ("conv_kxk" if mixer else "conv"), _ran(cost, call)


def _elementwise(macs: int) -> Cost:
    return Cost((CostItem(Component.ELEMENTWISE, NO_STAGE, 0, macs, counter_visible=False),))


@register_rule(nn.Linear)
def _linear_rule(m: nn.Module, call: Call | None, ctx: WalkContext) -> tuple[str, Cost]:
    assert isinstance(m, nn.Linear)
    tokens = 0 if call is None else _prod(call.input_shape[:-1])
    return "linear", linear_cost(m.in_features, m.out_features, tokens, bias=m.bias is not None)


def _norm_rule(m: nn.Module, call: Call | None, ctx: WalkContext) -> tuple[str, Cost]:
    cost = Cost((CostItem(Component.NORM, NO_STAGE, _own_params(m), 0),))
    if ctx.elementwise and call and isinstance(m, nn.modules.batchnorm._BatchNorm):
        cost = cost + _elementwise(_prod(call.input_shape) * (2 if m.affine else 1))
    return "norm", cost


for _norm in (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm, nn.SyncBatchNorm):
    RULES[_norm] = _norm_rule


def _elementwise_rule(m: nn.Module, call: Call | None, ctx: WalkContext) -> tuple[str, Cost]:
    """ReLU (1 per output element) and pooling (1 per input element): counted only with ``ctx.elementwise``."""
    if not ctx.elementwise or call is None:
        return "elementwise", Cost()
    pool = isinstance(m, (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d))
    return "elementwise", _elementwise(_prod(call.input_shape if pool else call.output_shape or call.input_shape))


for _ew in (nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d):
    RULES[_ew] = _elementwise_rule


@register_rule(ACmix)
def _acmix_rule(m: nn.Module, call: Call | None, ctx: WalkContext) -> tuple[str, Cost]:
    assert isinstance(m, ACmix)
    h, w = (call.input_shape[-2], call.input_shape[-1]) if call else (1, 1)
    cost = acmix_cost(
        m.dim, m.dim_out, h, w, stride=m.stride, num_heads=m.num_heads, attn_kernel_size=m.attn_kernel_size,
        conv_kernel_size=m.conv_kernel_size, qkv_bias=m.qkv.bias is not None, fc_bias=m.fc.bias is not None,
        use_rel_pos=m.pos_proj is not None, shift_mode=m.shift_mode, mix=m.mix,
        conv_impl=ctx.conv_impl or m.resolved_conv_impl(), proj_at=ctx.proj_at,
    )  # fmt: skip
    return ("local_attention" if m.mix == "attn" else "acmix"), _ran(cost, call)


def _built_conv_impl(m: nn.Module) -> str:
    """The convolution-path implementation an acmix host runs (``"fused"`` or ``"reference"``)."""
    resolve = getattr(m, "resolved_conv_impl", None)
    return str(resolve()) if callable(resolve) else "fused"


def _timm_window_attention_rule(m: nn.Module, call: Call | None, ctx: WalkContext) -> tuple[str, Cost]:
    """timm ``WindowAttention``: input (num_windows * B, M*M, C) tokens."""
    qkv = m.qkv
    assert isinstance(qkv, nn.Linear)
    ws = tuple(getattr(m, "window_size", (7, 7)))
    heads = int(getattr(m, "num_heads", 1))
    windows = call.input_shape[0] if call else 0
    cost = window_attention_cost(
        qkv.in_features, heads, (ws[0], ws[1]), ws[0], ws[1], head_dim=qkv.out_features // (3 * heads),
        qkv_bias=qkv.bias is not None,
    ).with_macs_scaled(windows)  # fmt: skip
    return "window_attention", cost


def _acmix_window_attention_rule(m: nn.Module, call: Call | None, ctx: WalkContext) -> tuple[str, Cost]:
    """acmix ``ACmixWindowAttention``: input the (rolled, padded) map (B, Hp, Wp, C), output (B, H, W, C)."""
    qkv, fc = m.qkv, m.fc
    assert isinstance(qkv, nn.Linear) and isinstance(fc, nn.Conv2d)
    ws = tuple(getattr(m, "window_size", (7, 7)))
    heads = int(getattr(m, "num_heads", 1))
    out = call.output_shape if call and call.output_shape else None
    h, w = (out[1], out[2]) if out else (ws[0], ws[1])
    cost = window_attention_cost(
        qkv.in_features, heads, (ws[0], ws[1]), h, w, head_dim=qkv.out_features // (3 * heads),
        qkv_bias=qkv.bias is not None, acmix=True, conv_kernel_size=int(getattr(m, "conv_kernel_size", 3)),
        fc_bias=fc.bias is not None, conv_impl=ctx.conv_impl or _built_conv_impl(m),
        mix=str(getattr(m, "mix", "learned")),
    )  # fmt: skip
    return "acmix_window_attention", _ran(cost, call)


def _sra_rule(mod: nn.Module, call: Call | None, ctx: WalkContext) -> tuple[str, Cost]:
    """acmix ``SpatialReductionAttention`` (PVT v1) and its ACmix version: forward(x, feat_size, num_prefix_tokens)."""
    m: Any = mod  # attributes of a class this module does not import
    dim, heads, sr = int(m.dim), int(m.num_heads), int(m.sr_ratio)
    q = m.q
    assert isinstance(q, nn.Linear)
    feat = call.arg(1, "feat_size") if call else None
    h, w = (int(feat[0]), int(feat[1])) if feat is not None else (sr, sr)
    prefix = int(call.arg(2, "num_prefix_tokens", 0) or 0) if call else 0
    is_acmix = hasattr(m, "shift_weight")
    fc = getattr(m, "fc", None)
    cost = spatial_reduction_attention_cost(
        dim, heads, h, w, sr_ratio=sr, qkv_bias=q.bias is not None, extra_tokens=prefix, acmix=is_acmix,
        conv_kernel_size=int(getattr(m, "conv_kernel_size", 3)),
        fc_bias=isinstance(fc, nn.Conv2d) and fc.bias is not None,
        conv_impl=ctx.conv_impl or _built_conv_impl(m),
    )  # fmt: skip
    return ("acmix_sra" if is_acmix else "sra"), _ran(cost, call)


def _san_rule(mod: nn.Module, call: Call | None, ctx: WalkContext) -> tuple[str, Cost]:
    """acmix ``SanAttention`` (SAN SAM, patchwise / pairwise) and its ACmix version: input (B, dim, H, W)."""
    m: Any = mod
    h, w = (call.input_shape[-2], call.input_shape[-1]) if call else (1, 1)
    is_acmix = hasattr(m, "shift_weight")
    cost = san_attention_cost(
        int(m.dim), int(m.rel_dim), int(m.out_dim), h, w,
        share_planes=int(m.share_planes), kernel_size=int(m.kernel_size),
        sa_type=str(m.sa_type), acmix=is_acmix, conv_kernel_size=int(getattr(m, "conv_kernel_size", 3)),
        conv_impl=ctx.conv_impl or _built_conv_impl(m), elementwise=ctx.elementwise,
    )  # fmt: skip
    return ("acmix" if is_acmix else "san"), _ran(cost, call)


RULES[WindowAttention] = _timm_window_attention_rule
RULES[ACmixWindowAttention] = _acmix_window_attention_rule
RULES[SpatialReductionAttention] = _sra_rule  # and ACmixSpatialReductionAttention, a subclass
RULES[SanAttention] = _san_rule  # and ACmixSanAttention, a subclass


def _prod(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


# ---------------------------------------------------------------------------------------------------- stages
_STAGE_PATTERNS: tuple[tuple[re.Pattern[str], int], ...] = (
    (re.compile(r"(?:^|\.)layer(\d+)(?:\.|$)"), 0),  # ResNet layer1..4, SAN layer0..4
    (re.compile(r"(?:^|\.)(?:layers|stages)\.(\d+)(?:\.|$)"), 1),  # timm Swin / generic, 0-based
    (re.compile(r"(?:^|\.)(?:block|patch_embed|pos_embed|stage)(\d+)(?:\.|$)"), 0),  # PVT v1 block1..4
)


def stage_of(name: str) -> str | None:
    """``"stage<n>"`` for a module name inside a model stage, else None."""
    for pattern, offset in _STAGE_PATTERNS:
        match = pattern.search(name)
        if match:
            return f"stage{int(match.group(1)) + offset}"
    return None


# ---------------------------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class ModuleCost:
    """The cost of one costed module (summed over its calls)."""

    name: str
    kind: str
    stage: str
    cost: Cost
    calls: int
    input_shape: Shape | None
    output_shape: Shape | None

    @property
    def is_mixer(self) -> bool:
        return self.kind in MIXER_KINDS and self.stage not in ("stem", "head")


@dataclass
class ModelCost:
    """Per-module costs of one model at one input size (batch 1: all figures are per image)."""

    name: str
    input_size: tuple[int, int]
    modules: list[ModuleCost] = field(default_factory=list)
    proj_at: str = "input"
    traced_with: str = "fake"
    in_chans: int = 3

    @property
    def total(self) -> Cost:
        return Cost.sum(m.cost for m in self.modules)

    @property
    def params(self) -> int:
        return self.total.params

    @property
    def macs(self) -> int:
        return self.total.macs

    def by_stage(self) -> dict[str, dict[str, int]]:
        """``{model stage: {"params", "macs"}}`` in module order."""
        out: dict[str, dict[str, int]] = {}
        for m in self.modules:
            row = out.setdefault(m.stage, {"params": 0, "macs": 0})
            row["params"] += m.cost.params
            row["macs"] += m.cost.macs
        return out

    def by_component(self) -> dict[str, dict[str, int]]:
        return self.total.by_component()

    def stage_split(self) -> dict[str, Any]:
        """Table 1 Stage I / Stage II MACs of the mixer positions, per model stage and in total.

        Returns:
            ``{"per_stage": {stage: {"stage_I", "stage_II", "share_I", "positions"}}, "stage_I", "stage_II",
            "share_I", "positions", "proj_at"}`` (shares are fractions of Stage I + Stage II).
        """
        per: dict[str, dict[str, Any]] = {}
        for m in self.modules:
            if not m.is_mixer:
                continue
            row = per.setdefault(m.stage, {"stage_I": 0, "stage_II": 0, "positions": 0})
            row["stage_I"] += m.cost.stage_macs(STAGE_I)
            row["stage_II"] += m.cost.stage_macs(STAGE_II)
            row["positions"] += 1
        for row in per.values():
            row["share_I"] = _share(row["stage_I"], row["stage_II"])
        s1 = sum(r["stage_I"] for r in per.values())
        s2 = sum(r["stage_II"] for r in per.values())
        positions = sum(r["positions"] for r in per.values())
        return {
            "per_stage": per,
            "stage_I": s1,
            "stage_II": s2,
            "share_I": _share(s1, s2),
            "positions": positions,
            "proj_at": self.proj_at,
        }

    def to_dict(self, modules: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "input_size": list(self.input_size),
            "params": self.params,
            "macs": self.macs,
            "convention": MAC_CONVENTION,
            "by_stage": self.by_stage(),
            "by_component": self.by_component(),
            "stage_split": self.stage_split(),
        }
        if modules:
            out["modules"] = [
                {"name": m.name, "kind": m.kind, "stage": m.stage, "calls": m.calls, **m.cost.to_dict()}
                for m in self.modules
            ]
        return out


def _share(a: int, b: int) -> float:
    return a / (a + b) if a + b else 0.0


# ---------------------------------------------------------------------------------------------------- walker
def _first_tensor(x: Any) -> torch.Tensor | None:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)):
        for v in x:
            t = _first_tensor(v)
            if t is not None:
                return t
    if isinstance(x, dict):
        for v in x.values():
            t = _first_tensor(v)
            if t is not None:
                return t
    return None


def _describe(x: Any) -> Any:
    """A call argument for the rules: tensors become their shapes; ints, tuples of ints and the like stay."""
    if isinstance(x, torch.Tensor):
        return tuple(x.shape)
    if isinstance(x, (tuple, list)):
        return type(x)(_describe(v) for v in x)
    return x


def _in_chans(model: nn.Module) -> int:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
        if isinstance(m, nn.Linear):
            return m.in_features
    return 3


def reference_attention() -> use_backend:
    """Count on the ``"reference"`` local-attention backend: the analytic count describes the reference formulation;
    fast backends may tile, pad or synchronise on data (which fake tensors cannot do), none of which changes the
    operator's multiply-adds."""
    return use_backend(attention="reference")


def _run_forward(model: nn.Module, x_shape: tuple[int, ...], fake: bool, on_retry: Callable[[], None]) -> str:
    if fake:
        from torch._subclasses.fake_tensor import FakeTensorMode

        try:
            with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
                model(torch.empty(x_shape))
            return "fake"
        except Exception as exc:  # noqa: BLE001 - any op without a fake kernel: fall back to real tensors
            logger.info("fake-tensor forward failed (%s: %s); running a real forward", type(exc).__name__, exc)
            on_retry()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    with torch.no_grad():
        model(torch.zeros(x_shape, device=device))
    return "real"


def walk(
    model: nn.Module,
    input_size: int | tuple[int, int] = 224,
    *,
    name: str | None = None,
    in_chans: int | None = None,
    proj_at: ProjAt = "input",
    conv_impl: str | None = None,
    elementwise: bool = False,
    fake: bool = True,
) -> ModelCost:
    """Cost every module of a built model on one (1, in_chans, H, W) input.

    Args:
        model: any ``nn.Module`` taking an image batch.
        input_size: H or (H, W).
        name: label for the result (default: the class name).
        in_chans: input channels (default: the first conv's ``in_channels``).
        proj_at: count strided projections at ``"input"`` resolution (as built) or ``"output"`` (Sec. 3.3;
            docs/paper-numbers.md).
        conv_impl: ``"reference"`` counts every ACmix conv path as FC + group conv (the paper's formulation,
            108 C per pixel for k_c = 3 whatever N); ``None`` counts what the modules run (``"fused"``: 3N k_c^2 C).
        elementwise: SAN's counter convention (:class:`WalkContext`): also count conv bias adds, BatchNorm, ReLU
            and pooling. Off by default: the paper's MACs are multiply-adds.
        fake: trace on fake tensors (no arithmetic); falls back to a real forward if an op cannot run fake.

    Returns:
        a :class:`ModelCost` (per image).
    """
    h, w = (input_size, input_size) if isinstance(input_size, int) else input_size
    if h < 1 or w < 1:
        raise ValueError(f"input_size must be positive, got {input_size!r}")
    if conv_impl not in (None, "reference", "fused"):
        raise ValueError(f"conv_impl must be None, 'reference' or 'fused', got {conv_impl!r}")
    ctx = WalkContext(proj_at=proj_at, conv_impl=conv_impl, elementwise=elementwise)
    costed = _costed_modules(model)
    chans = in_chans or _in_chans(model)
    records, traced = _record_calls(model, costed, (1, chans, h, w), fake)
    result = ModelCost(name or type(model).__name__, (h, w), proj_at=proj_at, traced_with=traced, in_chans=chans)
    seen_params: set[int] = set()
    seen_stage = False
    for mod_name, mod, rule in costed:
        # stages: from names; modules before the first stage are "stem", after it "head"
        stage = stage_of(mod_name)
        if stage is None:
            stage = "head" if seen_stage else "stem"
        else:
            seen_stage = True
        result.modules.append(_module_cost(mod_name, mod, rule, records[mod_name], stage, ctx, seen_params))
    result.modules += _unruled_parameters(model, {n for n, _, _ in costed}, seen_params)
    return result


def _costed_modules(model: nn.Module) -> list[tuple[str, nn.Module, Rule]]:
    """The modules that are costed: each module with a rule that is not inside another costed module."""
    costed: list[tuple[str, nn.Module, Rule]] = []
    for mod_name, mod in model.named_modules():
        if any(_inside(mod_name, c) for c, _, _ in costed):
            continue
        rule = _rule_for(mod)
        if rule is not None:
            costed.append((mod_name, mod, rule))
    return costed


def _record_calls(
    model: nn.Module, costed: list[tuple[str, nn.Module, Rule]], x_shape: tuple[int, ...], fake: bool
) -> tuple[dict[str, list[Call]], str]:
    """Run one forward in eval mode with a hook on every costed module; returns its calls and how it was traced.

    The model's train/eval flags are restored and the hooks removed afterwards, whatever happens.
    """
    records: dict[str, list[Call]] = {n: [] for n, _, _ in costed}

    def record(name: str) -> Callable[..., None]:
        def hook(m: nn.Module, args: Any, kwargs: Any, out: Any) -> None:
            t_in, t_out = _first_tensor(args), _first_tensor(out)
            if t_in is None:
                t_in = _first_tensor(kwargs)
            if t_in is not None:
                records[name].append(
                    Call(
                        tuple(t_in.shape),
                        None if t_out is None else tuple(t_out.shape),
                        tuple(_describe(a) for a in args),
                        {k: _describe(v) for k, v in kwargs.items()},
                    )
                )

        return hook

    def reset() -> None:
        for calls in records.values():
            calls.clear()

    handles = [mod.register_forward_hook(record(n), with_kwargs=True) for n, mod, _ in costed]
    training = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with reference_attention():
            traced = _run_forward(model, x_shape, fake, reset)
    finally:
        for hd in handles:
            hd.remove()
        for m, t in training.items():
            m.train(t)
    return records, traced


def _module_cost(
    mod_name: str,
    mod: nn.Module,
    rule: Rule,
    calls: list[Call],
    stage: str,
    ctx: WalkContext,
    seen_params: set[int],
) -> ModuleCost:
    """One costed module: parameters once, MACs of every call, parameters reconciled with the module's own."""
    if calls:
        costs = [rule(mod, call, ctx) for call in calls]
        kind = costs[0][0]
        extra = [
            CostItem(i.component, i.stage, 0, i.macs, i.in_total, i.counter_visible) for _, c in costs[1:] for i in c
        ]
        cost = Cost.sum(c for _, c in costs[:1]) + Cost(tuple(extra))  # parameters once, MACs of every call
    else:
        kind, cost = rule(mod, None, ctx)
    actual = [p for p in mod.parameters() if id(p) not in seen_params]
    seen_params.update(id(p) for p in actual)
    n_actual = sum(p.numel() for p in actual)
    if cost.params != n_actual:
        logger.warning(
            "%s (%s): rule counts %d parameters, the module holds %d (unshared); using the module's count",
            mod_name, type(mod).__name__, cost.params, n_actual,
        )  # fmt: skip
        cost = cost + Cost((CostItem(Component.OTHER, NO_STAGE, n_actual - cost.params, 0),))
    if kind == "conv_kxk" and stage in ("stem", "head"):  # a k x k conv outside the stages: not a mixer
        cost = Cost(
            tuple(
                CostItem(Component.CONV, NO_STAGE, i.params, i.macs) if i.component == Component.PROJECTION else i
                for i in cost
                if i.component != Component.SHIFT_SUM
            )
        )
        kind = "conv"
    first = calls[0] if calls else None
    return ModuleCost(
        mod_name, kind, stage, cost, len(calls), first.input_shape if first else None,
        first.output_shape if first else None,
    )  # fmt: skip


def _unruled_parameters(model: nn.Module, costed_names: set[str], seen_params: set[int]) -> list[ModuleCost]:
    """Parameters of modules without a rule (position embeddings, cls token, unknown layers), MACs not counted."""
    out = []
    for mod_name, mod in model.named_modules():
        if any(_inside(mod_name, c) for c in costed_names):
            continue
        own = [p for p in mod.parameters(recurse=False) if id(p) not in seen_params]
        if not own:
            continue
        seen_params.update(id(p) for p in own)
        stage = stage_of(mod_name) or "stem"
        if next(mod.children(), None) is None and _looks_computational(mod):
            logger.warning("no cost rule for %s (%s): its MACs are not counted", mod_name, type(mod).__name__)
        n = sum(p.numel() for p in own)
        cost = Cost((CostItem(Component.OTHER, NO_STAGE, n, 0),))
        out.append(ModuleCost(mod_name or "<root>", "other", stage, cost, 0, None, None))
    return out


def _inside(name: str, prefix: str) -> bool:
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


def _looks_computational(mod: nn.Module) -> bool:
    return any(p.dim() >= 2 for p in mod.parameters(recurse=False))
