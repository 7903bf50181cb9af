"""``acmix_micro``: a small ACmix network for tiny images (scikit-learn's 8 x 8 handwritten digits).

Pan et al., "On the Integration of Self-Attention and Convolution", CVPR 2022 (arXiv 2111.14556). Not a paper
model: the embedded default of ``acmix train``, sized so a 2-core CPU trains it to >= 97 % digits top-1 in well
under three minutes. It uses the ResNet-style ACmix layer (:class:`acmix.layers.ACmix`) in pre-activation-free
residual blocks, registered in timm's registry so ``timm.create_model("acmix_micro")`` works.

Deviations: none from the paper's operator; the architecture (stem conv, two ACmix stages, average pool, linear
head) is this project's own.
"""

from typing import Any

import torch
import torch.nn as nn
from timm.models import generate_default_cfgs

from ..layers import ACmix
from ._base import NativeModel, check_global_pool
from ._registry import acmix_cfg, acmix_entrypoint, build_acmix_model

__all__ = ["ACmixMicro"]


class MicroBlock(nn.Module):
    """Residual ACmix block: ``relu(x + bn(acmix(relu(bn(conv1x1(x))))))``, optionally strided with a projection.

    Args:
        dim, dim_out: input and output channels.
        stride: the ACmix layer's stride (the shortcut average-pools by it).
        norm_layer: ``"batchnorm"`` or ``"groupnorm"``.
        **acmix_kwargs: options of the :class:`acmix.ACmix` layer (``num_heads``, ``attn_kernel_size``...).

    Shape:
        input (B, dim, H, W) -> output (B, dim_out, ceil(H / stride), ceil(W / stride)).
    """

    def __init__(
        self, dim: int, dim_out: int, *, stride: int = 1, norm_layer: str = "batchnorm", **acmix_kwargs: Any
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim_out, 1, bias=False)
        self.bn1 = _norm(norm_layer, dim_out)
        self.mix = ACmix(dim_out, stride=stride, **acmix_kwargs)
        self.bn2 = _norm(norm_layer, dim_out)
        self.act = nn.ReLU(inplace=True)
        self.shortcut: nn.Module
        if stride != 1 or dim != dim_out:
            self.shortcut = nn.Sequential(
                nn.AvgPool2d(stride, ceil_mode=True) if stride > 1 else nn.Identity(),
                nn.Conv2d(dim, dim_out, 1, bias=False),
                _norm(norm_layer, dim_out),
            )
        else:
            self.shortcut = nn.Identity()

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn2.weight)  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.bn1(self.conv1(x)))  # (B, dim_out, H, W)
        y = self.bn2(self.mix(y))  # (B, dim_out, H / s, W / s)
        return self.act(y + self.shortcut(x))


