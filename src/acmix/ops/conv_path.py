"""The convolution path of ACmix (Stage II, Fig. 2 bottom): a light FC over the head maps, then shift-and-sum as a
group convolution (Fig. 3 (c-III)).

Every host layer gives this path a stack of M *head maps* of one width (``head_dim`` channels each): the 3N
q/k/v heads of the ResNet and Swin operators, SAN's unequal-width projections cut into maps of its weight-sharing
width, PVT's full-resolution q with its upsampled k and v (:func:`cell_upsample`). Two implementations give the same
numbers (docs/deviations.md, "Convolution path"):

* ``"reference"``: the official order of operations: FC (M -> k_c^2 maps, shared over channels and pixels), a
  permutation to channel ``d * k_c^2 + i``, then the group convolution (groups = head_dim);
* ``"fused"``: the FC and the group convolution are both linear, so they compose into one k_c x k_c grouped
  convolution from the M head maps to the outputs, weight ``W[o, m] = sum_i group_weight[o, i] * fc[i, m]``
  (rebuilt at every call, so training stays exact). The FC bias, when there is one, enters as a map that is exact at
  the zero-padded border.

``"auto"`` (the default) picks by multiply-adds per output pixel: fused costs ``C_out M k_c^2``, reference
``k_c^2 M head_dim + C_out k_c^4``, and fused runs while it costs at most :data:`FUSED_MAC_RATIO` times the
reference, because one grouped convolution beats the FC + permute + group convolution sequence by more than the
extra arithmetic: on the 2-core CPU (fp32, batch 8, forward + backward) fused took 0.52x the reference's time at a
MAC ratio of 1.14 (SAN stage 1), 0.54x at 1.5 (Swin-T stage 2, N = 6), 1.02x at 3 (N = 12) and 2.0x at 6 (N = 24).
For ACmix with N heads (27 N C against 108 C MACs) that is fused up to N = 8 (docs/deviations.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..types import CONV_IMPLS
from . import _checks
from ._reference import conv_path_features
from .context import current_backend

__all__ = [
    "cell_upsample",
    "compose_weight",
    "conv_path",
    "conv_path_maps",
    "conv_path_maps_impl",
    "group_order",
    "resolve_conv_impl",
]


#: fused runs while its multiply-adds are at most this multiple of the FC + group conv's (measured, module docstring)
FUSED_MAC_RATIO = 2.0


def resolve_conv_impl(impl: str | None, num_maps: int, head_dim: int, dim_out: int, kernel_size: int) -> str:
    """``"fused"`` or ``"reference"``: the argument, else :func:`acmix.ops.use_backend` (``conv=``), else automatic."""
    if impl is None or impl == "auto":
        impl = current_backend("conv") or "auto"
    if impl not in CONV_IMPLS:
        raise ValueError(f"unknown conv path impl {impl!r}; valid: {', '.join(CONV_IMPLS)}")
    if impl != "auto":
        return impl
    k2 = kernel_size * kernel_size
    fused, reference = dim_out * num_maps * k2, k2 * num_maps * head_dim + dim_out * k2 * k2
    return "fused" if fused <= FUSED_MAC_RATIO * reference else "reference"


def group_order(num_maps: int, head_dim: int, device: torch.device | None = None) -> torch.Tensor:
    """Channel permutation (M * head_dim,) from the head-map order ``m * head_dim + d`` to the group order
    ``d * M + m``: ``maps[:, group_order(M, D)]`` is ``maps`` in group order. Permuting the rows of a projection's
    weight by it makes the projection emit the group order directly.
    """
    return torch.arange(num_maps * head_dim, device=device).reshape(num_maps, head_dim).t().reshape(-1)


def compose_weight(fc_weight: torch.Tensor, group_weight: torch.Tensor) -> torch.Tensor:
    """Compose the FC (k2, M) and the group conv (C_out, k2, k, k) into one grouped-conv weight (C_out, M, k, k).

    ``W[o, m] = sum_i group_weight[o, i] * fc[i, m]``.
    """
    fc = fc_weight.reshape(fc_weight.shape[0], -1)  # (k2, M)
    return torch.einsum("oixy,im->omxy", group_weight, fc.to(group_weight.dtype))


def _bias_map(
    group_weight: torch.Tensor, fc_bias: torch.Tensor, h: int, w: int, stride: int, like: torch.Tensor
) -> torch.Tensor:
    """The FC bias after the zero-padded group conv: (1, C_out, Ho, Wo), exact at the border."""
    kc, c_out = group_weight.shape[-1], group_weight.shape[0]
    wb = torch.einsum("oixy,i->oxy", group_weight.to(like.dtype), fc_bias.to(like.dtype)).unsqueeze(1)  # (C, 1, k, k)
    ones = torch.ones(1, 1, h, w, dtype=like.dtype, device=like.device).expand(1, c_out, h, w)
    return F.conv2d(ones, wb, None, stride=stride, padding=kc // 2, groups=c_out)


def _check_maps(
    maps: torch.Tensor,
    head_dim: int,
    fc_weight: torch.Tensor,
    group_weight: torch.Tensor,
    stride: int,
    order: str = "maps",
) -> None:
    if order not in ("maps", "groups"):
        raise ValueError(f"order must be 'maps' or 'groups', got {order!r}")
    if not isinstance(maps, torch.Tensor) or maps.dim() != 4:
        got = tuple(maps.shape) if isinstance(maps, torch.Tensor) else type(maps).__name__
        raise ValueError(f"maps must be a 4-D tensor (B, M * head_dim, H, W), got {got}")
    _checks.check_float("maps", maps)
    _checks.check_stride(stride)
    c = maps.shape[1]
    if head_dim < 1 or c % head_dim:
        raise ValueError(f"maps channels ({c}) must be divisible by head_dim ({head_dim})")
    m, kc = c // head_dim, group_weight.shape[-1]
    if group_weight.dim() != 4 or group_weight.shape[1:] != (kc * kc, kc, kc) or group_weight.shape[0] % head_dim:
        raise ValueError(
            f"group_weight must be (C_out, k^2, k, k) with C_out divisible by head_dim {head_dim}, "
            f"got {tuple(group_weight.shape)}"
        )
    if fc_weight.reshape(fc_weight.shape[0], -1).shape != (kc * kc, m):
        raise ValueError(f"fc_weight must be (k^2, M) = ({kc * kc}, {m}), got {tuple(fc_weight.shape)}")


def conv_path_maps(
    maps: torch.Tensor,
    head_dim: int,
    fc_weight: torch.Tensor,
    group_weight: torch.Tensor,
    fc_bias: torch.Tensor | None = None,
    stride: int = 1,
    impl: str | None = None,
    order: str = "maps",
) -> torch.Tensor:
    """ACmix convolution path over M stacked head maps of width ``head_dim`` (Fig. 2 bottom, Fig. 3 c-III).

    Args:
        maps: the Stage I features as head maps, channel ``m * head_dim + d`` (for ACmix: ``cat([q, k, v], 1)``
            with head-major q, k, v, so ``m = t * N + j``); with ``order="groups"`` channel ``d * M + m`` instead,
            the order the fused grouped convolution consumes (a host whose projection emits that order, see
            :func:`group_order`, saves the fused path its channel permutation copy).
        head_dim: channels per head map; the group convolution has ``head_dim`` groups.
        fc_weight: (k_c^2, M) or (k_c^2, M, 1, 1): the light FC, shared over head_dim and pixels.
        group_weight: (C_out, k_c^2, k_c, k_c): output channel ``d * (C_out / head_dim) + j``.
        fc_bias: optional (k_c^2,) FC bias (the Swin code has one, the ResNet code does not).
        stride: stride of the group convolution (zero padding k_c // 2).
        impl: ``"fused"``, ``"reference"`` or ``"auto"``/``None`` (see the module docstring and
            :func:`acmix.ops.use_backend`); resolved per call inside the custom op
            ``torch.ops.acmix.conv_path_maps`` (:mod:`acmix.ops._library`).
        order: ``"maps"`` (channel m * head_dim + d) or ``"groups"`` (channel d * M + m).

    Shape:
        maps (B, M * head_dim, H, W) -> (B, C_out, ceil(H / stride), ceil(W / stride)); any memory format.
    """
    if not torch.jit.is_scripting():
        if not _checks.is_symbolic(maps):
            _check_maps(maps, head_dim, fc_weight, group_weight, stride, order)
        if torch.jit.is_tracing():  # TorchScript trace / ONNX export(dynamo=False): record standard operators
            return conv_path_maps_impl(maps, head_dim, fc_weight, group_weight, fc_bias, stride, impl, order)
    return torch.ops.acmix.conv_path_maps(maps, head_dim, fc_weight, group_weight, fc_bias, stride, impl, order)


def conv_path_maps_impl(
    maps: torch.Tensor,
    head_dim: int,
    fc_weight: torch.Tensor,
    group_weight: torch.Tensor,
    fc_bias: torch.Tensor | None,
    stride: int,
    impl: str | None,
    order: str,
) -> torch.Tensor:
    """:func:`conv_path_maps` without the argument checks: the kernel of ``torch.ops.acmix.conv_path_maps``."""
    b, c, h, w = maps.shape
    m, kc, c_out = c // head_dim, group_weight.shape[-1], group_weight.shape[0]
    impl = resolve_conv_impl(impl, m, head_dim, c_out, kc)
    gw = group_weight.to(maps.dtype)
    if impl == "reference":
        if order == "groups":
            maps = maps.reshape(b, head_dim, m, h, w).transpose(1, 2).reshape(b, c, h, w)  # channel m * D + d
        f = conv_path_features(maps, head_dim, fc_weight, fc_bias)  # (B, D * k2, H, W)
        return F.conv2d(f, gw, None, stride=stride, padding=kc // 2, groups=head_dim)
    # the grouped convolution runs channels_last (NHWC): oneDNN's grouped kernels are several times faster there
    # (B = 8, 3C = 192 -> C = 64, 56 x 56, 16 groups, forward + backward, 1 thread: NCHW 420 ms, NCHW input
    # converted inside the conv 242 ms, NHWC input 160 ms); an NCHW input is converted by the convolution itself
    weight = compose_weight(fc_weight, gw).contiguous(memory_format=torch.channels_last)  # (C_out, M, kc, kc)
    x = maps
    if order == "maps":
        # one copy straight into channels_last (B, H, W, D, M), from either memory format of ``maps``
        x = maps.reshape(b, m, head_dim, h, w).permute(0, 3, 4, 2, 1).reshape(b, h, w, c)
        x = x.permute(0, 3, 1, 2)  # (B, D * M, H, W) channels_last, channel d * M + m
    out = F.conv2d(x, weight, None, stride=stride, padding=kc // 2, groups=head_dim)
    if fc_bias is not None:
        out = out + _bias_map(gw, fc_bias, h, w, stride, out)
    return out


def conv_path(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    num_heads: int,
    fc_weight: torch.Tensor,
    group_weight: torch.Tensor,
    fc_bias: torch.Tensor | None = None,
    stride: int = 1,
    impl: str | None = None,
) -> torch.Tensor:
    """ACmix Stage II convolution path on separate q, k, v (:func:`conv_path_maps` on ``cat([q, k, v])``).

    Args:
        q, k, v: the Stage I projections, channels head-major (c = head * head_dim + d).
        num_heads: N; head_dim = C / N.
        fc_weight: (k_c^2, 3N) or (k_c^2, 3N, 1, 1).
        group_weight: (C, k_c^2, k_c, k_c): groups = head_dim, output channel d * N + j.
        fc_bias, stride, impl: as :func:`conv_path_maps`.

    Shape:
        q, k, v: (B, C, H, W) -> (B, C, ceil(H / stride), ceil(W / stride)).
    """
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        got = tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__
        raise ValueError(f"q must be a 4-D tensor (B, C, H, W), got {got}")
    _checks.check_float("q", q)
    _checks.check_same("k", k, q)
    _checks.check_same("v", v, q)
    c = q.shape[1]
    if num_heads < 1 or c % num_heads:
        raise ValueError(f"channels ({c}) must be divisible by num_heads ({num_heads})")
    if group_weight.dim() != 4 or group_weight.shape[0] != c:
        kc = group_weight.shape[-1]
        raise ValueError(
            f"group_weight must be (C, k^2, k, k) = ({c}, {kc * kc}, {kc}, {kc}), got {tuple(group_weight.shape)}"
        )
    return conv_path_maps(torch.cat([q, k, v], 1), c // num_heads, fc_weight, group_weight, fc_bias, stride, impl)


def cell_upsample(x: torch.Tensor, size: tuple[int, int], ratio: int) -> torch.Tensor:
    """Give every full-resolution pixel the value of the ``ratio x ratio`` cell it fell into in a reduction.

    PVT's spatial reduction is a conv with kernel = stride = ratio, so reduced position (i, j) summarises the cell
    ``[i r, (i + 1) r) x [j r, (j + 1) r)``; rows and columns left over by the floor division take the last cell.

    Shape:
        x: (B, C, H // ratio, W // ratio) -> (B, C, H, W) with (H, W) = ``size``.
    """
    h, w = size
    idx_h = (torch.arange(h, device=x.device) // ratio).clamp_(max=x.shape[-2] - 1)
    idx_w = (torch.arange(w, device=x.device) // ratio).clamp_(max=x.shape[-1] - 1)
    return x.index_select(-2, idx_h).index_select(-1, idx_w)
