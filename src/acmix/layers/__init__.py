"""nn.Modules that own parameters and call :mod:`acmix.ops`.

ACmix host layers (each with the shared convolution path and alpha/beta mix of :class:`ConvPathMixin`):

* :class:`ACmix`: the operator for convolutional hosts (replaces a k x k convolution; ResNet);
* :class:`ACmixSanAttention`: SAN's self-attention module + the conv path (ACmix-SAN);
* :class:`ACmixSpatialReductionAttention`: PVT's spatial-reduction attention + the conv path (ACmix-PVT);
* :class:`ACmixWindowAttention` / :class:`ACmixSwinBlock`: Swin's window attention + the conv path (ACmix-Swin).

Their baselines: :class:`SanAttention`, :class:`SpatialReductionAttention` (and timm's Swin and ResNet layers).
"""

from .acmix import ACmix
from .acmix_pvt import ACmixSpatialReductionAttention, SpatialReductionAttention
from .acmix_san import ACmixSanAttention, SanAttention
from .acmix_swin import ACmixSwinBlock, ACmixWindowAttention
from .conv_path import ConvPathMixin

__all__ = [
    "ACmix",
    "ACmixSanAttention",
    "ACmixSpatialReductionAttention",
    "ACmixSwinBlock",
    "ACmixWindowAttention",
    "ConvPathMixin",
    "SanAttention",
    "SpatialReductionAttention",
]