class ACmixMicro(NativeModel):
    """Stem conv, one ACmix stage per entry of ``embed_dims`` (stride 2 from the second on), pool, linear head.

    Args:
        in_chans: input channels (1 for the digits).
        num_classes: classes; 0 gives a pooled-feature model without a classifier.
        embed_dims: channels per stage.
        depths: ACmix blocks per stage.
        num_heads: attention heads in every ACmix layer.
        attn_kernel_size: attention window k_att of the ACmix layers.
        drop_rate: dropout before the classifier.
        global_pool: ``"avg"`` or ``""`` (no pooling, forward_head then needs pooled input).
        norm_layer: ``"batchnorm"`` or ``"groupnorm"`` (per-sample statistics: data-parallel runs then equal a
            single process on the same global batch without SyncBatchNorm).

    Shape:
        input (B, in_chans, H, W) NCHW -> logits (B, num_classes).
    """

    def __init__(
        self,
        in_chans: int = 1,
        num_classes: int = 10,
        embed_dims: tuple[int, ...] = (32, 64),
        depths: tuple[int, ...] = (1, 1),
        num_heads: int = 4,
        attn_kernel_size: int = 5,
        drop_rate: float = 0.1,
        global_pool: str = "avg",
        norm_layer: str = "batchnorm",
    ) -> None:
        super().__init__()
        if norm_layer not in ("batchnorm", "groupnorm"):
            raise ValueError(f"norm_layer must be 'batchnorm' or 'groupnorm', got {norm_layer!r}")
        if len(embed_dims) != len(depths) or not embed_dims:
            raise ValueError(f"embed_dims and depths must be non-empty and equally long, got {embed_dims}, {depths}")
        check_global_pool(global_pool, self.global_pools)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, embed_dims[0], 3, padding=1, bias=False),
            _norm(norm_layer, embed_dims[0]),
            nn.ReLU(inplace=True),
        )
        stages = []
        # the stem is a feature level too (full resolution), so features_only gives >= 3 levels as timm's models do
        self.feature_info: list[dict[str, Any]] = [dict(num_chs=embed_dims[0], reduction=1, module="stem.2")]
        dim, reduction = embed_dims[0], 1
        for i, (dim_out, depth) in enumerate(zip(embed_dims, depths)):
            blocks = []
            for j in range(depth):
                stride = 2 if (i > 0 and j == 0) else 1
                reduction *= stride
                blocks.append(
                    MicroBlock(
                        dim,
                        dim_out,
                        stride=stride,
                        num_heads=num_heads,
                        attn_kernel_size=attn_kernel_size,
                        norm_layer=norm_layer,
                    )
                )
                dim = dim_out
            stages.append(nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=dim_out, reduction=reduction, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = dim
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()
        for m in self.modules():
            if isinstance(m, MicroBlock):
                m.zero_init_last()

    # ----------------------------------------------------------------- timm model surface (more in NativeModel)
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(stem=r"^stem", blocks=r"^stages\.(\d+)" if coarse else r"^stages\.(\d+)\.(\d+)")

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> (B, num_features, H / r, W / r) with r the last stage's reduction."""
        if not torch.jit.is_scripting():  # eager only: TorchScript and torch.fx skip the checks
            self._check_input(x)
        x = self.stem(x)
        for stage in self.stages:
            for block in stage:  # type: ignore[attr-defined]
                if self.grad_checkpointing and not torch.jit.is_scripting() and self.training:
                    x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
                else:
                    x = block(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, C, h, w) features -> (B, num_classes) logits, or (B, C) pooled features with ``pre_logits``."""
        if self.global_pool == "avg":
            x = x.mean(dim=(2, 3))  # (B, C)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)


def _norm(kind: str, dim: int) -> nn.Module:
    # groupnorm: per-sample statistics, so data-parallel training equals one process exactly (no SyncBatchNorm)
    return nn.BatchNorm2d(dim) if kind == "batchnorm" else nn.GroupNorm(min(8, dim), dim)


def _cfg(**kwargs: Any) -> dict[str, Any]:
    # 8 x 8 grey digits, normalised to [-1, 1]; this project's demo model, not one of the paper's
    return acmix_cfg(
        first_conv="stem.0",
        classifier="head",
        num_classes=10,
        input_size=(1, 8, 8),
        pool_size=(4, 4),
        crop_pct=1.0,
        interpolation="bilinear",
        mean=(0.5,),
        std=(0.5,),
        paper=False,
        **kwargs,
    )


default_cfgs = generate_default_cfgs({"acmix_micro": _cfg()})


def _create_micro(variant: str, pretrained: bool = False, **kwargs: Any) -> ACmixMicro:
    return build_acmix_model(
        ACmixMicro,
        variant,
        pretrained,
        pretrained_cfg_overlay=kwargs.pop("pretrained_cfg_overlay", None),
        feature_cfg=dict(flatten_sequential=True, out_indices=(0, 1, 2)),
        **kwargs,
    )


acmix_micro = acmix_entrypoint(
    _create_micro,
    "acmix_micro",
    "ACmix-Micro for 8 x 8 digits: 32 -> 64 channels, one ACmix block per stage, ~60 k parameters",
    embed_dims=(32, 64),
    depths=(1, 1),
    num_heads=4,
    attn_kernel_size=5,
)
