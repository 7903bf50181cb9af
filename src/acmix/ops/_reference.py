"""Readable pure-PyTorch references: the specification every faster path is tested against.

Written for a reader, not for speed: the local attention materialises the k x k unfolded keys and values exactly like
the official operator (``ResNet/test_bottleneck.py`` of LeapLabTHU/ACmix), so it costs ~k^2 times the feature map
in memory. Equation numbers refer to Pan et al., "On the Integration of Self-Attention and Convolution", CVPR 2022.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._indexing import reflect_pad2d
from ._window import Window, attention_backend


def _unfold_windows(x: torch.Tensor, kernel_size: int, stride: int) -> torch.Tensor:
    """(B, N, D, H, W) -> (B, N, D, k*k, Ho, Wo): every reflection-padded k x k window, row-major in the window."""
    b, n, d, h, w = x.shape
    # ceil(H / stride) as (H + s - 1) // s: the TorchScript ONNX exporter divides negative ints by truncation
    ho, wo = (h + stride - 1) // stride, (w + stride - 1) // stride
    xp = reflect_pad2d(x.reshape(b * n, d, h, w), kernel_size // 2)  # (B*N, D, H+2p, W+2p)
    cols = F.unfold(xp, kernel_size, stride=stride)  # (B*N, D*k*k, Ho*Wo)
    return cols.reshape(b, n, d, kernel_size * kernel_size, ho, wo)


@attention_backend
def local_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: Window) -> torch.Tensor:
    """Sliding-window multi-head attention of the ACmix attention path (paper Sec. 3.2, Eq. (5)-(6)).

    Called as every implementation is (:mod:`acmix.ops._window`):
    ``local_attention_reference(q, k, v, kernel_size, stride=1, rel_pos=None, scale=None)``. For the query at output
    position i (input position i * stride) and key position j in its k x k window N_k(i) (reflection border):

        logit(i, j) = scale * q_i . (k_j + p_i - p_j)        # official relative position term, p = rel_pos
        A(i, j)     = softmax_j over N_k(i) of logit(i, j)     # Eq. (5)
        out_i       = sum_j A(i, j) v_j                        # Eq. (6)

    Shape:
        q, k, v: (B, heads, head_dim, H, W); rel_pos: broadcastable to (B, heads, head_dim, H, W) or None;
        returns (B, heads, head_dim, ceil(H / stride), ceil(W / stride)).
    """
    kernel_size, stride, rel_pos, scale = w
    q_s = q[..., ::stride, ::stride] * scale  # (B, N, D, Ho, Wo)
    k_win = _unfold_windows(k, kernel_size, stride)  # (B, N, D, k2, Ho, Wo)
    v_win = _unfold_windows(v, kernel_size, stride)  # (B, N, D, k2, Ho, Wo)
    if rel_pos is not None:
        p = (rel_pos[None, None] if rel_pos.dim() == 3 else rel_pos).expand(q.shape)  # (B, N, D, H, W)
        p_q = p[..., ::stride, ::stride].unsqueeze(3)  # (B, N, D, 1, Ho, Wo)
        p_win = _unfold_windows(p.contiguous(), kernel_size, stride)  # (B, N, D, k2, Ho, Wo)
        k_win = k_win + p_q - p_win
    logits = (q_s.unsqueeze(3) * k_win).sum(2)  # (B, N, k2, Ho, Wo)
    attn = logits.softmax(dim=2)  # Eq. (5)
    return (attn.unsqueeze(2) * v_win).sum(3)  # Eq. (6): (B, N, D, Ho, Wo)


def shift_kernels(
    kernel_size: int, dtype: torch.dtype | None = None, device: torch.device | None = None
) -> torch.Tensor:
    """One-hot shift kernels (k*k, k, k): kernel i has a 1 at (i // k, i % k), i.e. it shifts by that offset.

    Convolving map i with kernel i and summing over i is exactly the decomposed k x k convolution, Eq. (3)-(4).
    """
    eye = torch.eye(kernel_size * kernel_size, dtype=dtype, device=device)
    return eye.reshape(kernel_size * kernel_size, kernel_size, kernel_size)


def conv_path_features(
    maps: torch.Tensor, head_dim: int, fc_weight: torch.Tensor, fc_bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Stage II conv path, the light FC (Fig. 2): M head maps -> k_c^2 maps, shared over head_dim and pixels.

    Shape:
        maps (B, M * head_dim, H, W), channel m * head_dim + d (for ACmix ``cat([q, k, v], 1)`` with head-major
        q, k, v, so m = t * N + j); fc_weight (k_c^2, M[, 1, 1]); returns (B, head_dim * k_c^2, H, W) with channel
        d * k_c^2 + i (the official ordering).
    """
    b, c, h, w = maps.shape
    m = c // head_dim
    fc = fc_weight.reshape(fc_weight.shape[0], -1).to(maps.dtype)  # (k2, M)
    f = torch.einsum("im,bmdx->bidx", fc, maps.reshape(b, m, head_dim, h * w))  # (B, k2, D, HW)
    if fc_bias is not None:
        f = f + fc_bias.to(maps.dtype).reshape(1, -1, 1, 1)
    return f.permute(0, 2, 1, 3).reshape(b, -1, h, w)  # (B, D * k2, H, W)


def conv_path_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    num_heads: int,
    fc_weight: torch.Tensor,
    fc_bias: torch.Tensor | None,
    group_weight: torch.Tensor,
    stride: int = 1,
) -> torch.Tensor:
    """Stage II conv path: FC, then shift-and-sum as a group convolution (Fig. 3 (b)-(c), Eq. (3)-(4)).

    ``group_weight`` (C, k_c^2, k_c, k_c) is the Fig. 3 c-III kernel (groups = head_dim, N outputs per group, output
    channel d * N + j); the c-I / c-II / b variants pass their (head_dim, ...) kernel repeated N times per group.
    Zero padding k_c // 2, stride ``stride``.

    Shape: q, k, v: (B, C, H, W) -> (B, C, ceil(H / stride), ceil(W / stride)).
    """
    hd = q.shape[1] // num_heads
    f = conv_path_features(torch.cat([q, k, v], 1), hd, fc_weight, fc_bias)  # (B, D*k2, H, W)
    kc = group_weight.shape[-1]
    return F.conv2d(f, group_weight.to(f.dtype), None, stride=stride, padding=kc // 2, groups=hd)


def shift_sum_reference(f: torch.Tensor, kernel_size: int, copies: int, stride: int = 1) -> torch.Tensor:
    """Fig. 3 (a): literal tensor shifts. f (B, D*k2, H, W) -> (B, D*copies, Ho, Wo), each sum copied ``copies`` times
    (the N heads of a group in ACmix).

    Map i of group d is shifted so that output (y, x) reads input (y + dy_i, x + dx_i), dy_i = i // k - k // 2,
    dx_i = i % k - k // 2, with zeros outside the map; the k2 shifted maps are summed (Eq. (4)).
    """
    b, _, h, w = f.shape
    k2 = kernel_size * kernel_size
    pad = kernel_size // 2
    f = f.reshape(b, -1, k2, h, w)  # (B, D, k2, H, W)
    fp = F.pad(f, (pad, pad, pad, pad))  # zero border
    out = torch.zeros_like(f[:, :, 0])
    for i in range(k2):
        dy, dx = i // kernel_size, i % kernel_size
        out = out + fp[:, :, i, dy : dy + h, dx : dx + w]
    out = out[..., ::stride, ::stride]  # (B, D, Ho, Wo)
    return out.repeat_interleave(copies, dim=1)  # (B, D*copies, Ho, Wo): channel d * copies + j
