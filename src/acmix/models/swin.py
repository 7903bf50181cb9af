"""ACmix-Swin: timm's Swin Transformer whose window attention carries the ACmix convolution path.

Pan et al., "On the Integration of Self-Attention and Convolution", CVPR 2022 (arXiv 2111.14556); follows the
released ``Swin-Transformer/models/swin_transformer_acmix.py`` of LeapLabTHU/ACmix (docs/official-code.md), written
anew on timm's :class:`~timm.models.swin_transformer.SwinTransformer` (Liu et al., ICCV 2021). Every block's attention
is swapped for :class:`acmix.layers.ACmixWindowAttention`; with ``attn_layer="window"`` the model is timm's Swin
unchanged, so the baselines are timm's own ``swin_tiny_patch4_window7_224`` / ``swin_small_patch4_window7_224``.

Official ``SwinTransformer_acmix`` checkpoints (whole training states with a yacs ``CfgNode``) load through
:func:`checkpoint_filter_fn` and timm's standard path::

    timm.create_model("acmix_swin_tiny_patch4_window7_224", pretrained=True,
                      pretrained_cfg_overlay=dict(file="acmix_swin_tiny.pth"))

Deviations (docs/deviations.md): any input size timm allows (the official code fixes 224 x 224); parameter names
``shift_weight``/``alpha``/``beta`` for the official ``dep_conv.weight``/``rate1``/``rate2``.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.nn as nn
from timm.models import generate_default_cfgs
from timm.models.swin_transformer import SwinTransformer as _TimmSwin
from timm.models.swin_transformer import checkpoint_filter_fn as _timm_swin_filter

from ..layers import ACmixSwinBlock, ACmixWindowAttention
from ._loading import OfficialWeightsMixin, register_checkpoint_filter
from ._registry import acmix_cfg, acmix_entrypoint, build_acmix_model

__all__ = ["SWIN_ATTN_LAYERS", "SwinTransformer", "checkpoint_filter_fn"]

#: the attention of every block: timm's window attention, or the same with the ACmix convolution path
SWIN_ATTN_LAYERS = ("window", "acmix")


class SwinTransformer(OfficialWeightsMixin, _TimmSwin):
    """timm's Swin Transformer with (or, ``attn_layer="window"``, without) the ACmix convolution path in every block.

    Args:
        *args: :class:`timm.models.swin_transformer.SwinTransformer` positional arguments.
        attn_layer: ``"acmix"`` (ACmix in every block) or ``"window"`` (timm's Swin exactly).
        acmix_kwargs: keyword arguments for :class:`acmix.layers.ACmixWindowAttention` (``mix``, ``shift_init``,
            ``fc_bias``, ``alpha_init``, ``beta_init``, ``conv_impl``...).
        **kwargs: :class:`timm.models.swin_transformer.SwinTransformer` arguments (``img_size``, ``depths``,
            ``num_heads``, ``drop_path_rate``, ``strict_img_size``...).

    Shape:
        input (B, in_chans, H, W) -> logits (B, num_classes); ``forward_features`` gives (B, H / 32, W / 32, C)
        (NHWC, as timm's Swin).
    """

    def __init__(
        self, *args: Any, attn_layer: str = "acmix", acmix_kwargs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        if attn_layer not in SWIN_ATTN_LAYERS:
            raise ValueError(f"attn_layer must be one of {SWIN_ATTN_LAYERS}, got {attn_layer!r}")
        super().__init__(*args, **kwargs)
        self.attn_layer = attn_layer
        if attn_layer == "acmix":
            for stage in self.layers:
                assert isinstance(stage.blocks, nn.Sequential)
                stage.blocks = nn.Sequential(
                    *[ACmixSwinBlock.from_block(block, **(acmix_kwargs or {})) for block in stage.blocks]  # type: ignore[arg-type]
                )

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """timm's (relative position bias tables) plus ACmix's alpha and beta (1-D, excluded in the official recipe)."""
        nwd = set(super().no_weight_decay())
        for name, module in self.named_modules():
            if isinstance(module, ACmixWindowAttention):
                nwd.update(f"{name}.{p}" for p, _ in module.named_parameters(recurse=False) if p in ("alpha", "beta"))
        return nwd


_OFFICIAL_NAMES = (
    ("attn.dep_conv.weight", "attn.shift_weight"),
    ("attn.rate1", "attn.alpha"),
    ("attn.rate2", "attn.beta"),
)


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Map an official ``SwinTransformer_acmix`` (or Microsoft Swin, or acmix) state dict onto :class:`SwinTransformer`.

    ACmix names: ``dep_conv.weight`` -> ``shift_weight``, ``rate1`` -> ``alpha``, ``rate2`` -> ``beta`` (a non-zero
    ``dep_conv.bias`` is refused: the official layer has none). Then timm's own Swin filter: the patch merging moves
    from the end of stage i to the start of stage i + 1, ``head`` -> ``head.fc``, persistent index/mask buffers are
    dropped, and relative position tables are resized to the model's windows.
    """
    state: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        if key.endswith("attn.dep_conv.bias"):
            if bool(torch.any(value != 0)):
                raise ValueError(f"{key} is non-zero; the official ACmix group conv has no bias")
            continue
        for old, new in _OFFICIAL_NAMES:
            if key.endswith(old):
                key = key[: -len(old)] + new
        state[key] = value
    return _timm_swin_filter(state, model)


register_checkpoint_filter(SwinTransformer, checkpoint_filter_fn)


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> SwinTransformer:
    out_indices = kwargs.pop("out_indices", tuple(range(len(kwargs.get("depths", (1, 1, 3, 1))))))
    kwargs.setdefault("strict_img_size", False)  # any size timm's Swin can pad to, not only 224 x 224
    model: SwinTransformer = build_acmix_model(
        SwinTransformer,
        variant,
        pretrained,
        feature_cfg=dict(flatten_sequential=True, out_indices=out_indices),
        **kwargs,
    )
    return model


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return acmix_cfg(
        first_conv="patch_embed.proj", classifier="head.fc", crop_pct=0.875, interpolation="bicubic", **kwargs
    )


default_cfgs = generate_default_cfgs(
    {
        "acmix_swin_tiny_patch4_window7_224": _cfg(
            description="official weights: github.com/LeapLabTHU/ACmix (Tsinghua Cloud / Google Drive), load with "
            "pretrained_cfg_overlay=dict(file=PATH)"
        ),
        "acmix_swin_small_patch4_window7_224": _cfg(
            description="official weights: github.com/LeapLabTHU/ACmix (Tsinghua Cloud / Google Drive), load with "
            "pretrained_cfg_overlay=dict(file=PATH)"
        ),
    }
)


_entry = partial(acmix_entrypoint, _create)
_SWIN: dict[str, Any] = dict(patch_size=4, window_size=7, embed_dim=96, num_heads=(3, 6, 12, 24))

acmix_swin_tiny_patch4_window7_224 = _entry(
    "acmix_swin_tiny_patch4_window7_224", "ACmix-Swin-T: Swin-T with ACmix attention", **_SWIN, depths=(2, 2, 6, 2)
)
acmix_swin_small_patch4_window7_224 = _entry(
    "acmix_swin_small_patch4_window7_224", "ACmix-Swin-S: Swin-S with ACmix attention", **_SWIN, depths=(2, 2, 18, 2)
)
