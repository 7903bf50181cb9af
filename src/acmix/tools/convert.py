"""Put ACmix into any network: replace the k x k convolutions of an ``nn.Module`` by :class:`acmix.ACmix` layers.

Pan et al., "On the Integration of Self-Attention and Convolution", CVPR 2022 (arXiv 2111.14556), Sec. 4: ACmix takes
the place of the k x k convolution of a network (the 3 x 3 of a ResNet bottleneck), with the same input and output
channels and the same stride. :func:`convert_model` does that for any model: torchvision and timm CNNs, and
conv + norm + act blocks such as ultralytics' ``Conv``, which is replaced as a whole so that the framework's
``fuse()`` (which folds the norm of its own blocks into their convolution) and export keep working.

Weights: every ACmix layer starts from its own initialisation (:meth:`acmix.ACmix.reset_parameters`); the replaced
convolution's weights are dropped. No exact mapping exists (``docs/deviations.md``, "ACmix in other networks").
"""

from __future__ import annotations

import copy
import fnmatch
import logging
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn

from ..analysis import walk
from ..analysis.walk import ModelCost, stage_of
from ..layers import ACmix, ConvPathMixin

__all__ = ["ACmixNormAct", "ConversionReport", "Replaced", "Skipped", "choose_heads", "convert_model"]

logger = logging.getLogger(__name__)

#: plain attributes a framework attaches to its layers and reads later; carried over to the replacement
#: (ultralytics' ``parse_model`` sets ``f``, ``i``, ``type`` and ``np`` on every top-level layer, its forward reads
#: ``f`` and ``i``)
CARRIED_ATTRS = ("f", "i", "type", "np")
_FORBIDDEN_KWARGS = {"dim", "dim_out", "in_planes", "out_planes", "stride", "num_heads", "head", "dilation"}


