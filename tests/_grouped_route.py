"""The ACmix forward through the copy-free grouped route (acmix.ops.conv_path helpers), shared by two tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from acmix.layers import ACmix
from acmix.ops import local_attention
from acmix.ops.conv_path import compose_weight, conv_path_grouped, grouped_qkv_order, split_grouped_qkv


def grouped_layer_forward(layer: ACmix, x: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """ACmix forward through the grouped route (what the layer can call): one permuted projection, no copies."""
    n, d = layer.num_heads, layer.head_dim
    perm = grouped_qkv_order(n, d, x.device)
    bias = None if layer.qkv.bias is None else layer.qkv.bias[perm]
    xg = F.conv2d(x, layer.qkv.weight[perm], bias)  # (B, 3C, H, W), channel d * 3N + t * N + j
    q, k, v = split_grouped_qkv(xg, n)  # (B, N, D, H, W) views
    h, w = x.shape[-2:]
    att = local_attention(
        q, k, v, layer.attn_kernel_size, layer.stride, layer.rel_pos(h, w, x), backend=backend
    )  # (B, N, D, Ho, Wo)
    gw = layer.group_weight()
    fc_w = layer.fc.weight.reshape(layer.fc.weight.shape[0], -1)
    conv = conv_path_grouped(xg, compose_weight(fc_w, gw), n, layer.fc.bias, gw, layer.stride)
    att = att.reshape(conv.shape)
    return layer.alpha * att + layer.beta * conv
