"""SAN-10/15/19 (patchwise and pairwise) and ACmix-SAN, native to timm.

Papers: Zhao et al., "Exploring Self-attention for Image Recognition", CVPR 2020 (arXiv 2004.13621); Pan et al.,
"On the Integration of Self-Attention and Convolution", CVPR 2022 (arXiv 2111.14556).
Upstream code followed: hszhao/SAN ``model/san.py`` (MIT licence), restated, not copied. No ACmix-SAN code was
released; the integration is this project's design (docs/deviations.md, section "SAN").

Deviations:
    * timm layout: ``stem``, ``stages.i`` (pool, transition ``conv``, ``blocks``, ``norm``), ``head.fc``; official
      checkpoints (``'state_dict'`` with ``module.`` prefixes, keys of ``model/san.py``) load through
      :func:`checkpoint_filter_fn`;
    * SAM's conv1/conv2/conv3 are one 1 x 1 conv ``qkv`` (same numbers);
    * the reflection border is defined for maps smaller than the window (upstream crashes on them), so any input
      of at least 32 x 32 works; odd sizes are floored by the 2 x 2 max pools exactly as upstream;
    * drop path (stochastic depth) on the residual branch, off by default (upstream has none).
"""

import logging
import re
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
import torch.nn as nn
from timm.layers import ClassifierHead, DropPath
from timm.models import generate_default_cfgs
from timm.models._manipulate import checkpoint_seq

from ..layers.acmix_san import ACmixSanAttention, SanAttention
from ._base import StagedModel, build_staged_model
from ._loading import OfficialWeightsMixin, extract_state_dict, register_checkpoint_filter
from ._registry import acmix_cfg, acmix_entrypoint

__all__ = ["ACMIX_SAN_STAGES", "SAN", "SanBlock", "SanStage", "checkpoint_filter_fn"]

_logger = logging.getLogger(__name__)

#: ``attn_layer`` -> the self-attention module of every block (the one argument that makes a model ACmix)
SAN_ATTN_LAYERS: dict[str, type[SanAttention]] = {"sam": SanAttention, "acmix": ACmixSanAttention}


class SanBlock(nn.Module):
    """SAN's pre-activation bottleneck: ``x + conv1x1(relu(bn2(attn(relu(bn1(x))))))``.

    Args:
        dim: channels in and out (SAN's ``planes``).
        kernel_size: attention window.
        attn_layer: ``"sam"`` (SAN) or ``"acmix"`` (SAN's module plus the ACmix conv path).
        sa_type: ``"patchwise"`` or ``"pairwise"``.
        share_planes: channels sharing one attention weight (8).
        rel_ratio, mid_ratio: q/k width dim / rel_ratio (16), v width dim / mid_ratio (4).
        acmix_kwargs: keyword arguments for :class:`acmix.layers.ACmixSanAttention` (ACmix only).
        drop_path: stochastic-depth rate of the residual branch.

    Shape:
        input (B, dim, H, W) -> output (B, dim, H, W).
    """

    def __init__(
        self,
        dim: int,
        *,
        kernel_size: int = 7,
        attn_layer: str = "sam",
        sa_type: str = "patchwise",
        share_planes: int = 8,
        rel_ratio: int = 16,
        mid_ratio: int = 4,
        acmix_kwargs: dict[str, Any] | None = None,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        if attn_layer not in SAN_ATTN_LAYERS:
            raise ValueError(f"attn_layer must be one of {tuple(SAN_ATTN_LAYERS)}, got {attn_layer!r}")
        mid = dim // mid_ratio
        self.bn1 = nn.BatchNorm2d(dim)
        extra: dict[str, Any] = dict(acmix_kwargs or {}) if attn_layer == "acmix" else {}
        self.attn = SAN_ATTN_LAYERS[attn_layer](
            dim, dim // rel_ratio, mid, share_planes=share_planes, kernel_size=kernel_size, sa_type=sa_type, **extra
        )
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv = nn.Conv2d(mid, dim, 1)
        self.act = nn.ReLU(inplace=True)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.conv.weight)
        if self.conv.bias is not None:
            nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(x))  # (B, dim, H, W)
        out = self.act(self.bn2(self.attn(out)))  # (B, mid, H, W)
        return x + self.drop_path(self.conv(out))


