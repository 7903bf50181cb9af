"""PVT-Tiny/Small (Pyramid Vision Transformer v1) and ACmix-PVT, native to timm.

Papers: Wang et al., "Pyramid Vision Transformer: A Versatile Backbone for Dense Prediction without Convolutions",
ICCV 2021 (arXiv 2102.12122); Pan et al., "On the Integration of Self-Attention and Convolution", CVPR 2022
(arXiv 2111.14556). Upstream code followed: whai362/PVT ``classification/pvt.py`` (Apache-2.0), restated, not copied.
No ACmix-PVT code was released; the integration is this project's design (docs/deviations.md, section "PVT").

Deviations:
    * timm layout: ``stages.i`` (``patch_embed``, ``pos_embed``, ``blocks``), ``cls_token``, ``norm``, ``head``;
      official DeiT-style checkpoints (``'model'``: ``patch_embed1..4``, ``pos_embed1..4``, ``block1..4``) load
      through :func:`checkpoint_filter_fn`;
    * position embeddings are resized (bilinear, as upstream) whenever a stage's grid differs from the one they were
      trained for; upstream compares every stage's token count with stage 1's, which skips or mis-shapes the resize
      at some sizes (448 x 448 crashes there) and agrees with this rule everywhere else;
    * ``features_only`` gives the four stage maps (stage 4 without the cls token);
    * ``no_weight_decay`` also lists the position embeddings (upstream lists only ``cls_token``; its own comment
      says excluding them "may be better").
"""

import logging
import re
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, trunc_normal_
from timm.models import generate_default_cfgs

from ..layers.acmix_pvt import ACmixSpatialReductionAttention, SpatialReductionAttention
from ..ops._checks import is_exporting, is_fx_symbolic_tracing
from ._base import StagedModel, build_staged_model, check_global_pool, mix_scalar_names
from ._loading import OfficialWeightsMixin, extract_state_dict, register_checkpoint_filter
from ._registry import acmix_cfg, acmix_entrypoint

__all__ = ["ACMIX_PVT_STAGES", "PvtBlock", "PvtStage", "PyramidVisionTransformer", "checkpoint_filter_fn"]

_logger = logging.getLogger(__name__)

#: ``attn_layer`` -> the attention of every block (the one argument that makes a model ACmix)
PVT_ATTN_LAYERS: dict[str, type[SpatialReductionAttention]] = {
    "sra": SpatialReductionAttention,
    "acmix": ACmixSpatialReductionAttention,
}

#: ACmix-PVT: the conv path in every block of every stage
ACMIX_PVT_STAGES = "acmix"


