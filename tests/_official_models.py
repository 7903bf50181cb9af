"""Test-only re-statements of the official ACmix models, written from docs/official-code.md (the ResNet and Swin
operators, ResNet depths).

They keep the official parameter names and arithmetic, including their limits (fixed input resolution, window sizes
that must divide the stage maps, even maps for strided ACmix), so that their ``state_dict()`` is laid out like an
official checkpoint and their logits are what the official code would compute:

* :class:`OfficialACmixResNet`: ``ResNet/ResNet_ImageNet.py`` (torchvision v1.5 bottleneck, 3 x 3 -> ACmix, Kaiming
  fan_out on every conv, ``zero_init_residual`` off), built on ``tests/_official.py``'s operator.
* :class:`OfficialSwinACmix`: ``Swin-Transformer/models/swin_transformer_acmix.py`` (``SwinTransformer_acmix``):
  patch merging at the end of a stage, ``head`` a plain Linear, persistent index/mask buffers, conv path on the
  rolled map.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from _official import OfficialACmix


class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = OfficialACmix(planes, planes, stride=stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class OfficialACmixResNet(nn.Module):
    """``ACmix_ResNet`` (docs/official-code.md): 7x7/2 stem, 3x3/2 max-pool, 4 ACmix bottleneck stages, avgpool, fc."""

    def __init__(self, layers: tuple[int, ...] = (3, 4, 6, 3), num_classes: int = 1000) -> None:
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers)):
            setattr(self, f"layer{i + 1}", self._stage(planes, n, 1 if i == 0 else 2))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2048, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _stage(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * 4:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * 4, 1, stride=stride, bias=False), nn.BatchNorm2d(planes * 4)
            )
        out = [_Bottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * 4
        out += [_Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# ---------------------------------------------------------------------------------------------------- Swin
def _partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    b, h, w, c = x.shape
    x = x.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws, ws, c)


def _reverse(windows: torch.Tensor, ws: int, h: int, w: int) -> torch.Tensor:
    b = windows.shape[0] // ((h // ws) * (w // ws))
    x = windows.view(b, h // ws, w // ws, ws, ws, -1).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, -1)


class _WindowAttentionACmix(nn.Module):
    def __init__(self, dim: int, ws: int, heads: int) -> None:
        super().__init__()
        self.dim, self.ws, self.heads = dim, ws, heads
        self.scale = (dim // heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * ws - 1) ** 2, heads))
        ys, xs = torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")
        flat = torch.stack([ys.flatten(), xs.flatten()])  # (2, N)
        rel = (flat[:, :, None] - flat[:, None, :]).permute(1, 2, 0) + (ws - 1)  # (N, N, 2)
        self.register_buffer("relative_position_index", rel[..., 0] * (2 * ws - 1) + rel[..., 1])
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.fc = nn.Conv2d(3 * heads, 9, 1, bias=True)
        self.dep_conv = nn.Conv2d(9 * dim // heads, dim, 3, padding=1, groups=dim // heads, bias=True)
        self.rate1 = nn.Parameter(torch.full((1,), 0.5))
        self.rate2 = nn.Parameter(torch.full((1,), 0.5))
        shift = torch.zeros(9, 3, 3)
        for i in range(9):
            shift[i, i // 3, i % 3] = 1.0
        self.dep_conv.weight = nn.Parameter(shift.repeat(dim, 1, 1, 1))
        self.dep_conv.bias = None  # the official zero-fill helper returns None into the bias

    def forward(self, x: torch.Tensor, h: int, w: int, mask: torch.Tensor | None) -> torch.Tensor:
        b = x.shape[0]
        qkv = self.qkv(x)  # (B, H, W, 3C) on the (rolled) map
        f_all = qkv.reshape(b, h * w, 3 * self.heads, -1).permute(0, 2, 1, 3)  # (B, 3N, HW, hd)
        f_conv = self.fc(f_all).permute(0, 3, 1, 2).reshape(b, -1, h, w)  # (B, 9*hd, H, W), channel d*9+i
        out_conv = self.dep_conv(f_conv).permute(0, 2, 3, 1)  # (B, H, W, C)
        win = _partition(qkv, self.ws).reshape(-1, self.ws * self.ws, 3 * self.dim)
        b_, n, _ = win.shape
        q, k, v = win.reshape(b_, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        attn = attn + bias.permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            attn = (attn.view(b_ // nw, nw, self.heads, n, n) + mask.unsqueeze(1).unsqueeze(0)).view(
                -1, self.heads, n, n
            )
        out = self.proj((attn.softmax(-1) @ v).transpose(1, 2).reshape(b_, n, self.dim))
        out = _reverse(out.view(-1, self.ws, self.ws, self.dim), self.ws, h, w)
        return self.rate1 * out + self.rate2 * out_conv


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, dim: int, res: int, heads: int, ws: int, shift: int) -> None:
        super().__init__()
        if res <= ws:  # the official rule: no partition, no shift
            ws, shift = res, 0
        self.res, self.ws, self.shift = res, ws, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _WindowAttentionACmix(dim, ws, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = _Mlp(dim, 4 * dim)
        mask = None
        if shift > 0:
            img = torch.zeros(1, res, res, 1)
            cnt = 0
            for hs in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
                for wsl in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
                    img[:, hs, wsl, :] = cnt
                    cnt += 1
            mw = _partition(img, ws).view(-1, ws * ws)
            mask = mw.unsqueeze(1) - mw.unsqueeze(2)
            mask = mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)
        self.register_buffer("attn_mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, length, c = x.shape
        y = self.norm1(x).view(b, self.res, self.res, c)
        if self.shift:
            y = torch.roll(y, (-self.shift, -self.shift), (1, 2))
        y = self.attn(y, self.res, self.res, self.attn_mask)
        if self.shift:
            y = torch.roll(y, (self.shift, self.shift), (1, 2))
        x = x + y.reshape(b, length, c)
        return x + self.mlp(self.norm2(x))


class _PatchMerging(nn.Module):
    def __init__(self, res: int, dim: int) -> None:
        super().__init__()
        self.res = res
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, c = x.shape
        x = x.view(b, self.res, self.res, c)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x.view(b, -1, 4 * c)))


class _Stage(nn.Module):
    def __init__(self, dim: int, res: int, depth: int, heads: int, ws: int, downsample: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([_Block(dim, res, heads, ws, 0 if i % 2 == 0 else ws // 2) for i in range(depth)])
        self.downsample = _PatchMerging(res, dim) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return x if self.downsample is None else self.downsample(x)


class _PatchEmbed(nn.Module):
    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, 4, stride=4)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class OfficialSwinACmix(nn.Module):
    """``SwinTransformer_acmix`` (docs/official-code.md) at a fixed square input size; official keys and buffers."""

    def __init__(
        self,
        img_size: int = 224,
        embed_dim: int = 96,
        depths: tuple[int, ...] = (2, 2, 6, 2),
        num_heads: tuple[int, ...] = (3, 6, 12, 24),
        window_size: int = 7,
        num_classes: int = 1000,
    ) -> None:
        super().__init__()
        self.patch_embed = _PatchEmbed(embed_dim)
        res = img_size // 4
        layers = []
        for i, (depth, heads) in enumerate(zip(depths, num_heads)):
            last = i == len(depths) - 1
            layers.append(_Stage(embed_dim * 2**i, res, depth, heads, window_size, downsample=not last))
            res //= 1 if last else 2
        self.layers = nn.ModuleList(layers)
        self.num_features = embed_dim * 2 ** (len(depths) - 1)
        self.norm = nn.LayerNorm(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes)
        for m in self.modules():  # official _init_weights: Linear and LayerNorm only, the shift init survives
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x).mean(1))


# ---------------------------------------------------------------------------------------------------- files
def _fake_cfgnode() -> type:
    """A class that pickles as ``yacs.config.CfgNode`` with yacs's private flags (yacs is not installed)."""

    class CfgNode(dict):
        def __init__(self, init: dict | None = None) -> None:
            super().__init__(init or {})
            self.__dict__["__immutable__"] = False
            self.__dict__["__deprecated_keys__"] = set()
            self.__dict__["__renamed_keys__"] = {}
            self.__dict__["__new_allowed__"] = False

    CfgNode.__module__ = "yacs.config"
    CfgNode.__qualname__ = "CfgNode"
    return CfgNode