class ACmixNormAct(nn.Module):
    """ACmix in place of the convolution of a conv + norm + act block: ``act(bn(conv(x)))`` with ``conv`` an ACmix.

    The attribute names are those of the block it replaces (ultralytics' ``Conv``: ``conv``, ``bn``, ``act``), so the
    norm's and activation's state-dict keys are unchanged. It is not the framework's block class, so the framework's
    ``fuse()`` leaves it alone (an ACmix has no single kernel to fold the norm into).

    Shape:
        input (B, C_in, H, W) -> output (B, C_out, ceil(H / stride), ceil(W / stride)), NCHW.
    """

    def __init__(self, conv: ACmix, bn: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.conv, self.bn, self.act = conv, bn, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


@dataclass(frozen=True)
class Replaced:
    """One convolution (or conv + norm + act block, ``kind="block"``) replaced by ACmix.

    ``params_*`` count the convolution and the ACmix layer; ``macs_*`` (None without ``input_size``) their
    multiply-adds per image from :func:`acmix.analysis.walk`.
    """

    name: str
    kind: str
    stage: str | None
    in_channels: int
    out_channels: int
    kernel_size: int
    stride: int
    num_heads: int
    attn_kernel_size: int
    conv_kernel_size: int
    params_before: int
    params_after: int
    macs_before: int | None = None
    macs_after: int | None = None
    dropped_bias: bool = False


@dataclass(frozen=True)
class Skipped:
    """A convolution left as it is, and why."""

    name: str
    reason: str


@dataclass
class ConversionReport:
    """What :func:`convert_model` did. ``str(report)`` is a printable table.

    ``params_*`` are whole-model parameter counts; ``macs_*`` whole-model multiply-adds per image at ``input_size``
    (None when no ``input_size`` was given), counted by :func:`acmix.analysis.walk` (its MAC convention).
    """

    replaced: list[Replaced] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    macs_before: int | None = None
    macs_after: int | None = None
    input_size: tuple[int, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        lines = [f"ACmix conversion: {len(self.replaced)} replaced, {len(self.skipped)} convolutions kept"]
        if self.replaced:
            width = max(len("module"), *(len(r.name or "<model>") for r in self.replaced))
            with_macs = all(r.macs_before is not None and r.macs_after is not None for r in self.replaced)
            header = f"  {'module':<{width}}  kind    in   out  k  s  heads  {'params: conv -> ACmix':>24}"
            lines.append(header + (f"  {'MMACs: conv -> ACmix':>22}" if with_macs else ""))
            for r in self.replaced:
                row = (
                    f"  {r.name or '<model>':<{width}}  {r.kind:<5} {r.in_channels:>5} {r.out_channels:>5} "
                    f"{r.kernel_size:>2} {r.stride:>2}  {r.num_heads:>5}  "
                    f"{r.params_before:>11,} -> {r.params_after:>9,}"
                )
                if with_macs:
                    row += f"  {(r.macs_before or 0) / 1e6:>10.2f} -> {(r.macs_after or 0) / 1e6:>8.2f}"
                lines.append(row)
        by_reason: dict[str, list[str]] = {}
        for s in self.skipped:
            by_reason.setdefault(s.reason, []).append(s.name or "<model>")
        for reason, names in by_reason.items():
            shown = ", ".join(names[:4]) + (f", ... ({len(names)} in all)" if len(names) > 4 else "")
            lines.append(f"  kept ({reason}): {shown}")
        lines.append(f"  params: {self.params_before:,} -> {self.params_after:,}")
        if self.macs_before is not None and self.macs_after is not None and self.input_size is not None:
            h, w = self.input_size
            lines.append(
                f"  MACs at {h}x{w} (multiply-adds per image): {self.macs_before / 1e9:.3f} G -> "
                f"{self.macs_after / 1e9:.3f} G"
            )
        return "\n".join(lines)


def choose_heads(channels: int, max_heads: int = 4) -> int:
    """The number of heads for ``channels`` output channels: the largest divisor of ``channels`` <= ``max_heads``.

    The official operator's 4 when it divides the channels, else 2 or 1 (for ``max_heads=4``).
    (defaults: docs/official-code.md, "The ResNet operator").
    """
    if not isinstance(max_heads, int) or isinstance(max_heads, bool) or max_heads < 1:
        raise ValueError(f"num_heads must be a positive int, got {max_heads!r}")
    return max(d for d in range(1, min(max_heads, channels) + 1) if channels % d == 0)


def _square(value: Any) -> int | None:
    """``k`` for ``k`` or ``(k, k)``, None for a non-square pair."""
    if isinstance(value, int):
        return value
    a, b = value
    return int(a) if a == b else None


def _structural_reason(conv: nn.Conv2d) -> str | None:
    """Why ``conv`` cannot become an ACmix layer with the same shapes (None when it can)."""
    if isinstance(conv, nn.modules.lazy.LazyModuleMixin) and conv.has_uninitialized_params():
        return "uninitialised lazy convolution"
    k = _square(conv.kernel_size)
    if k is None:
        return f"non-square kernel {tuple(conv.kernel_size)}"
    if k == 1:
        return "pointwise (1x1)"
    if k % 2 == 0:
        return f"even kernel {k}x{k} (ACmix needs an odd kernel)"
    if conv.groups != 1:
        return "depthwise" if conv.groups == conv.in_channels else f"grouped (groups={conv.groups})"
    if _square(conv.dilation) != 1:
        return f"dilated (dilation={tuple(conv.dilation)})"
    s = _square(conv.stride)
    if s is None:
        return f"non-square stride {tuple(conv.stride)}"
    if s >= k:
        return f"stride {s} >= kernel {k} (non-overlapping patch embedding)"
    if conv.padding_mode != "zeros":
        return f"padding mode {conv.padding_mode!r} (ACmix pads as its own border rule, i.e. 'same' with zeros)"
    same = conv.padding == "same" or _square(conv.padding) == k // 2
    if not same:
        return f"padding {conv.padding!r} (ACmix keeps 'same' geometry: padding {k // 2} for a {k}x{k} kernel)"
    return None


def _is_conv_norm_act(module: nn.Module) -> bool:
    """A conv + norm + act block whose framework folds the norm into the conv (ultralytics' ``Conv`` layout):
    children exactly ``conv`` (Conv2d), ``bn`` (BatchNorm) and ``act``, and a ``forward_fuse`` method."""
    children = dict(module.named_children())
    return (
        set(children) == {"conv", "bn", "act"}
        and isinstance(children["conv"], nn.Conv2d)
        and isinstance(children["bn"], nn.modules.batchnorm._BatchNorm)
        and callable(getattr(module, "forward_fuse", None))
    )


def _stage_key(stage: int | str) -> str:
    return f"stage{stage}" if isinstance(stage, int) else str(stage)


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _carry(old: nn.Module, new: nn.Module, attrs: Sequence[str]) -> None:
    for attr in attrs:
        if attr in old.__dict__:
            setattr(new, attr, old.__dict__[attr])
    # a carried parameter count and type name describe the old layer (setattr: ``type`` shadows nn.Module.type, as
    # ultralytics does)
    if "np" in new.__dict__:
        setattr(new, "np", _params(new))  # noqa: B010
    if "type" in new.__dict__:
        setattr(new, "type", f"{type(new).__module__}.{type(new).__qualname__}")  # noqa: B010


def convert_model(
    model: nn.Module,
    *,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    stages: Iterable[int | str] | None = None,
    min_channels: int = 16,
    num_heads: int = 4,
    attn_kernel_size: int = 7,
    conv_kernel_size: int | None = None,
    input_size: int | tuple[int, int] | None = None,
    in_chans: int | None = None,
    inplace: bool = False,
    carry_attrs: Sequence[str] = CARRIED_ATTRS,
    **acmix_kwargs: Any,
) -> tuple[nn.Module, ConversionReport]:
    """Replace the k x k spatial convolutions of ``model`` by ACmix layers with the same channels and stride.

    A convolution is replaced when it is a square, odd, ungrouped, undilated ``nn.Conv2d`` (subclasses included) with
    k > 1, stride < k, zero padding of k // 2 (``'same'``) and at least ``min_channels`` input and output channels,
    passing the name and stage filters. A conv + norm + act block in ultralytics' layout (children ``conv``, ``bn``,
    ``act`` and a ``forward_fuse`` method) is replaced as a whole by :class:`ACmixNormAct` (the same norm, with its
    running statistics reset, and the same activation), so ``fuse()`` and export keep working. Every convolution
    kept is listed in the report with the reason. ACmix layers already in the model are left alone.

    Each ACmix layer gets ``choose_heads(out_channels, num_heads)`` heads, the given attention window and a conv-path
    kernel equal to the replaced kernel (or ``conv_kernel_size``), on the convolution's device and dtype, in its
    train/eval mode. It starts from its own initialisation: the convolution's weights are dropped, and so is its bias
    (``dropped_bias`` in the report; in a conv + norm block the norm absorbs it). Attributes in ``carry_attrs`` found
    on a replaced module (ultralytics' layer bookkeeping) are set on its replacement.

    Args:
        model: any ``nn.Module`` (a single ``nn.Conv2d`` too: the replacement is returned).
        include: glob pattern(s) (``fnmatch``, e.g. ``"layer3.*"``) of module names to consider; None: all.
        exclude: glob pattern(s) of module names to keep as they are.
        stages: model stages to convert, as numbers or ``"stage<n>"`` names (:func:`acmix.analysis.walk.stage_of`:
            ``layer1`` ..., ``stages.0`` ..., ``block1`` ...); None: everywhere.
        min_channels: keep convolutions with fewer input or output channels (the default 16 keeps RGB stems).
        num_heads: the most heads per layer (the official 4); fewer when 4 does not divide the channels.
        attn_kernel_size: the attention window k_att (official 7).
        conv_kernel_size: the conv-path kernel (default: the replaced kernel size).
        input_size: H or (H, W): also count multiply-adds before and after (per image, with ``in_chans`` channels).
        in_chans: input channels for the count (default: the first convolution's).
        inplace: convert ``model`` itself; by default a deep copy is converted and ``model`` is left unchanged.
        carry_attrs: plain attributes to carry over from a replaced module.
        **acmix_kwargs: further :class:`acmix.ACmix` arguments (``mix``, ``shift_mode``, ``backend``, ...).

    Returns:
        ``(converted_model, report)``.
    """
    _check_options(acmix_kwargs, num_heads, min_channels)
    includes = [include] if isinstance(include, str) else list(include) if include is not None else None
    excludes = [exclude] if isinstance(exclude, str) else list(exclude or ())
    stage_keys = None if stages is None else {_stage_key(s) for s in stages}
    before = walk(model, input_size, in_chans=in_chans) if input_size is not None else None
    params_before = _params(model)
    if not inplace:
        model = copy.deepcopy(model)
    converter = _Converter(  # the fields in order, each from the argument of its name
        includes, excludes, stage_keys, min_channels, num_heads, attn_kernel_size, conv_kernel_size, carry_attrs,
        acmix_kwargs, ConversionReport(params_before=params_before),
    )  # fmt: skip
    model, report = converter.run(model), converter.report
    report.params_after = _params(model)
    if input_size is not None and before is not None:
        _count_macs(report, before, walk(model, input_size, in_chans=in_chans))
    logger.info(
        "convert_model: %d convolutions replaced by ACmix, %d kept; params %d -> %d",
        len(report.replaced), len(report.skipped), report.params_before, report.params_after,
    )  # fmt: skip
    return model, report


def _check_options(acmix_kwargs: dict[str, Any], num_heads: int, min_channels: int) -> None:
    bad = sorted(_FORBIDDEN_KWARGS & set(acmix_kwargs))
    if bad:
        raise ValueError(f"convert_model sets {', '.join(bad)} from each convolution; remove it from the arguments")
    choose_heads(1, num_heads)  # validates num_heads
    if not isinstance(min_channels, int) or min_channels < 0:
        raise ValueError(f"min_channels must be a non-negative int, got {min_channels!r}")


@dataclass
class _Converter:
    """One :func:`convert_model` run: its filters and ACmix settings, the report it fills, and the replacements made
    so far (``done``: id of a replaced module -> its replacement, so that a module shared in the tree stays shared)."""

    includes: list[str] | None
    excludes: list[str]
    stage_keys: set[str] | None
    min_channels: int
    num_heads: int
    attn_kernel_size: int
    conv_kernel_size: int | None
    carry_attrs: Sequence[str]
    acmix_kwargs: dict[str, Any]
    report: ConversionReport
    done: dict[int, nn.Module] = field(default_factory=dict)

    def run(self, model: nn.Module) -> nn.Module:
        """``model`` with its convolutions replaced (a single convolution or block: its replacement)."""
        if isinstance(model, nn.Conv2d) or _is_conv_norm_act(model):
            return self.convert("", model) or model
        if not isinstance(model, (ACmix, ConvPathMixin)):
            self.visit(model, "")
        return model

    def filter_reason(self, name: str, conv: nn.Conv2d) -> str | None:
        """Why the name, stage and channel filters keep ``conv`` (None when they let it through)."""
        if self.includes is not None and not any(fnmatch.fnmatchcase(name, p) for p in self.includes):
            return "not matched by include"
        hit = next((p for p in self.excludes if fnmatch.fnmatchcase(name, p)), None)
        if hit is not None:
            return f"excluded by {hit!r}"
        if self.stage_keys is not None and (stage_of(name) or "outside the stages") not in self.stage_keys:
            return f"not in stages {sorted(self.stage_keys)}"
        if min(conv.in_channels, conv.out_channels) < self.min_channels:
            return f"fewer than min_channels={self.min_channels} channels"
        return None

    def build(self, conv: nn.Conv2d) -> ACmix:
        """The ACmix layer for ``conv``: its channels and stride, on its device and dtype, in its train/eval mode."""
        k = _square(conv.kernel_size)
        s = _square(conv.stride)
        assert k is not None and s is not None
        layer = ACmix(
            conv.in_channels,
            conv.out_channels,
            stride=s,
            num_heads=choose_heads(conv.out_channels, self.num_heads),
            attn_kernel_size=self.attn_kernel_size,
            conv_kernel_size=self.conv_kernel_size or k,
            **self.acmix_kwargs,
        )
        return layer.to(device=conv.weight.device, dtype=conv.weight.dtype).train(conv.training)

    def convert(self, name: str, module: nn.Module) -> nn.Module | None:
        """The replacement of ``module`` (a conv or a conv + norm + act block), or None to keep it."""
        block = _is_conv_norm_act(module)
        conv = module.conv if block else module
        assert isinstance(conv, nn.Conv2d)
        reason = _structural_reason(conv) or self.filter_reason(name, conv)
        if reason is not None:
            self.report.skipped.append(Skipped(name, reason))
            return None
        layer = self.build(conv)
        new: nn.Module = layer
        if block:
            bn = module.bn
            assert isinstance(bn, nn.modules.batchnorm._BatchNorm)
            bn.reset_running_stats()  # its input is now ACmix's output
            act = module.act
            assert isinstance(act, nn.Module)
            new = ACmixNormAct(layer, bn, act).train(module.training)
        _carry(module, new, self.carry_attrs)
        self.report.replaced.append(
            Replaced(
                name=name, kind="block" if block else "conv", stage=stage_of(name), in_channels=conv.in_channels,
                out_channels=conv.out_channels, kernel_size=int(conv.kernel_size[0]), stride=int(conv.stride[0]),
                num_heads=layer.num_heads, attn_kernel_size=layer.attn_kernel_size,
                conv_kernel_size=layer.conv_kernel_size, params_before=_params(conv), params_after=_params(layer),
                dropped_bias=conv.bias is not None and not block,
            )
        )  # fmt: skip
        return new

    def visit(self, parent: nn.Module, prefix: str) -> None:
        """Replace below ``parent``: every registered child, a module registered twice too (``named_children()``
        yields it once)."""
        for child_name, child in list(parent._modules.items()):
            name = f"{prefix}.{child_name}" if prefix else child_name
            if child is None:
                continue
            if id(child) in self.done:
                setattr(parent, child_name, self.done[id(child)])
            elif isinstance(child, (ACmix, ConvPathMixin)):
                continue
            elif isinstance(child, nn.Conv2d) or _is_conv_norm_act(child):
                new = self.convert(name, child)
                if new is not None:
                    self.done[id(child)] = new
                    setattr(parent, child_name, new)
            else:
                self.visit(child, name)


def _count_macs(report: ConversionReport, before: ModelCost, after: ModelCost) -> None:
    """Fill the report's multiply-adds from the :func:`walk` reports of the model before and after."""
    macs_before = {m.name: m.cost.macs for m in before.modules}
    macs_after = {m.name: m.cost.macs for m in after.modules}
    report.input_size = before.input_size
    report.macs_before, report.macs_after = before.macs, after.macs
    report.replaced = [
        _with_macs(r, macs_before.get(_conv_name(r)), macs_after.get(_conv_name(r))) for r in report.replaced
    ]


def _conv_name(r: Replaced) -> str:
    """The module name of the convolution (before) and of its ACmix layer (after)."""
    if r.kind != "block":
        return r.name
    return f"{r.name}.conv" if r.name else "conv"


def _with_macs(r: Replaced, before: int | None, after: int | None) -> Replaced:
    return Replaced(**{**asdict(r), "macs_before": before, "macs_after": after})
