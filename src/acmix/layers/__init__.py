"""nn.Modules that own parameters and call :mod:`acmix.ops`."""

from .acmix import ACmix, convert_official_state_dict, is_official_state_dict, position_grid
from .acmix_pvt import ACmixSpatialReductionAttention, SpatialReductionAttention
from .acmix_san import ACmixSanAttention, SanAttention
from .acmix_swin import AcmixSwinBlock, AcmixWindowAttention

__all__ = [
    "ACmix",
    "ACmixSanAttention",
    "ACmixSpatialReductionAttention",
    "AcmixSwinBlock",
    "AcmixWindowAttention",
    "SanAttention",
    "SpatialReductionAttention",
    "convert_official_state_dict",
    "is_official_state_dict",
    "position_grid",
]