class SanStage(nn.Module):
    """2 x 2 max pool, 1 x 1 transition conv (no bias), SAN blocks, BN + ReLU.

    Shape:
        input (B, dim, H, W) -> output (B, dim_out, H // 2, W // 2).
    """

    def __init__(self, dim: int, dim_out: int, depth: int, drop_path: Sequence[float], **block_kwargs: Any) -> None:
        super().__init__()
        self.grad_checkpointing = False
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2)
        self.conv = nn.Conv2d(dim, dim_out, 1, bias=False)
        self.blocks = nn.Sequential(*[SanBlock(dim_out, drop_path=drop_path[i], **block_kwargs) for i in range(depth)])
        self.norm = nn.BatchNorm2d(dim_out)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(self.pool(x))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return self.act(self.norm(x))


class SAN(OfficialWeightsMixin, StagedModel):
    """Self-attention network (SAN) with an optional ACmix conv path in every attention module.

    Args:
        layers: blocks per stage (SAN10 (2, 1, 2, 4, 1), SAN15 (3, 2, 3, 5, 2), SAN19 (3, 3, 4, 6, 3)).
        kernels: attention window per stage (3, 7, 7, 7, 7).
        widths: stage widths (64, 256, 512, 1024, 2048); the stem has ``widths[0]`` channels.
        in_chans: input channels.
        num_classes: classes (0: no classifier).
        global_pool: timm pool type of the head (``"avg"`` upstream).
        attn_layer: attention module of every block, ``"sam"`` (SAN) or ``"acmix"`` (SAN's module plus the ACmix
            conv path), or one of them per stage. The only argument in which SAN-N and ACmix-SAN-N differ:
            ACmix-SAN uses ``ACMIX_SAN_STAGES`` (ACmix in the 7 x 7 stages, docs/deviations.md "SAN").
        sa_type: ``"patchwise"`` or ``"pairwise"``.
        share_planes, rel_ratio, mid_ratio: SAN block widths (8, 16, 4).
        acmix_kwargs: keyword arguments for every :class:`acmix.layers.ACmixSanAttention` (``conv_kernel_size``,
            ``mix``, ``shift_mode``...).
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth, linearly increasing over all blocks.

    Shape:
        input (B, in_chans, H, W), H, W >= 32 -> logits (B, num_classes); features (B, widths[-1], H/32, W/32).
    """

    def __init__(
        self,
        layers: Sequence[int] = (2, 1, 2, 4, 1),
        kernels: Sequence[int] = (3, 7, 7, 7, 7),
        widths: Sequence[int] = (64, 256, 512, 1024, 2048),
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        attn_layer: str | Sequence[str] = "sam",
        sa_type: str = "patchwise",
        share_planes: int = 8,
        rel_ratio: int = 16,
        mid_ratio: int = 4,
        acmix_kwargs: dict[str, Any] | None = None,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if not (len(layers) == len(kernels) == len(widths)) or not layers:
            raise ValueError(f"layers, kernels and widths must be equally long, got {layers}, {kernels}, {widths}")
        stage_attn = (attn_layer,) * len(layers) if isinstance(attn_layer, str) else tuple(attn_layer)
        if len(stage_attn) != len(layers) or any(a not in SAN_ATTN_LAYERS for a in stage_attn):
            raise ValueError(
                f"attn_layer must be one of {tuple(SAN_ATTN_LAYERS)} or one per stage ({len(layers)}), "
                f"got {attn_layer!r}"
            )
        self.num_classes, self.in_chans, self.drop_rate = num_classes, in_chans, drop_rate
        self.attn_layer, self.sa_type = stage_attn, sa_type
        self.stem = nn.Sequential()
        self.stem.add_module("conv", nn.Conv2d(in_chans, widths[0], 1, bias=False))
        self.stem.add_module("bn", nn.BatchNorm2d(widths[0]))
        self.stem.add_module("act", nn.ReLU(inplace=True))
        dpr = torch.linspace(0, drop_path_rate, sum(layers), device="cpu").tolist()
        stages: list[SanStage] = []
        self.feature_info: list[dict[str, Any]] = []
        dim, cur = widths[0], 0
        for i, (depth, kernel, width, attn) in enumerate(zip(layers, kernels, widths, stage_attn)):
            stages.append(
                SanStage(
                    dim,
                    width,
                    depth,
                    dpr[cur : cur + depth],
                    kernel_size=kernel,
                    attn_layer=attn,
                    sa_type=sa_type,
                    share_planes=share_planes,
                    rel_ratio=rel_ratio,
                    mid_ratio=mid_ratio,
                    acmix_kwargs=acmix_kwargs,
                )
            )
            self.feature_info.append(dict(num_chs=width, reduction=2 ** (i + 1), module=f"stages.{i}"))
            dim, cur = width, cur + depth
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = dim
        self.head: ClassifierHead = ClassifierHead(dim, num_classes, pool_type=global_pool, drop_rate=drop_rate)

    # ----------------------------------------------------------------- timm model surface (more in StagedModel)
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        fine = [
            (r"^stages\.(\d+)\.conv", (0,)),  # the transition conv opens its stage
            (r"^stages\.(\d+)\.blocks\.(\d+)", None),
            (r"^stages\.(\d+)\.norm", (99999,)),  # the stage-closing BN
        ]
        return dict(stem=r"^stem", blocks=r"^stages\.(\d+)" if coarse else fine)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            assert isinstance(stage, SanStage)
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool)

    def min_input_side(self) -> int:
        return 2 ** len(self.stages)  # one 2 x 2 max pool a stage

    def _intermediates(
        self, x: torch.Tensor, take_indices: list[int], stop: int, norm: bool
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The stem, then stages 0 .. stop - 1 (``norm``: nothing to add, every stage ends in its own BN)."""
        x = self.stem(x)
        intermediates = []
        for i, stage in enumerate(self.stages[:stop]):
            x = stage(x)
            if i in take_indices:
                intermediates.append(x)
        return x, intermediates

    def _prune_head(self, truncated: bool, prune_norm: bool, prune_head: bool) -> None:
        """A truncated SAN keeps a pooling head without classifier on the new width (it has no final norm to prune)."""
        if truncated:
            self.num_features = self.head_hidden_size = self.feature_info[len(self.stages) - 1]["num_chs"]
            self.head.reset(0, in_features=self.num_features)
        elif prune_head:
            self.reset_classifier(0, "")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> (B, num_features, H / 32, W / 32)."""
        if not torch.jit.is_scripting():  # eager only: TorchScript and torch.fx skip the checks
            self._check_input(x)
        return self.stages(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, C, h, w) -> (B, num_classes) logits, or the pooled (B, C) features with ``pre_logits``."""
        return self.head(x, pre_logits=pre_logits)


def checkpoint_filter_fn(state_dict: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """Map an official hszhao/SAN state dict (``model/san.py`` keys, optional ``module.`` prefix) to this layout.

    ``conv_in``/``bn_in`` -> ``stem.conv``/``stem.bn``; ``conv{i}``/``bn{i}`` -> ``stages.{i}.conv``/
    ``stages.{i}.norm``; ``layer{i}.{j}`` -> ``stages.{i}.blocks.{j}`` with ``sam.conv1/conv2/conv3`` concatenated
    into ``attn.qkv`` and ``sam.*`` -> ``attn.*``; ``fc`` -> ``head.fc``. A dict already in this layout is returned
    unchanged (minus ``module.`` prefixes). A wrapper dict holding ``'state_dict'`` or ``'model'`` is unwrapped.
    """
    sd = dict(extract_state_dict(state_dict))
    if "stem.conv.weight" in sd:
        return sd
    out: dict[str, Any] = {}
    for k, v in sd.items():
        k = re.sub(r"^conv_in\.", "stem.conv.", k)
        k = re.sub(r"^bn_in\.", "stem.bn.", k)
        k = re.sub(r"^conv(\d+)\.", r"stages.\1.conv.", k)
        k = re.sub(r"^bn(\d+)\.", r"stages.\1.norm.", k)
        k = re.sub(r"^layer(\d+)\.(\d+)\.sam\.", r"stages.\1.blocks.\2.attn.", k)
        k = re.sub(r"^layer(\d+)\.(\d+)\.", r"stages.\1.blocks.\2.", k)
        k = re.sub(r"^fc\.", "head.fc.", k)
        out[k] = v
    for prefix in sorted({k[: -len("conv1.weight")] for k in out if k.endswith(".attn.conv1.weight")}):
        for name in ("weight", "bias"):
            parts = [f"{prefix}conv{i}.{name}" for i in (1, 2, 3)]
            if all(p in out for p in parts):
                out[f"{prefix}qkv.{name}"] = torch.cat([out.pop(p) for p in parts], 0)
    _logger.debug("mapped %d official SAN tensors onto %s", len(out), type(model).__name__)
    return out


register_checkpoint_filter(SAN, checkpoint_filter_fn)


def _create_san(variant: str, pretrained: bool = False, **kwargs: Any) -> SAN:
    model: SAN = build_staged_model(SAN, variant, pretrained, default_indices=(0, 1, 2, 3, 4), **kwargs)
    return model


def _cfg(**kwargs: Any) -> dict[str, Any]:
    # SAN evaluates Resize 256 -> CenterCrop 224, bilinear (hszhao/SAN tool/train.py)
    return acmix_cfg(first_conv="stem.conv", classifier="head.fc", interpolation="bilinear", **kwargs)


_SAN_META = dict(
    paper_ids="arXiv:2004.13621",
    paper_name="Exploring Self-attention for Image Recognition",
    origin_url="https://github.com/hszhao/SAN",
    license="mit",
)

default_cfgs = generate_default_cfgs(
    {
        **{name: _cfg(**_SAN_META) for name in ("san10", "san15", "san19")},
        **{name: _cfg(**_SAN_META) for name in ("san10_pairwise", "san15_pairwise", "san19_pairwise")},
        **{name: _cfg() for name in ("acmix_san10", "acmix_san15", "acmix_san19")},
    }
)

_DEPTHS = {10: (2, 1, 2, 4, 1), 15: (3, 2, 3, 5, 2), 19: (3, 3, 4, 6, 3)}

#: ACmix-SAN: the conv path joins SAN's attention in the stages with 7 x 7 windows; stage 0 (3 x 3 window, 112 x 112)
#: keeps plain SAN. This reproduces the paper's multiply-adds (docs/deviations.md, section "SAN").
ACMIX_SAN_STAGES = ("sam", "acmix", "acmix", "acmix", "acmix")


_entry = partial(acmix_entrypoint, _create_san)
_PAIRWISE: dict[str, Any] = dict(attn_layer="sam", sa_type="pairwise")
_ACMIX_DOC = "ACmix-SAN{0}: SAN{0} patchwise with the ACmix conv path in its 7 x 7 stages (ACMIX_SAN_STAGES)"

san10 = _entry("san10", "SAN10 patchwise (hszhao/SAN)", layers=_DEPTHS[10], attn_layer="sam")
san15 = _entry("san15", "SAN15 patchwise (hszhao/SAN)", layers=_DEPTHS[15], attn_layer="sam")
san19 = _entry("san19", "SAN19 patchwise (hszhao/SAN)", layers=_DEPTHS[19], attn_layer="sam")
san10_pairwise = _entry("san10_pairwise", "SAN10 pairwise (hszhao/SAN)", layers=_DEPTHS[10], **_PAIRWISE)
san15_pairwise = _entry("san15_pairwise", "SAN15 pairwise (hszhao/SAN)", layers=_DEPTHS[15], **_PAIRWISE)
san19_pairwise = _entry("san19_pairwise", "SAN19 pairwise (hszhao/SAN)", layers=_DEPTHS[19], **_PAIRWISE)
acmix_san10 = _entry("acmix_san10", _ACMIX_DOC.format(10), layers=_DEPTHS[10], attn_layer=ACMIX_SAN_STAGES)
acmix_san15 = _entry("acmix_san15", _ACMIX_DOC.format(15), layers=_DEPTHS[15], attn_layer=ACMIX_SAN_STAGES)
acmix_san19 = _entry("acmix_san19", _ACMIX_DOC.format(19), layers=_DEPTHS[19], attn_layer=ACMIX_SAN_STAGES)
