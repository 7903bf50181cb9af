"""Stateless functional ops (tensors in, tensors out). Layers own parameters and call these."""

from ._dispatch import (
    available_aggregate_backends,
    available_backends,
    backend_status,
    choose_aggregate_backend,
    choose_backend,
    get_backend,
    register_backend,
)
from ._indexing import multiplicity, reflect_index, reflect_pad2d, window_indices
from ._reference import conv_path_reference, local_attention_reference, shift_kernels, shift_sum_reference
from .aggregation import local_aggregate, local_aggregate_reference
from .conv_path import CONV_PATH_IMPLS, conv_path
from .local_attention import local_attention

__all__ = [
    "CONV_PATH_IMPLS",
    "available_aggregate_backends",
    "available_backends",
    "backend_status",
    "choose_aggregate_backend",
    "choose_backend",
    "conv_path",
    "conv_path_reference",
    "get_backend",
    "local_aggregate",
    "local_aggregate_reference",
    "local_attention",
    "local_attention_reference",
    "multiplicity",
    "reflect_index",
    "reflect_pad2d",
    "register_backend",
    "shift_kernels",
    "shift_sum_reference",
    "window_indices",
]
