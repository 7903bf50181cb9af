"""nn.Modules that own parameters and call :mod:`acmix.ops`."""

from .acmix import ACmix, convert_official_state_dict, is_official_state_dict, position_grid
from .acmix_swin import AcmixSwinBlock, AcmixWindowAttention

__all__ = [
    "ACmix",
    "AcmixSwinBlock",
    "AcmixWindowAttention",
    "convert_official_state_dict",
    "is_official_state_dict",
    "position_grid",
]