def save_with_fake_yacs(build, path) -> None:
    """``torch.save(build(CfgNode), path)`` while a stand-in ``yacs.config`` module exists (yacs is not installed),
    then restore ``sys.modules`` as it was."""
    import sys
    import types

    cfg_cls = _fake_cfgnode()
    mod = types.ModuleType("yacs.config")
    mod.CfgNode = cfg_cls  # type: ignore[attr-defined]
    saved = {name: sys.modules.get(name) for name in ("yacs", "yacs.config")}
    sys.modules["yacs"], sys.modules["yacs.config"] = types.ModuleType("yacs"), mod
    try:
        torch.save(build(cfg_cls), path)
    finally:
        for name, value in saved.items():
            if value is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = value


def swin_training_state(weights: dict, cfg_cls: type, extra=None) -> dict:
    """The official Swin ``save_checkpoint`` dict: model, optimizer, lr_scheduler, max_accuracy, epoch, a yacs
    ``CfgNode`` config (``extra`` entries added to it) and an apex ``amp`` state."""
    import numpy as np

    config = cfg_cls({"MODEL": cfg_cls({"TYPE": "swin_acmix", "DROP_PATH_RATE": 0.2}), **(extra or {})})
    return {
        "model": weights,
        "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0, 1]}]},
        "lr_scheduler": {"t_initial": 300, "warmup_t": 20},
        "max_accuracy": np.float64(81.9),
        "epoch": 299,
        "config": config,
        "amp": {"loss_scaler0": {"loss_scale": 65536.0, "unskipped": 12}},
    }


def save_swin_training_state(weights: dict, path, extra=None) -> None:
    """Save ``weights`` like the official Swin ``save_checkpoint`` (see :func:`swin_training_state`)."""
    save_with_fake_yacs(lambda cfg: swin_training_state(weights, cfg, extra), path)


def perturb_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give BN statistics/affines, biases and alpha/beta non-default values (weights keep their official init)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if not t.is_floating_point() or "attn_mask" in name:
                continue
            if "running_var" in name:
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            elif "running_mean" in name or name.endswith("bias"):
                t.copy_(torch.randn(t.shape, generator=gen) * 0.1)
            elif t.dim() == 1 and ("bn" in name or "norm" in name or "rate" in name):
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            elif "relative_position_bias_table" in name:
                t.copy_(torch.randn(t.shape, generator=gen) * 0.5)
            elif "dep_conv.weight" in name and not isinstance(model, OfficialACmixResNet):
                t.add_(torch.randn(t.shape, generator=gen) * 0.3)  # Swin keeps the shift init: move off it
    return model
