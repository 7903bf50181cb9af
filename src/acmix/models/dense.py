"""Dense prediction on the libraries users already use: a torchvision detection backbone from any registered model.

torchvision's detectors (Faster R-CNN, RetinaNet, Mask R-CNN...) take a backbone module that returns an ordered dict
of feature maps and has an ``out_channels`` attribute. :class:`FPNBackbone` is that module for any timm model that
has ``feature_info``: torchvision's ``create_feature_extractor`` (``torch.fx``) takes the stage outputs that
``feature_info`` names, and torchvision's ``FeaturePyramidNetwork`` turns them into maps of one width::

    from torchvision.models.detection import FasterRCNN
    backbone = acmix.models.FPNBackbone("acmix_resnet26", out_channels=256)
    detector = FasterRCNN(backbone, num_classes=91)

Segmentation needs no helper: segmentation_models_pytorch builds any of these models as an encoder through timm's
``features_only`` (``smp.UPerNet("tu-acmix_resnet26", encoder_weights=None, classes=21)``).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import timm
import torch
import torch.nn as nn
from torchvision.models.feature_extraction import create_feature_extractor
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

__all__ = ["FPNBackbone"]


class FPNBackbone(nn.Module):
    """A registered model's stage outputs (reduction >= ``min_reduction``) through an FPN, for torchvision detectors.

    Args:
        name: registered model name (``timm.list_models("acmix*")``, a baseline, or any timm model).
        out_channels: FPN width (the detector heads' input width).
        min_reduction: the finest level taken (4: strides 4, 8, 16, 32, as torchvision's ResNet-FPN).
        extra_max_pool: add torchvision's stride-64 max-pool level (``"pool"``), as its ResNet-FPN does (the
            default anchor generator of Faster R-CNN expects five levels).
        **kwargs: :func:`timm.create_model` arguments (``pretrained``, ``drop_path_rate``, ``acmix_kwargs``...).

    Shape:
        input (B, C, H, W) with H, W multiples of 32 (torchvision's detection transform pads to that) ->
        ``OrderedDict`` ``"0"``, ``"1"``, ... (B, out_channels, H / r, W / r) for r = 4, 8, 16, 32 (and ``"pool"``).
    """

    def __init__(
        self,
        name: str,
        out_channels: int = 256,
        *,
        min_reduction: int = 4,
        extra_max_pool: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        model = timm.create_model(name, **kwargs)
        levels = [info for info in model.feature_info if info["reduction"] >= min_reduction]  # type: ignore[union-attr]
        if not levels:
            raise ValueError(f"{name} has no feature level with reduction >= {min_reduction}")
        self.nhwc = getattr(model, "output_fmt", "NCHW") == "NHWC"  # Swin's stages are NHWC
        self.reductions = [int(info["reduction"]) for info in levels]
        self.body = create_feature_extractor(
            model, return_nodes={info["module"]: str(i) for i, info in enumerate(levels)}
        )
        self.fpn = FeaturePyramidNetwork(
            [int(info["num_chs"]) for info in levels],
            out_channels,
            extra_blocks=LastLevelMaxPool() if extra_max_pool else None,
        )
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        feats = self.body(x)
        if self.nhwc:
            feats = OrderedDict((k, v.permute(0, 3, 1, 2)) for k, v in feats.items())  # -> (B, C, h, w)
        return self.fpn(feats)
