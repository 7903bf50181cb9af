"""acmix: ACmix (Pan et al., "On the Integration of Self-Attention and Convolution", CVPR 2022) for PyTorch.

* :func:`create_model` / :func:`list_models`: the model zoo (timm's factory and registry; importing acmix registers
  every ACmix variant and the baselines it re-implements);
* the ACmix layers, one per host, all built on :class:`ConvPathMixin`: :class:`ACmix` (convolutional hosts,
  ResNet), :class:`ACmixSanAttention`, :class:`ACmixSpatialReductionAttention` (PVT), :class:`ACmixWindowAttention`
  and its Swin block :class:`ACmixSwinBlock`;
* the functional ops :func:`local_attention` and :func:`conv_path`, and :func:`use_backend` / :func:`set_backend` /
  :func:`available_backends` to choose their implementations.
"""

from . import models  # registers the acmix models in timm's registry
from .layers import (
    ACmix,
    ACmixSanAttention,
    ACmixSpatialReductionAttention,
    ACmixSwinBlock,
    ACmixWindowAttention,
    ConvPathMixin,
)
from .models import create_model, list_models
from .ops import available_backends, conv_path, local_attention, set_backend, use_backend
from .tools import convert_model
from .version import __version__

__all__ = [
    "ACmix",
    "ACmixSanAttention",
    "ACmixSpatialReductionAttention",
    "ACmixSwinBlock",
    "ACmixWindowAttention",
    "ConvPathMixin",
    "__version__",
    "available_backends",
    "conv_path",
    "convert_model",
    "create_model",
    "list_models",
    "local_attention",
    "models",
    "set_backend",
    "use_backend",
]
