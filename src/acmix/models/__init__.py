"""Model families registered in timm's registry on ``import acmix``: ACmix variants beside their baselines.

Family modules (one per family) register their entrypoints with
:func:`acmix.models._registry_check.register_acmix_model` and build with
:func:`acmix.models._loading.build_acmix_model`; ``PAPER_TABLE`` lists every paper variant with its numbers.
"""

from ._loading import (
    LoadReport,
    OfficialWeightsMixin,
    build_acmix_model,
    extract_state_dict,
    get_checkpoint_filter,
    load_official_checkpoint,
    read_checkpoint,
    register_checkpoint_filter,
)
from ._meta import PAPER_TABLE, PaperRow, paper_row
from ._registry_check import ACMIX_ENTRYPOINTS, acmix_cfg, register_acmix_model
from .dense import FPNBackbone
from .micro import ACmixMicro as ACmixMicro  # registers acmix_micro (the embedded-digits model)
from .pvt import PyramidVisionTransformer
from .resnet import ResNet
from .san import SAN
from .swin import SwinTransformer

__all__ = [
    "ACMIX_ENTRYPOINTS",
    "FPNBackbone",
    "PAPER_TABLE",
    "LoadReport",
    "OfficialWeightsMixin",
    "PaperRow",
    "PyramidVisionTransformer",
    "ResNet",
    "SAN",
    "SwinTransformer",
    "acmix_cfg",
    "build_acmix_model",
    "extract_state_dict",
    "get_checkpoint_filter",
    "load_official_checkpoint",
    "paper_row",
    "read_checkpoint",
    "register_acmix_model",
    "register_checkpoint_filter",
]