class PatchEmbed(nn.Module):
    """Non-overlapping patch embedding: ``patch_size`` strided conv, then LayerNorm (default eps, as upstream).

    Shape:
        (B, in_chans, H, W) -> tokens (B, (H // p) * (W // p), dim) and the grid (H // p, W // p).
    """

    def __init__(self, patch_size: int, in_chans: int, dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.proj(x)  # (B, dim, H / p, W / p)
        size = (x.shape[2], x.shape[3])
        return self.norm(x.flatten(2).transpose(1, 2)), size  # (B, h w, dim)


class PvtBlock(nn.Module):
    """Pre-norm transformer block with spatial-reduction attention: x + attn(norm1(x)); x + mlp(norm2(x)).

    Shape:
        x (B, P + H * W, dim) -> same shape.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        mlp_ratio: float = 4.0,
        sr_ratio: int = 1,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        attn_layer: str = "sra",
        acmix_kwargs: dict[str, Any] | None = None,
        norm_layer: Any = None,
    ) -> None:
        super().__init__()
        if attn_layer not in PVT_ATTN_LAYERS:
            raise ValueError(f"attn_layer must be one of {tuple(PVT_ATTN_LAYERS)}, got {attn_layer!r}")
        extra: dict[str, Any] = dict(acmix_kwargs or {}) if attn_layer == "acmix" else {}
        norm_layer = norm_layer or partial(nn.LayerNorm, eps=1e-6)  # upstream blocks: eps 1e-6
        self.norm1 = norm_layer(dim)
        self.attn = PVT_ATTN_LAYERS[attn_layer](
            dim,
            num_heads,
            sr_ratio=sr_ratio,
            qkv_bias=qkv_bias,
            attn_drop=attn_drop,
            proj_drop=proj_drop,
            **extra,
        )
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, feat_size: tuple[int, int], num_prefix_tokens: int = 0) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x), feat_size, num_prefix_tokens))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class PvtStage(nn.Module):
    """Patch embedding, absolute position embedding (optionally behind a cls token), PVT blocks.

    Args:
        dim, dim_out: channels in and out.
        depth: blocks.
        patch_size: patch embedding stride (4 for stage 1, 2 after).
        grid_size: the (h, w) grid the position embedding is stored for (224 input: 56, 28, 14, 7).
        use_cls_token: the stage prepends the model's cls token (PVT: stage 4); its embedding gets one more slot.
        drop_path: per-block stochastic-depth rates.
        **block_kwargs: :class:`PvtBlock` arguments.

    Shape:
        (B, dim, H, W) -> tokens (B, P + h * w, dim_out) and (h, w) = (H // p, W // p); P = 1 with the cls token.
    """

    def __init__(
        self,
        dim: int,
        dim_out: int,
        depth: int,
        *,
        patch_size: int,
        grid_size: tuple[int, int],
        use_cls_token: bool = False,
        drop_rate: float = 0.0,
        drop_path: Sequence[float] = (),
        **block_kwargs: Any,
    ) -> None:
        super().__init__()
        self.grad_checkpointing = False
        self.grid_size = grid_size
        self.num_prefix_tokens = 1 if use_cls_token else 0
        self.patch_embed = PatchEmbed(patch_size, dim, dim_out)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_prefix_tokens + grid_size[0] * grid_size[1], dim_out))
        self.pos_drop = nn.Dropout(drop_rate)
        dp = list(drop_path) or [0.0] * depth
        self.blocks = nn.ModuleList([PvtBlock(dim_out, drop_path=dp[i], **block_kwargs) for i in range(depth)])
        self.to_map = TokensToMap(self.num_prefix_tokens)

    def resized_pos_embed(self, size: tuple[int, int]) -> torch.Tensor:
        """(1, P + h * w, C) position embedding for a (h, w) grid: bilinear resize of the stored grid, as upstream."""
        return resize_pos_embed(self.pos_embed, self.grid_size, size, self.num_prefix_tokens)

    def forward(self, x: torch.Tensor, cls_token: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
        x, size = self.patch_embed(x)  # (B, h w, C)
        if self.num_prefix_tokens > 0:
            if cls_token is None:
                raise ValueError("this stage prepends a cls token; pass the model's cls_token")
            x = torch.cat([cls_token.expand(x.shape[0], -1, -1), x], 1)  # (B, 1 + h w, C)
        x = self.pos_drop(x + self.resized_pos_embed(size))
        for blk in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = torch.utils.checkpoint.checkpoint(blk, x, size, self.num_prefix_tokens, use_reentrant=False)
            else:
                x = blk(x, size, self.num_prefix_tokens)
        return x, size


class TokensToMap(nn.Module):
    """Tokens (B, P + h w, C) -> the spatial map (B, C, h, w), the P prefix tokens dropped.

    A module (no parameters) so that ``torch.fx`` feature extraction can name its output: ``stages.{i}.to_map`` is
    stage i's feature map (the ``module`` of :attr:`PyramidVisionTransformer.feature_info`).
    """

    def __init__(self, num_prefix_tokens: int = 0) -> None:
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        x = x[:, self.num_prefix_tokens :]
        return x.transpose(1, 2).reshape(x.shape[0], -1, size[0], size[1])


def resize_pos_embed(
    pos_embed: torch.Tensor, grid_size: tuple[int, int], size: tuple[int, int], num_prefix_tokens: int
) -> torch.Tensor:
    """A (1, P + gh * gw, C) position embedding stored for ``grid_size``, bilinearly resized to ``size`` (h, w).

    The stored one is returned as is at its own size, except while ``torch.export`` traces: there the resize always
    runs (at equal sizes bilinear interpolation is the identity, exactly), so an exported graph keeps height and
    width symbolic instead of fixing them to the traced size. A ``torch.fx`` leaf (``size`` may be Proxies).
    """
    resize = size[0] != grid_size[0] or size[1] != grid_size[1]
    if not torch.jit.is_scripting():
        if is_exporting():
            resize = True
    if not resize:
        return pos_embed
    p = num_prefix_tokens
    grid = pos_embed[:, p:].reshape(1, grid_size[0], grid_size[1], -1).permute(0, 3, 1, 2)  # (1, C, gh, gw)
    grid = F.interpolate(grid, size=size, mode="bilinear", align_corners=False)  # (1, C, h, w)
    return torch.cat([pos_embed[:, :p], grid.flatten(2).transpose(1, 2)], 1)


torch.fx.wrap("resize_pos_embed")


class PyramidVisionTransformer(OfficialWeightsMixin, StagedModel):
    """PVT v1 with an optional ACmix conv path in every attention layer.

    Args:
        img_size: the input size the position embeddings are stored for (other sizes resize them).
        patch_size: stage-1 patch size (4).
        in_chans: input channels.
        num_classes: classes (0: no classifier).
        global_pool: ``"token"`` (the cls token, upstream), ``"avg"`` (mean of the stage-4 map tokens) or ``""``.
        embed_dims, num_heads, mlp_ratios, sr_ratios, depths: per stage.
        qkv_bias: bias of q and kv.
        drop_rate, proj_drop_rate, attn_drop_rate: dropout after the position embedding, after projections,
            on attention weights; drop_rate also before the classifier.
        drop_path_rate: stochastic depth, linearly increasing over all blocks (upstream rule).
        attn_layer: ``"sra"`` (PVT) or ``"acmix"`` (ACmix-PVT), or one per stage; the only argument in which
            PVT and ACmix-PVT differ.
        acmix_kwargs: keyword arguments for every :class:`acmix.layers.ACmixSpatialReductionAttention`
            (``conv_kernel_size``, ``mix``, ``shift_mode``...).

    Shape:
        input (B, in_chans, H, W), H, W >= 32 -> logits (B, num_classes); forward_features gives the normalised
        tokens (B, 1 + (H // 32) * (W // 32), embed_dims[-1]), cls token first.
    """

    global_pools = ("token", "avg", "")

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        embed_dims: Sequence[int] = (64, 128, 320, 512),
        num_heads: Sequence[int] = (1, 2, 5, 8),
        mlp_ratios: Sequence[float] = (8, 8, 4, 4),
        sr_ratios: Sequence[int] = (8, 4, 2, 1),
        depths: Sequence[int] = (2, 2, 2, 2),
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        attn_layer: str | Sequence[str] = "sra",
        acmix_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        n = len(depths)
        if not (len(embed_dims) == len(num_heads) == len(mlp_ratios) == len(sr_ratios) == n) or not n:
            raise ValueError("embed_dims, num_heads, mlp_ratios, sr_ratios and depths must be equally long")
        stage_attn = (attn_layer,) * n if isinstance(attn_layer, str) else tuple(attn_layer)
        if len(stage_attn) != n or any(a not in PVT_ATTN_LAYERS for a in stage_attn):
            raise ValueError(f"attn_layer must be one of {tuple(PVT_ATTN_LAYERS)} or one per stage, got {attn_layer!r}")
        if sr_ratios[-1] != 1:
            raise ValueError(f"the last (cls-token) stage must have sr_ratio 1, got {sr_ratios[-1]}")
        check_global_pool(global_pool, self.global_pools)
        img_hw = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.num_classes, self.in_chans, self.global_pool = num_classes, in_chans, global_pool
        self.attn_layer = stage_attn
        self.num_prefix_tokens = 1
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        stages: list[PvtStage] = []
        self.feature_info: list[dict[str, Any]] = []
        dim, cur, reduction = in_chans, 0, 1
        for i in range(n):
            p = patch_size if i == 0 else 2
            reduction *= p
            stages.append(
                PvtStage(
                    dim,
                    embed_dims[i],
                    depths[i],
                    patch_size=p,
                    grid_size=(img_hw[0] // reduction, img_hw[1] // reduction),
                    use_cls_token=i == n - 1,
                    drop_rate=drop_rate,
                    drop_path=dpr[cur : cur + depths[i]],
                    num_heads=num_heads[i],
                    mlp_ratio=mlp_ratios[i],
                    sr_ratio=sr_ratios[i],
                    qkv_bias=qkv_bias,
                    proj_drop=proj_drop_rate,
                    attn_drop=attn_drop_rate,
                    attn_layer=stage_attn[i],
                    acmix_kwargs=acmix_kwargs,
                )
            )
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=reduction, module=f"stages.{i}.to_map"))
            dim, cur = embed_dims[i], cur + depths[i]
        self.stages = nn.ModuleList(stages)
        self.min_size = reduction
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.norm: nn.Module = nn.LayerNorm(dim, eps=1e-6)
        self.num_features = self.head_hidden_size = dim
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    def init_weights(self) -> None:
        """Upstream init: trunc_normal(0.02) for embeddings and Linear weights, zero Linear biases, unit LayerNorms.

        Convolutions (patch embeddings, reductions, the ACmix FC) keep PyTorch's default init and the ACmix group
        conv keeps its shift kernels, as in the official Swin-ACmix.
        """
        for stage in self._stages():
            trunc_normal_(stage.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _stages(self) -> list[PvtStage]:
        return [s for s in self.stages if isinstance(s, PvtStage)]

    # ----------------------------------------------------------------- timm model surface
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """cls token, position embeddings and ACmix's scalar alpha/beta."""
        names = {"cls_token"} | {f"stages.{i}.pos_embed" for i in range(len(self.stages))}
        return names | mix_scalar_names(self)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        fine = [
            (r"^stages\.(\d+)\.(?:patch_embed|pos_embed)", (0,)),  # the stage's embedding opens it
            (r"^stages\.(\d+)\.blocks\.(\d+)", None),
            (r"^norm", (99999,)),
        ]
        return dict(
            stem=r"^cls_token|^stages\.0\.(?:patch_embed|pos_embed)",
            blocks=[(r"^stages\.(\d+)", None), (r"^norm", (99999,))] if coarse else fine,
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self._stages():
            stage.grad_checkpointing = enable

    def min_input_side(self) -> int:
        return self.min_size

    def _intermediates(
        self, x: torch.Tensor, take_indices: list[int], stop: int, norm: bool
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Stages 0 .. stop - 1; ``norm=True`` applies the final LayerNorm to the last stage's map (the other stages
        have no norm)."""
        self._check_input(x)
        last = len(self.stages) - 1
        intermediates = []
        for i, stage in enumerate(self._stages()[:stop]):
            x, size = stage(x, self.cls_token if i == last else None)
            if i == last:
                if i in take_indices:
                    intermediates.append(stage.to_map(self.norm(x) if norm else x, size))
                x = self.norm(x)  # (B, 1 + h w, C), as forward_features
            else:
                x = stage.to_map(x, size)  # (B, C, h, w): the next patch embedding's input
                if i in take_indices:
                    intermediates.append(x)
        return x, intermediates

    def _prune_head(self, truncated: bool, prune_norm: bool, prune_head: bool) -> None:
        """The final norm belongs to the last stage: a truncated PVT loses it and its classifier."""
        if prune_norm or truncated:
            self.norm = nn.Identity()
        if truncated:
            self.num_features = self.head_hidden_size = self.feature_info[len(self.stages) - 1]["num_chs"]
        if prune_head or truncated:
            self.reset_classifier(0, "")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> normalised stage-4 tokens (B, 1 + (H // 32) (W // 32), C), cls token first."""
        if not torch.jit.is_scripting():  # eager only: TorchScript and torch.fx skip the checks
            self._check_input(x)
        last = len(self.stages) - 1
        for i, stage in enumerate(self.stages):
            x, size = stage(x, self.cls_token if i == last else None)
            if i != last:
                x = stage.to_map(x, size)  # type: ignore[operator]
            elif not torch.jit.is_scripting():
                if (
                    is_fx_symbolic_tracing()
                ):  # a node for stage i's map (feature extraction); unused here, so eager skips it
                    stage.to_map(x, size)  # type: ignore[operator]
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens (B, 1 + N, C) -> (B, num_classes) logits, or the pooled (B, C) features with ``pre_logits``."""
        if self.global_pool == "token":
            x = x[:, 0]
        elif self.global_pool == "avg":
            x = x[:, self.num_prefix_tokens :].mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)


def checkpoint_filter_fn(state_dict: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """Map an official whai362/PVT v1 state dict (``classification/pvt.py`` keys) to this layout.

    ``patch_embed{i}`` -> ``stages.{i-1}.patch_embed``, ``pos_embed{i}`` -> ``stages.{i-1}.pos_embed``,
    ``block{i}.{j}`` -> ``stages.{i-1}.blocks.{j}``; ``cls_token``, ``norm`` and ``head`` keep their names. A dict
    in this layout passes unchanged; ``module.`` prefixes are stripped and a ``'model'`` wrapper is unwrapped.
    Position embeddings stored for another grid are resized (bilinear) to the model's.
    """
    sd = dict(extract_state_dict(state_dict))
    out: dict[str, Any] = {}
    for k, v in sd.items():
        k = re.sub(r"^patch_embed(\d+)\.", lambda m: f"stages.{int(m.group(1)) - 1}.patch_embed.", k)
        k = re.sub(r"^pos_embed(\d+)$", lambda m: f"stages.{int(m.group(1)) - 1}.pos_embed", k)
        k = re.sub(r"^block(\d+)\.(\d+)\.", lambda m: f"stages.{int(m.group(1)) - 1}.blocks.{m.group(2)}.", k)
        out[k] = v
    stages = getattr(model, "stages", None)
    if stages is not None:
        for i, stage in enumerate(stages):
            key = f"stages.{i}.pos_embed"
            if key in out and out[key].shape != stage.pos_embed.shape:
                out[key] = _resize_pos_embed(out[key], stage.grid_size, stage.num_prefix_tokens)
    _logger.debug("mapped %d official PVT tensors onto %s", len(out), type(model).__name__)
    return out


def _resize_pos_embed(pos: torch.Tensor, grid: tuple[int, int], num_prefix: int) -> torch.Tensor:
    n = pos.shape[1] - num_prefix
    side = int(round(n**0.5))
    if side * side != n:
        raise ValueError(f"cannot resize a position embedding of {n} tokens (not a square grid) to {grid}")
    g = pos[:, num_prefix:].reshape(1, side, side, -1).permute(0, 3, 1, 2)  # (1, C, s, s)
    g = F.interpolate(g.float(), size=grid, mode="bilinear", align_corners=False).to(pos.dtype)
    return torch.cat([pos[:, :num_prefix], g.flatten(2).transpose(1, 2)], 1)


register_checkpoint_filter(PyramidVisionTransformer, checkpoint_filter_fn)


def _create_pvt(variant: str, pretrained: bool = False, **kwargs: Any) -> PyramidVisionTransformer:
    model: PyramidVisionTransformer = build_staged_model(
        PyramidVisionTransformer, variant, pretrained, default_indices=(0, 1, 2, 3), **kwargs
    )
    return model


def _cfg(**kwargs: Any) -> dict[str, Any]:
    # PVT evaluates Resize 256 -> CenterCrop 224, bicubic (DeiT recipe, whai362/PVT main.py); pool_size: the
    # stage-4 map at 224 x 224 (7 x 7 tokens behind the cls token)
    return acmix_cfg(first_conv="stages.0.patch_embed.proj", classifier="head", pool_size=(7, 7), **kwargs)


_PVT_META = dict(
    paper_ids="arXiv:2102.12122",
    paper_name="Pyramid Vision Transformer: A Versatile Backbone for Dense Prediction without Convolutions",
    origin_url="https://github.com/whai362/PVT",
)

default_cfgs = generate_default_cfgs(
    {
        "pvt_tiny": _cfg(**_PVT_META),
        "pvt_small": _cfg(**_PVT_META),
        "acmix_pvt_tiny": _cfg(),
        "acmix_pvt_small": _cfg(),
    }
)

_TINY: dict[str, Any] = dict(depths=(2, 2, 2, 2))
_SMALL: dict[str, Any] = dict(depths=(3, 4, 6, 3))
_entry = partial(acmix_entrypoint, _create_pvt)
_ACMIX_DOC = "ACmix-PVT-{0}: PVT-{0} with the ACmix conv path in every attention layer"

pvt_tiny = _entry("pvt_tiny", "PVT-Tiny (whai362/PVT v1)", **_TINY, attn_layer="sra")
pvt_small = _entry("pvt_small", "PVT-Small (whai362/PVT v1)", **_SMALL, attn_layer="sra")
acmix_pvt_tiny = _entry("acmix_pvt_tiny", _ACMIX_DOC.format("Tiny"), **_TINY, attn_layer=ACMIX_PVT_STAGES)
acmix_pvt_small = _entry("acmix_pvt_small", _ACMIX_DOC.format("Small"), **_SMALL, attn_layer=ACMIX_PVT_STAGES)
