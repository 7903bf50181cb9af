"""Analytic cost formulas, one place, per module type (paper Sec. 3.3, Table 1; docs/paper-numbers.md,
docs/official-code.md).

Every formula returns a :class:`Cost`: a list of :class:`CostItem` (component, Table 1 stage, parameters,
multiply-adds) for **one image**. Inputs may have C_in != C_out and a stride.

Convention (stated in every output, :data:`MAC_CONVENTION`): costs are **multiply-adds (MACs)**, what the paper
family calls "FLOPs" (the official README titles Fig. 4 "Multiply-Adds"; SAN's counter reports GMac; Swin's
``flops()`` counts MACs). 1 MAC = one multiply and one add; FLOPs ~ 2 x MACs. A k x k convolution costs
k^2 * C_in / groups * C_out * H_out * W_out; a Linear costs in * out per token. Bias adds, normalisation,
activations, softmax, pooling and residual adds are not counted (as in the paper's counters). The attention matmuls
are counted: k^2 * C MACs per query for the logits and the same again for the weighted sum of values.

Stages (paper Sec. 3.1-3.3): Stage I is the 1 x 1 projections (for a k x k convolution: its k^2 1 x 1
convolutions, Eq. 3-4); Stage II is everything after them (shift and sum; attention logits and aggregation; the
ACmix FC and shift/group conv). Items outside the analysed module types carry stage ``"-"``.

Table 1's Stage II of a k x k convolution (k^2 * C * H * W, summing the k^2 shifted maps) is already inside the
standard k^2 * C_in * C_out count (the "add" of each multiply-add); that item is marked ``in_total=False`` so model
totals do not count it twice, while the Stage I / Stage II split includes it exactly as Table 1 does.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "MAC_CONVENTION",
    "STAGE_I",
    "STAGE_II",
    "NO_STAGE",
    "Component",
    "Cost",
    "CostItem",
    "acmix_cost",
    "conv_cost",
    "conv_path_items",
    "linear_cost",
    "local_attention_cost",
    "mlp_cost",
    "out_size",
    "san_attention_cost",
    "spatial_reduction_attention_cost",
    "stage_ratio",
    "stage_ratio_table",
    "table1",
    "window_attention_cost",
]

MAC_CONVENTION = (
    "MACs = multiply-adds (1 MAC = 1 multiply + 1 add; FLOPs ~ 2 x MACs), per image; the paper's 'FLOPs' are MACs. "
    "Bias adds, norms, activations, softmax and pooling are not counted; attention logits and aggregation are."
)
"""The counting convention of every figure of :mod:`acmix.analysis`, as one sentence for reports."""

STAGE_I = "I"
STAGE_II = "II"
NO_STAGE = "-"

ProjAt = Literal["input", "output"]


class Component:
    """Component names used in every breakdown."""

    PROJECTION = "projection"  # Stage I 1x1 projections (q/k/v; the k^2 1x1 convs of a decomposed k x k conv)
    SHIFT_SUM = "shift_sum"  # Stage II of a k x k conv: sum of the k^2 shifted maps (Table 1; in_total=False)
    ATTN_LOGITS = "attn_logits"  # q . k over the window
    ATTN_AGGREGATION = "attn_aggregation"  # weighted sum of values over the window
    REL_POS = "rel_pos"  # relative position term (ACmix conv_p; Swin bias table)
    FC = "fc"  # ACmix conv path: light FC 3N -> k_c^2
    SHIFT_CONV = "shift_conv"  # ACmix conv path: shift as group conv (Fig. 3); the fused FC x group conv
    FUSED_WEIGHT = "fused_weight"  # composing the fused conv-path weight, once per forward
    MIX = "mix"  # alpha, beta
    OUT_PROJ = "out_proj"  # attention output projection (Swin, PVT)
    SPATIAL_REDUCTION = "spatial_reduction"  # PVT SRA: sr conv + norm
    MLP = "mlp"
    CONV = "conv"  # any other convolution (stem, 1x1 convs of a bottleneck, downsample, patch embedding)
    LINEAR = "linear"  # any other Linear (classifier, patch merging)
    NORM = "norm"
    OTHER = "other"  # parameters of anything else (position embeddings, cls token, ...)
    ELEMENTWISE = "elementwise"  # SAN-counter convention only: conv bias adds, BatchNorm, ReLU, pooling


@dataclass(frozen=True)
class CostItem:
    """One component of a module's cost, for one image.

    Attributes:
        component: a :class:`Component` name.
        stage: ``"I"``, ``"II"`` (Table 1 stages) or ``"-"``.
        params: trainable-or-not parameters (every element of every ``nn.Parameter`` the component owns).
        macs: multiply-adds.
        in_total: counted in model totals (False only for Table 1's conv shift-and-sum, see module docstring).
        counter_visible: ``torch.utils.flop_counter.FlopCounterMode`` sees these MACs (conv, matmul, SDPA);
            False for unfold-and-multiply attention and tensor shifts.
    """

    component: str
    stage: str
    params: int
    macs: int
    in_total: bool = True
    counter_visible: bool = True


@dataclass(frozen=True)
class Cost:
    """A breakdown of parameters and multiply-adds into :class:`CostItem` s."""

    items: tuple[CostItem, ...] = field(default_factory=tuple)

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.items + other.items)

    def __iter__(self) -> Iterator[CostItem]:
        return iter(self.items)

    @staticmethod
    def sum(costs: Iterable[Cost]) -> Cost:
        items: list[CostItem] = []
        for c in costs:
            items.extend(c.items)
        return Cost(tuple(items))

    @property
    def params(self) -> int:
        return sum(i.params for i in self.items)

    @property
    def macs(self) -> int:
        """Model-total multiply-adds (excludes ``in_total=False`` items)."""
        return sum(i.macs for i in self.items if i.in_total)

    @property
    def counter_visible_macs(self) -> int:
        """The part of :attr:`macs` that FlopCounterMode can see."""
        return sum(i.macs for i in self.items if i.in_total and i.counter_visible)

    def stage_params(self, stage: str) -> int:
        return sum(i.params for i in self.items if i.stage == stage)

    def stage_macs(self, stage: str) -> int:
        """Table 1 view: all items of ``stage``, including the conv shift-and-sum."""
        return sum(i.macs for i in self.items if i.stage == stage)

    def by_component(self) -> dict[str, dict[str, int]]:
        """``{component: {"params": p, "macs": m}}`` (``macs`` as in :attr:`macs`)."""
        out: dict[str, dict[str, int]] = {}
        for i in self.items:
            row = out.setdefault(i.component, {"params": 0, "macs": 0})
            row["params"] += i.params
            row["macs"] += i.macs if i.in_total else 0
        return out

    def with_macs_scaled(self, factor: float) -> Cost:
        """The same breakdown with every MAC count multiplied by ``factor`` (rounded)."""
        return Cost(tuple(_replace(i, macs=round(i.macs * factor)) for i in self.items))

    def to_dict(self) -> dict[str, Any]:
        return {
            "params": self.params,
            "macs": self.macs,
            "stage_I": {"params": self.stage_params(STAGE_I), "macs": self.stage_macs(STAGE_I)},
            "stage_II": {"params": self.stage_params(STAGE_II), "macs": self.stage_macs(STAGE_II)},
            "components": self.by_component(),
        }


def _replace(item: CostItem, **changes: Any) -> CostItem:
    fields = {k: getattr(item, k) for k in ("component", "stage", "params", "macs", "in_total", "counter_visible")}
    fields.update(changes)
    return CostItem(**fields)


def _item(component: str, stage: str, params: int = 0, macs: int = 0, **kw: Any) -> CostItem:
    return CostItem(component, stage, int(params), int(macs), **kw)


def _check_pos(**values: int) -> None:
    for name, v in values.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")


def out_size(n: int, kernel_size: int, stride: int = 1, padding: int | None = None, dilation: int = 1) -> int:
    """Output length of a convolution / window op (``padding=None``: ``dilation * (k - 1) // 2``, i.e. 'same')."""
    p = dilation * (kernel_size - 1) // 2 if padding is None else padding
    return (n + 2 * p - dilation * (kernel_size - 1) - 1) // stride + 1


# ---------------------------------------------------------------------------------------------------- primitives
def conv_cost(
    c_in: int,
    c_out: int,
    kernel_size: int | tuple[int, int],
    h: int,
    w: int,
    *,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] | None = None,
    groups: int = 1,
    bias: bool = False,
    decompose: bool = False,
    component: str = Component.CONV,
    out_hw: tuple[int, int] | None = None,
) -> Cost:
    """A (grouped) k x k convolution on an H x W map: k^2 * C_in / groups * C_out * H_out * W_out MACs.

    Args:
        c_in, c_out, kernel_size, stride, padding, groups, bias: as ``nn.Conv2d`` (``padding=None``: k // 2).
        h, w: input size.
        decompose: the Table 1 view (paper Sec. 3.1): Stage I = the k^2 1 x 1 convolutions (all the weights),
            Stage II = shifting and summing k^2 maps, k^2 * C_out * H_out * W_out (``in_total=False``: already
            inside the standard count). Without it the whole conv is one ``component`` item with stage ``"-"``.
        out_hw: the output size if known (e.g. measured by a hook); computed otherwise.
    """
    kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    _check_pos(c_in=c_in, c_out=c_out, kh=kh, kw=kw, h=h, w=w, sh=sh, sw=sw, groups=groups)
    if c_in % groups or c_out % groups:
        raise ValueError(f"c_in ({c_in}) and c_out ({c_out}) must be divisible by groups ({groups})")
    if out_hw is None:
        ph, pw = (
            (kh // 2, kw // 2) if padding is None else ((padding, padding) if isinstance(padding, int) else padding)
        )
        out_hw = (out_size(h, kh, sh, ph), out_size(w, kw, sw, pw))
    ho, wo = out_hw
    weights = kh * kw * (c_in // groups) * c_out
    params = weights + (c_out if bias else 0)
    macs = weights * ho * wo
    if not decompose:
        return Cost((_item(component, NO_STAGE, params, macs),))
    return Cost(
        (
            _item(Component.PROJECTION, STAGE_I, params, macs),
            _item(Component.SHIFT_SUM, STAGE_II, 0, kh * kw * c_out * ho * wo, in_total=False),
        )
    )


def linear_cost(
    in_features: int,
    out_features: int,
    tokens: int,
    *,
    bias: bool = True,
    component: str = Component.LINEAR,
    stage: str = NO_STAGE,
) -> Cost:
    """A Linear applied to ``tokens`` tokens: in * out * tokens MACs."""
    _check_pos(in_features=in_features, out_features=out_features)
    if tokens < 0:
        raise ValueError(f"tokens must be >= 0, got {tokens}")
    params = in_features * out_features + (out_features if bias else 0)
    return Cost((_item(component, stage, params, in_features * out_features * tokens),))


def mlp_cost(dim: int, hidden: int, tokens: int, *, dim_out: int | None = None, bias: bool = True) -> Cost:
    """Transformer MLP fc1 (dim -> hidden) + fc2 (hidden -> dim_out) on ``tokens`` tokens."""
    dim_out = dim if dim_out is None else dim_out
    return linear_cost(dim, hidden, tokens, bias=bias, component=Component.MLP) + linear_cost(
        hidden, dim_out, tokens, bias=bias, component=Component.MLP
    )


def _attention_items(c: int, queries: int, keys_per_query: int, *, visible: bool) -> tuple[CostItem, ...]:
    """Logits (q . k) and aggregation (sum_j a_ij v_j): ``keys_per_query * c`` MACs per query each."""
    m = c * queries * keys_per_query
    return (
        _item(Component.ATTN_LOGITS, STAGE_II, 0, m, counter_visible=visible),
        _item(Component.ATTN_AGGREGATION, STAGE_II, 0, m, counter_visible=visible),
    )


# ---------------------------------------------------------------------------------------------------- Table 1 modules
def local_attention_cost(
    c_in: int,
    c_out: int,
    h: int,
    w: int,
    *,
    kernel_size: int = 7,
    num_heads: int = 1,
    stride: int = 1,
    qkv_bias: bool = False,
    proj_at: ProjAt = "input",
) -> Cost:
    """Local (sliding-window) self-attention, window k x k, N heads (Table 1, self-attention row).

    Stage I: q, k, v 1 x 1 projections, 3 * C_in * C_out params and MACs per projected pixel.
    Stage II: 2 * k^2 * C_out per output pixel (k^2 logits over C_out / N channels for each of N heads, then the
    weighted sum of k^2 values). N does not change the count.

    Args:
        proj_at: where the projections are counted with a stride: ``"input"`` (H x W, what the official code
            does: it projects before striding) or ``"output"`` (H_out x W_out). docs/paper-numbers.md: the 83% of the
            paper matches ``"output"``.
    """
    _check_pos(c_in=c_in, c_out=c_out, h=h, w=w, kernel_size=kernel_size, num_heads=num_heads, stride=stride)
    if c_out % num_heads:
        raise ValueError(f"c_out ({c_out}) must be divisible by num_heads ({num_heads})")
    ho, wo = -(-h // stride), -(-w // stride)
    proj_pixels = _proj_pixels(h, w, ho, wo, proj_at)
    params = 3 * c_in * c_out + (3 * c_out if qkv_bias else 0)
    return Cost(
        (_item(Component.PROJECTION, STAGE_I, params, 3 * c_in * c_out * proj_pixels),)
        + _attention_items(c_out, ho * wo, kernel_size * kernel_size, visible=False)
    )


def _proj_pixels(h: int, w: int, ho: int, wo: int, proj_at: str) -> int:
    if proj_at == "input":
        return h * w
    if proj_at == "output":
        return ho * wo
    raise ValueError(f"proj_at must be 'input' or 'output', got {proj_at!r}")


def acmix_cost(
    c_in: int,
    c_out: int,
    h: int,
    w: int,
    *,
    stride: int = 1,
    num_heads: int = 4,
    attn_kernel_size: int = 7,
    conv_kernel_size: int = 3,
    qkv_bias: bool = True,
    fc_bias: bool = False,
    use_rel_pos: bool = True,
    shift_mode: str = "group",
    mix: str = "learned",
    conv_impl: str = "reference",
    proj_at: ProjAt = "input",
) -> Cost:
    """ACmix for conv hosts (ResNet / SAN position): ``acmix.ACmix`` and the official ResNet operator.

    Stage I: q/k/v projections 3 * C_in * C_out (+ 3 * C_out bias), at input resolution as built (``proj_at``).
    Stage II, attention path (docs/official-code.md, ResNet operator): 2 * k_att^2 * C_out per output pixel; the
    relative position term is a 1 x 1 conv 2 -> head_dim on the coordinate map (2 * head_dim MACs per input pixel,
    once per forward).
    Stage II, convolution path (reference order, Table 1): FC 3N -> k_c^2 shared over head_dim,
    3 * k_c^2 * C_out MACs per input pixel (3N * k_c^2 params); group conv C_out x k_c^2 x k_c x k_c with
    groups = head_dim, k_c^4 * C_out MACs per output pixel (Fig. 3 c-III; c-I / c-II share one head's kernels:
    head_dim * k_c^4 params; ``"fixed"`` has no parameters; ``"tensor"`` shifts cost k_c^2 * C_out adds).
    ``conv_impl="fused"`` counts what :func:`acmix.ops.conv_path` computes instead: one grouped conv
    3C -> C, 3N * k_c^2 * C_out MACs per output pixel, plus composing its weight once per forward.
    For N = 4, k_c = 3 both give 108 * C per pixel at stride 1.
    ``mix="attn"`` / ``"conv"`` count the MACs of one path only; the parameters of the unused path are still
    counted when they exist (as ``acmix.ACmix`` builds them).
    """
    _check_pos(c_in=c_in, c_out=c_out, h=h, w=w, stride=stride, num_heads=num_heads)
    _check_pos(attn_kernel_size=attn_kernel_size, conv_kernel_size=conv_kernel_size)
    if c_out % num_heads:
        raise ValueError(f"c_out ({c_out}) must be divisible by num_heads ({num_heads})")
    if mix not in ("learned", "fixed", "attn", "conv"):
        raise ValueError(f"mix must be learned, fixed, attn or conv, got {mix!r}")
    if conv_impl not in ("reference", "fused"):
        raise ValueError(f"conv_impl must be 'reference' or 'fused', got {conv_impl!r}")
    if shift_mode not in ("group", "learnable", "frozen", "fixed", "tensor"):
        raise ValueError(f"shift_mode must be group, learnable, frozen, fixed or tensor, got {shift_mode!r}")
    hd = c_out // num_heads
    k2 = conv_kernel_size * conv_kernel_size
    ho, wo = -(-h // stride), -(-w // stride)
    use_attn, use_conv = mix != "conv", mix != "attn"
    items: list[CostItem] = [
        _item(
            Component.PROJECTION,
            STAGE_I,
            3 * c_in * c_out + (3 * c_out if qkv_bias else 0),
            3 * c_in * c_out * _proj_pixels(h, w, ho, wo, proj_at),
        )
    ]
    # attention path
    if use_rel_pos:
        items.append(_item(Component.REL_POS, STAGE_II, 3 * hd, 2 * hd * h * w if use_attn else 0))
    if use_attn:
        items.extend(_attention_items(c_out, ho * wo, attn_kernel_size * attn_kernel_size, visible=False))
    # convolution path
    shift_params = {"group": c_out * k2 * k2, "learnable": hd * k2 * k2, "frozen": hd * k2 * k2}.get(shift_mode, 0)
    items.extend(
        conv_path_items(
            c_out, 3 * num_heads, hd, conv_kernel_size, h * w, ho * wo, fc_bias=fc_bias, conv_impl=conv_impl,
            shift_params=shift_params, tensor_shift=shift_mode == "tensor", used=use_conv,
        )
    )  # fmt: skip
    if mix == "learned":
        items.append(_item(Component.MIX, STAGE_II, 2, 0))
    return Cost(tuple(items))


def conv_path_items(
    c_out: int,
    num_maps: int,
    head_dim: int,
    kernel_size: int,
    pixels_in: int,
    pixels_out: int,
    *,
    fc_bias: bool = False,
    conv_impl: str = "reference",
    shift_params: int | None = None,
    tensor_shift: bool = False,
    used: bool = True,
) -> list[CostItem]:
    """The ACmix convolution path (Fig. 2 bottom, Fig. 3) over ``num_maps`` head maps of ``head_dim`` channels.

    Reference order: FC M -> k_c^2 shared over head_dim and pixels (k_c^2 * M * head_dim MACs per input pixel; for
    M = 3N, head_dim = C / N this is 3 k_c^2 C), then the group conv C_out x k_c^2 x k_c x k_c with groups =
    head_dim (k_c^4 * C_out per output pixel). Fused (:func:`acmix.ops.conv_path`): one grouped conv
    M * head_dim -> C_out, M * k_c^2 * C_out per output pixel, plus composing its weight once per forward
    (and, with an FC bias, its bias map: a depthwise k_c x k_c conv of ones). ``used=False``: parameters only.
    ``shift_params`` defaults to the c-III kernel C_out * k_c^4; ``tensor_shift`` is Fig. 3 (a): k_c^2 * C_out adds.
    """
    k2 = kernel_size * kernel_size
    fc_params = num_maps * k2 + (k2 if fc_bias else 0)
    shift_params = c_out * k2 * k2 if shift_params is None else shift_params
    u = 1 if used else 0
    if tensor_shift:
        return [
            _item(Component.FC, STAGE_II, fc_params, u * k2 * num_maps * head_dim * pixels_in),
            _item(Component.SHIFT_CONV, STAGE_II, 0, u * k2 * c_out * pixels_out, counter_visible=False),
        ]
    if conv_impl == "reference":
        return [
            _item(Component.FC, STAGE_II, fc_params, u * k2 * num_maps * head_dim * pixels_in),
            _item(Component.SHIFT_CONV, STAGE_II, shift_params, u * k2 * k2 * c_out * pixels_out),
        ]
    if conv_impl != "fused":
        raise ValueError(f"conv_impl must be 'reference' or 'fused', got {conv_impl!r}")
    items = [
        _item(Component.FC, STAGE_II, fc_params, 0),
        _item(Component.SHIFT_CONV, STAGE_II, shift_params, u * num_maps * k2 * c_out * pixels_out),
        _item(Component.FUSED_WEIGHT, STAGE_II, 0, u * c_out * k2 * k2 * num_maps),
    ]
    if fc_bias:
        items.append(_item(Component.FUSED_WEIGHT, STAGE_II, 0, u * (c_out * k2 * k2 + c_out * k2 * pixels_out)))
    return items


def window_attention_cost(
    dim: int,
    num_heads: int,
    window_size: int | tuple[int, int],
    h: int,
    w: int,
    *,
    head_dim: int | None = None,
    qkv_bias: bool = True,
    acmix: bool = False,
    conv_kernel_size: int = 3,
    fc_bias: bool = True,
    conv_impl: str = "reference",
    mix: str = "learned",
) -> Cost:
    """Swin (shifted-)window attention W-MSA on an H x W map (+ the ACmix conv path, docs/official-code.md).

    The map is padded to a multiple of the window M (as timm does); L = H_pad * W_pad tokens.
    Stage I: qkv Linear C -> 3 * N * head_dim on L tokens. Stage II: logits and aggregation M^2 * N * head_dim per
    token each; relative position bias table (2M - 1)^2 * N params. Output projection N * head_dim -> C
    (``out_proj``, stage "-": Table 1 has none). ACmix adds (on the unpadded map, as the official code): FC
    3N -> k_c^2 (+ bias) at 3 * k_c^2 * C MACs per pixel and the group conv C x k_c^2 x k_c x k_c at
    k_c^4 * C per pixel (Swin ``flops()`` additions 3 * dim * HW * 9 + 81 * dim * HW), alpha and beta;
    ``conv_impl`` and ``mix`` as :func:`acmix_cost` (``mix="conv"`` skips the windows and ``proj``).
    """
    mh, mw = (window_size, window_size) if isinstance(window_size, int) else window_size
    _check_pos(dim=dim, num_heads=num_heads, mh=mh, mw=mw, h=h, w=w)
    hd = dim // num_heads if head_dim is None else head_dim
    inner = num_heads * hd
    hp, wp = -(-h // mh) * mh, -(-w // mw) * mw
    tokens, m2 = hp * wp, mh * mw
    attn = not acmix or mix != "conv"
    items = [
        _item(
            Component.PROJECTION, STAGE_I, 3 * dim * inner + (3 * inner if qkv_bias else 0), 3 * dim * inner * tokens
        ),
        _item(Component.REL_POS, STAGE_II, (2 * mh - 1) * (2 * mw - 1) * num_heads, 0),
        _item(Component.OUT_PROJ, NO_STAGE, inner * dim + dim, inner * dim * tokens if attn else 0),
    ]
    if attn:
        items.extend(_attention_items(inner, tokens, m2, visible=True))
    if acmix:
        items.extend(_acmix_host_conv_path(dim, num_heads, h * w, conv_kernel_size, fc_bias, conv_impl, mix))
    return Cost(tuple(items))


def _acmix_host_conv_path(
    dim: int, num_heads: int, pixels: int, kc: int, fc_bias: bool, conv_impl: str, mix: str
) -> list[CostItem]:
    """The transformer-host conv path (Swin, PVT): 3N head maps of dim / N channels, stride 1, alpha / beta."""
    items = conv_path_items(
        dim, 3 * num_heads, dim // num_heads, kc, pixels, pixels, fc_bias=fc_bias, conv_impl=conv_impl,
        used=mix != "attn",
    )  # fmt: skip
    if mix == "learned":
        items.append(_item(Component.MIX, STAGE_II, 2, 0))
    return items


def spatial_reduction_attention_cost(
    dim: int,
    num_heads: int,
    h: int,
    w: int,
    *,
    sr_ratio: int = 1,
    qkv_bias: bool = True,
    extra_tokens: int = 0,
    acmix: bool = False,
    conv_kernel_size: int = 3,
    fc_bias: bool = True,
    conv_impl: str = "reference",
) -> Cost:
    """PVT spatial-reduction attention (SRA, docs/official-code.md) on H x W tokens (+ ``extra_tokens``: a cls token).

    q: Linear C -> C on all L = HW + extra tokens (Stage I). With sr_ratio R > 1, keys and values come from a
    R x R / R conv (C^2 R^2 params and MACs per reduced pixel: C^2 per input pixel) + LayerNorm
    (``spatial_reduction``), on L' = (H // R)(W // R) tokens; kv: Linear C -> 2C on L' tokens (Stage I).
    Logits and aggregation L' * C per query each (Stage II); output projection C -> C. ``acmix=True`` adds the
    Swin-style conv path on the H x W map (FC 3N -> k_c^2 and the C x k_c^2 x k_c x k_c group conv, docs/deviations.md),
    alpha and beta.
    """
    _check_pos(dim=dim, num_heads=num_heads, h=h, w=w, sr_ratio=sr_ratio)
    tokens = h * w + extra_tokens
    b = dim if qkv_bias else 0
    items = [_item(Component.PROJECTION, STAGE_I, dim * dim + b, dim * dim * tokens)]
    if sr_ratio > 1:
        reduced = (h // sr_ratio) * (w // sr_ratio)
        items.append(
            _item(
                Component.SPATIAL_REDUCTION,
                NO_STAGE,
                dim * dim * sr_ratio**2 + dim + 2 * dim,
                dim * dim * sr_ratio**2 * reduced,
            )
        )
    else:
        reduced = tokens
    items.append(_item(Component.PROJECTION, STAGE_I, 2 * dim * dim + 2 * b, 2 * dim * dim * reduced))
    items.extend(_attention_items(dim, tokens, reduced, visible=True))
    items.append(_item(Component.OUT_PROJ, NO_STAGE, dim * dim + dim, dim * dim * tokens))
    if acmix:
        items.extend(_acmix_host_conv_path(dim, num_heads, h * w, conv_kernel_size, fc_bias, conv_impl, "learned"))
    return Cost(tuple(items))


def san_attention_cost(
    dim: int,
    rel_dim: int,
    out_dim: int,
    h: int,
    w: int,
    *,
    share_planes: int = 8,
    kernel_size: int = 7,
    sa_type: str = "patchwise",
    acmix: bool = False,
    conv_kernel_size: int = 3,
    conv_impl: str = "reference",
    elementwise: bool = False,
) -> Cost:
    """SAN's self-attention module (docs/official-code.md) on an H x W map, stride 1 (+ this project's ACmix conv path).

    Stage I: q, k (rel_dim) and v (out_dim) 1 x 1 projections with bias. Stage II: the weight MLP ``conv_w``
    (BN-ReLU-1x1 (no bias)-BN-ReLU-1x1) on P pixels, P = HW for patchwise (input rel_dim (k^2 + 1), output
    k^2 out_dim / share_planes) and k^2 HW for pairwise (input rel_dim + 2, plus the 2 -> 2 ``conv_p`` on the
    coordinate map), counted as ``attn_logits``; the aggregation of v, k^2 * out_dim per pixel. ACmix adds the conv
    path over M = (2 rel_dim + out_dim) / head_dim head maps, head_dim = out_dim / share_planes (FC without bias,
    group conv out_dim x k_c^2 x k_c x k_c), and alpha, beta (acmix.layers.acmix_san). ``elementwise`` adds what
    SAN's own counter also counts inside the module: conv bias adds, BatchNorm (2 per element), ReLU.
    """
    _check_pos(dim=dim, rel_dim=rel_dim, out_dim=out_dim, h=h, w=w, share_planes=share_planes)
    if sa_type not in ("patchwise", "pairwise"):
        raise ValueError(f"sa_type must be 'patchwise' or 'pairwise', got {sa_type!r}")
    k2, hw, wc = kernel_size * kernel_size, h * w, out_dim // share_planes
    c_qkv = 2 * rel_dim + out_dim
    items = [_item(Component.PROJECTION, STAGE_I, dim * c_qkv + c_qkv, dim * c_qkv * hw)]
    if sa_type == "patchwise":
        w_in, w_mid, w_out, pix = rel_dim * (k2 + 1), wc, k2 * wc, hw
    else:
        w_in, w_mid, w_out, pix = rel_dim + 2, rel_dim, wc, k2 * hw
        items.append(_item(Component.REL_POS, STAGE_II, 6, 4 * hw))
    mlp_params = w_in * w_mid + w_mid * w_out + w_out + 2 * (w_in + w_mid)
    items.append(_item(Component.ATTN_LOGITS, STAGE_II, mlp_params, (w_in * w_mid + w_mid * w_out) * pix))
    items.append(_item(Component.ATTN_AGGREGATION, STAGE_II, 0, k2 * out_dim * hw, counter_visible=False))
    if acmix:
        items.extend(conv_path_items(out_dim, c_qkv // wc, wc, conv_kernel_size, hw, hw, conv_impl=conv_impl))
        items.append(_item(Component.MIX, STAGE_II, 2, 0))
    if elementwise:  # qkv bias; conv_w: BN + ReLU on w_in and w_mid channels, bias of its last conv
        ew = c_qkv * hw + (3 * w_in + 3 * w_mid + w_out) * pix + (2 * hw if sa_type == "pairwise" else 0)
        items.append(_item(Component.ELEMENTWISE, NO_STAGE, 0, ew, counter_visible=False))
    return Cost(tuple(items))


# ---------------------------------------------------------------------------------------------------- Table 1
#: symbolic Table 1 (C_in = C_out = C, H x W, conv kernel k, attention window k_att, N heads), docs/paper-numbers.md
TABLE1_FORMULAS: tuple[dict[str, str], ...] = (
    {
        "module": "convolution k x k",
        "stage_I_params": "k^2 C^2",
        "stage_I_macs": "k^2 C^2 HW",
        "stage_II_params": "0",
        "stage_II_macs": "k^2 C HW",
    },
    {
        "module": "self-attention (window k_att, N heads)",
        "stage_I_params": "3 C^2",
        "stage_I_macs": "3 C^2 HW",
        "stage_II_params": "0",
        "stage_II_macs": "2 k_att^2 C HW",
    },
    {
        "module": "ACmix (k_conv x k_conv conv path)",
        "stage_I_params": "3 C^2",
        "stage_I_macs": "3 C^2 HW",
        "stage_II_params": "3N k_conv^2 + k_conv^4 C",
        "stage_II_macs": "(2 k_att^2 + 3 k_conv^2 + k_conv^4) C HW",
    },
)


def table1(
    c: int = 64, h: int = 56, w: int = 56, *, k: int = 3, k_att: int = 7, num_heads: int = 4
) -> list[dict[str, Any]]:
    """Table 1 rows: the symbolic formulas and their values at (C, H, W, k, k_att, N).

    The ACmix row counts the paper's operator (no biases, no position term, learned alpha / beta excluded) so it
    is the formula evaluated, not a model layer; :func:`acmix_cost` gives the layer as built.
    """
    conv = conv_cost(c, c, k, h, w, decompose=True)
    sa = local_attention_cost(c, c, h, w, kernel_size=k_att, num_heads=num_heads)
    ac = acmix_cost(
        c, c, h, w, num_heads=num_heads, attn_kernel_size=k_att, conv_kernel_size=k, qkv_bias=False,
        use_rel_pos=False, mix="fixed", conv_impl="reference",
    )  # fmt: skip
    rows = []
    for formulas, cost in zip(TABLE1_FORMULAS, (conv, sa, ac)):
        s1, s2 = cost.stage_macs(STAGE_I), cost.stage_macs(STAGE_II)
        rows.append(
            {
                **formulas,
                "at": {"C": c, "H": h, "W": w, "k": k, "k_att": k_att, "N": num_heads},
                "values": {
                    "stage_I_params": cost.stage_params(STAGE_I),
                    "stage_I_macs": s1,
                    "stage_II_params": cost.stage_params(STAGE_II),
                    "stage_II_macs": s2,
                    "stage_I_share": s1 / (s1 + s2),
                },
            }
        )
    return rows


def stage_ratio(c: int, k_att: int = 7) -> float:
    """Self-attention Stage I / Stage II MACs: 3 C^2 HW / (2 k_att^2 C HW) = 3C / (2 k_att^2) (Table 1)."""
    sa = local_attention_cost(c, c, 1, 1, kernel_size=k_att)
    return sa.stage_macs(STAGE_I) / sa.stage_macs(STAGE_II)


def stage_ratio_table(channels: Iterable[int] = (64, 128, 256, 512), k_att: int = 7) -> list[dict[str, Any]]:
    """Self-attention Stage I / Stage II for each C (docs/paper-numbers.md: 1.96, 3.92, 7.84, 15.67 at k_att 7)."""
    return [{"C": c, "k_att": k_att, "ratio": stage_ratio(c, k_att), "formula": f"3C/(2*{k_att}^2)"} for c in channels]
