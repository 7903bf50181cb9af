"""Model families registered in timm's registry on ``import acmix``: ACmix variants beside their baselines.

Users call :func:`create_model` and :func:`list_models` (thin wrappers over timm's, see :mod:`._factory` and
:mod:`._registry`), read ``PAPER_TABLE``, and load official checkpoints with :func:`load_official_checkpoint`.

A family module (one per family) registers its entrypoints with :func:`acmix.models._registry.acmix_entrypoint` (one
line per variant; :func:`acmix.models._registry.register_acmix_model` for a hand-written one) and builds with
:func:`acmix.models._registry.build_acmix_model`; ``CONTRIBUTING.md`` walks through adding one.
"""

from ._factory import create_model
from ._loading import LoadReport, extract_state_dict, load_official_checkpoint, read_checkpoint
from ._meta import PAPER_TABLE, PaperRow, paper_row
from ._registry import list_models
from .dense import FPNBackbone
from .micro import ACmixMicro
from .pvt import PyramidVisionTransformer
from .resnet import ResNet
from .san import SAN
from .swin import SwinTransformer

__all__ = [
    "FPNBackbone",
    "PAPER_TABLE",
    "ACmixMicro",
    "LoadReport",
    "PaperRow",
    "PyramidVisionTransformer",
    "ResNet",
    "SAN",
    "SwinTransformer",
    "create_model",
    "extract_state_dict",
    "list_models",
    "load_official_checkpoint",
    "paper_row",
    "read_checkpoint",
]

# for family authors (CONTRIBUTING.md): importable here, not part of the user surface
from ._loading import OfficialWeightsMixin as OfficialWeightsMixin  # noqa: E402
from ._loading import get_checkpoint_filter as get_checkpoint_filter  # noqa: E402
from ._loading import register_checkpoint_filter as register_checkpoint_filter  # noqa: E402
from ._registry import ACMIX_ENTRYPOINTS as ACMIX_ENTRYPOINTS  # noqa: E402
from ._registry import acmix_cfg as acmix_cfg  # noqa: E402
from ._registry import acmix_entrypoint as acmix_entrypoint  # noqa: E402
from ._registry import build_acmix_model as build_acmix_model  # noqa: E402
from ._registry import register_acmix_model as register_acmix_model  # noqa: E402
