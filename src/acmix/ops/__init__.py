"""Stateless functional ops (tensors in, tensors out). Layers own parameters and call these.

* :func:`local_attention`: the ACmix attention path (sliding-window attention, reflection border), several backends;
* :func:`conv_path` / :func:`conv_path_maps`: the ACmix convolution path (FC + shift as group convolution);
* :func:`local_aggregate`: SAN's patchwise aggregation, several backends;
* :func:`use_backend` / :func:`set_backend`: choose the implementation of each op (context, decorator, global);
* the ``*_reference`` functions: readable specifications every faster path is tested against.

Border and window indexing helpers live in :mod:`acmix.ops._indexing`; the backend registries in
:mod:`acmix.ops._dispatch`.
"""

from . import _library  # noqa: F401  (torch.ops.acmix.*: the switchable ops as custom ops)
from ._dispatch import (
    Backend,
    available_aggregate_backends,
    available_backends,
    backend_status,
    choose_aggregate_backend,
    choose_backend,
    get_backend,
    register_backend,
)
from ._reference import conv_path_reference, local_attention_reference, shift_kernels
from .aggregation import local_aggregate, local_aggregate_reference
from .context import current_backend, set_backend, use_backend
from .conv_path import cell_upsample, conv_path, conv_path_maps
from .local_attention import local_attention

__all__ = [
    "Backend",
    "available_aggregate_backends",
    "available_backends",
    "backend_status",
    "cell_upsample",
    "choose_aggregate_backend",
    "choose_backend",
    "conv_path",
    "conv_path_maps",
    "conv_path_reference",
    "current_backend",
    "get_backend",
    "local_aggregate",
    "local_aggregate_reference",
    "local_attention",
    "local_attention_reference",
    "register_backend",
    "set_backend",
    "shift_kernels",
    "use_backend",
]
