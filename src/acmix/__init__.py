"""acmix: ACmix (Pan et al., "On the Integration of Self-Attention and Convolution", CVPR 2022) for PyTorch."""

from . import models  # registers the acmix models in timm's registry
from .layers import ACmix
from .ops import available_backends, conv_path, local_attention
from .tools import convert_model
from .version import __version__

__all__ = ["ACmix", "__version__", "available_backends", "conv_path", "convert_model", "local_attention", "models"]
