"""Test-only restatements of the official SAN (hszhao/SAN ``model/san.py``) and PVT v1 (whai362/PVT
``classification/pvt.py``) classifiers, written from docs/official-code.md (SAN, PVT) and a reading of that code.

They keep the official module names (so their ``state_dict()`` has the released checkpoints' keys) and the official
arithmetic, limits included: SAN's ``ReflectionPad2d`` needs maps larger than the padding, and PVT's position
embedding is resized only when a stage's token count differs from stage 1's (``_get_pos_embed``). SAN's CUDA
aggregation is restated from the kernel's semantics (docs/official-code.md, SAN): reflection padding, channel c uses
weight channel c mod Wc.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------------- SAN


def _aggregate(x: torch.Tensor, w: torch.Tensor, k: int) -> torch.Tensor:
    """x (n, c, H, W), w (n, Wc, k*k, H*W) -> (n, c, H, W): sum_t w[c mod Wc, t] * reflect-padded window tap t."""
    n, c, h, wd = x.shape
    cols = F.unfold(nn.ReflectionPad2d(k // 2)(x), k).view(n, c, k * k, h * wd)
    return (cols * w.repeat(1, c // w.shape[1], 1, 1)).sum(2).view(n, c, h, wd)


def _coords(h: int, w: int) -> torch.Tensor:
    loc_w = torch.linspace(-1.0, 1.0, w).unsqueeze(0).repeat(h, 1)
    loc_h = torch.linspace(-1.0, 1.0, h).unsqueeze(1).repeat(1, w)
    return torch.cat([loc_w.unsqueeze(0), loc_h.unsqueeze(0)], 0).unsqueeze(0)


class OfficialSAM(nn.Module):
    def __init__(self, sa_type: int, in_planes: int, rel: int, out: int, share: int, k: int) -> None:
        super().__init__()
        self.sa_type, self.k = sa_type, k
        self.conv1 = nn.Conv2d(in_planes, rel, 1)
        self.conv2 = nn.Conv2d(in_planes, rel, 1)
        self.conv3 = nn.Conv2d(in_planes, out, 1)
        if sa_type == 0:
            self.conv_w = nn.Sequential(
                nn.BatchNorm2d(rel + 2),
                nn.ReLU(inplace=True),
                nn.Conv2d(rel + 2, rel, 1, bias=False),
                nn.BatchNorm2d(rel),
                nn.ReLU(inplace=True),
                nn.Conv2d(rel, out // share, 1),
            )
            self.conv_p = nn.Conv2d(2, 2, 1)
        else:
            self.conv_w = nn.Sequential(
                nn.BatchNorm2d(rel * (k * k + 1)),
                nn.ReLU(inplace=True),
                nn.Conv2d(rel * (k * k + 1), out // share, 1, bias=False),
                nn.BatchNorm2d(out // share),
                nn.ReLU(inplace=True),
                nn.Conv2d(out // share, k * k * out // share, 1),
            )

    def _pairs(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Subtraction2 (pad_mode 1): a_center - b_neighbour, (n, c, k*k, H*W)."""
        n, c, h, w = a.shape
        nb = F.unfold(nn.ReflectionPad2d(self.k // 2)(b), self.k).view(n, c, self.k * self.k, h * w)
        return a.view(n, c, 1, h * w) - nb

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2, x3 = self.conv1(x), self.conv2(x), self.conv3(x)
        n, _, h, w = x.shape
        if self.sa_type == 0:
            p = self.conv_p(_coords(h, w).to(x))
            w_in = torch.cat([self._pairs(x1, x2), self._pairs(p, p).repeat(n, 1, 1, 1)], 1)
            wt = self.conv_w(w_in).softmax(dim=-2)
        else:
            q = x1.view(n, -1, 1, h * w)
            kk = F.unfold(nn.ReflectionPad2d(self.k // 2)(x2), self.k).view(n, -1, 1, h * w)
            wt = self.conv_w(torch.cat([q, kk], 1)).view(n, -1, self.k * self.k, h * w)
        return _aggregate(x3, wt, self.k)


class OfficialSanBottleneck(nn.Module):
    def __init__(self, sa_type: int, planes: int, k: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(planes)
        self.sam = OfficialSAM(sa_type, planes, planes // 16, planes // 4, 8, k)
        self.bn2 = nn.BatchNorm2d(planes // 4)
        self.conv = nn.Conv2d(planes // 4, planes, 1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(x))
        out = self.relu(self.bn2(self.sam(out)))
        return self.conv(out) + x


class OfficialSAN(nn.Module):
    """``san(sa_type, layers, kernels, num_classes)`` of hszhao/SAN; sa_type 1 = patchwise, 0 = pairwise."""

    def __init__(self, sa_type: int, layers: tuple[int, ...], kernels: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        c = 64
        self.conv_in, self.bn_in = nn.Conv2d(3, c, 1, bias=False), nn.BatchNorm2d(c)
        self.conv0, self.bn0 = nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)
        self.layer0 = nn.Sequential(*[OfficialSanBottleneck(sa_type, c, kernels[0]) for _ in range(layers[0])])
        for i in range(1, 5):
            prev, c = c, c * (4 if i == 1 else 2)
            setattr(self, f"conv{i}", nn.Conv2d(prev, c, 1, bias=False))
            setattr(self, f"bn{i}", nn.BatchNorm2d(c))
            setattr(
                self,
                f"layer{i}",
                nn.Sequential(*[OfficialSanBottleneck(sa_type, c, kernels[i]) for _ in range(layers[i])]),
            )
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(2, 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn_in(self.conv_in(x)))
        for i in range(5):
            conv, bn, layer = getattr(self, f"conv{i}"), getattr(self, f"bn{i}"), getattr(self, f"layer{i}")
            x = self.relu(bn(layer(conv(self.pool(x)))))
        return self.fc(self.avgpool(x).flatten(1))


# ----------------------------------------------------------------------------------------------------------- PVT


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int, sr: int) -> None:
        super().__init__()
        self.heads, self.sr_ratio, self.scale = heads, sr, (dim // heads) ** -0.5
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        if sr > 1:
            self.sr = nn.Conv2d(dim, dim, sr, sr)
            self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, n, c = x.shape
        q = self.q(x).reshape(b, n, self.heads, c // self.heads).permute(0, 2, 1, 3)
        if self.sr_ratio > 1:
            x_ = self.norm(self.sr(x.permute(0, 2, 1).reshape(b, c, h, w)).reshape(b, c, -1).permute(0, 2, 1))
        else:
            x_ = x
        kv = self.kv(x_).reshape(b, -1, 2, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ kv[0].transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ kv[1]).transpose(1, 2).reshape(b, n, c))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, sr: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _Attention(dim, heads, sr)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), h, w)
        return x + self.mlp(self.norm2(x))


class _PatchEmbed(nn.Module):
    def __init__(self, img_size: int, patch: int, cin: int, dim: int) -> None:
        super().__init__()
        self.patch, self.H, self.W = patch, img_size // patch, img_size // patch
        self.num_patches = self.H * self.W
        self.proj = nn.Conv2d(cin, dim, patch, patch)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        _, _, h, w = x.shape
        return self.norm(self.proj(x).flatten(2).transpose(1, 2)), (h // self.patch, w // self.patch)


class OfficialPVT(nn.Module):
    """``PyramidVisionTransformer`` (v1) of whai362/PVT with the pvt_tiny / pvt_small arguments."""

    def __init__(self, depths: tuple[int, ...], num_classes: int = 1000, img_size: int = 224) -> None:
        super().__init__()
        dims, heads, mlps, srs = (64, 128, 320, 512), (1, 2, 5, 8), (8, 8, 4, 4), (8, 4, 2, 1)
        for i in range(4):
            pe = _PatchEmbed(
                img_size if i == 0 else img_size // 2 ** (i + 1),
                4 if i == 0 else 2,
                3 if i == 0 else dims[i - 1],
                dims[i],
            )
            setattr(self, f"patch_embed{i + 1}", pe)
            setattr(self, f"pos_embed{i + 1}", nn.Parameter(torch.zeros(1, pe.num_patches + (i == 3), dims[i])))
            setattr(
                self,
                f"block{i + 1}",
                nn.ModuleList([_Block(dims[i], heads[i], mlps[i], srs[i]) for _ in range(depths[i])]),
            )
        self.norm = nn.LayerNorm(dims[3], eps=1e-6)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dims[3]))
        self.head = nn.Linear(dims[3], num_classes)

    def _get_pos_embed(self, pos: torch.Tensor, pe: _PatchEmbed, h: int, w: int) -> torch.Tensor:
        if h * w == self.patch_embed1.num_patches:  # the upstream check compares with stage 1 in every stage
            return pos
        grid = pos.reshape(1, pe.H, pe.W, -1).permute(0, 3, 1, 2)
        return F.interpolate(grid, size=(h, w), mode="bilinear").reshape(1, -1, h * w).permute(0, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        for i in range(4):
            pe, pos = getattr(self, f"patch_embed{i + 1}"), getattr(self, f"pos_embed{i + 1}")
            x, (h, w) = pe(x)
            if i == 3:
                x = torch.cat([self.cls_token.expand(b, -1, -1), x], 1)
                pos = torch.cat([pos[:, :1], self._get_pos_embed(pos[:, 1:], pe, h, w)], 1)
            else:
                pos = self._get_pos_embed(pos, pe, h, w)
            x = x + pos
            for blk in getattr(self, f"block{i + 1}"):
                x = blk(x, h, w)
            if i != 3:
                x = x.reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous()
        return self.head(self.norm(x)[:, 0])
