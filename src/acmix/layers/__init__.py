"""nn.Modules that own parameters and call :mod:`acmix.ops`."""

from .acmix import ACmix, convert_official_state_dict, is_official_state_dict, position_grid

__all__ = ["ACmix", "convert_official_state_dict", "is_official_state_dict", "position_grid"]
