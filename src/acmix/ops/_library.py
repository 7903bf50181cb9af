"""The switchable ops as ``torch.library`` custom ops, so the backend choice survives every way of running a model.

Three ops have more than one implementation, chosen per call by Python code (:mod:`acmix.ops._dispatch`, the
``use_backend`` context of :mod:`acmix.ops.context`). Python dispatch cannot be compiled by TorchScript, and
``torch.fx`` symbolic tracing cannot branch on the shapes it inspects. Each op is therefore one custom op whose
kernel is that Python dispatch:

* ``acmix::local_attention(q, k, v, kernel_size, stride, rel_pos, scale, backend)`` (:func:`acmix.ops.local_attention`);
* ``acmix::local_aggregate(x, weight, kernel_size, stride, backend)`` (:func:`acmix.ops.local_aggregate`);
* ``acmix::conv_path_maps(maps, head_dim, fc_weight, group_weight, fc_bias, stride, impl, order)``
  (:func:`acmix.ops.conv_path_maps`).

The kernels are registered for ``CompositeImplicitAutograd``: they run above autograd, so the gradient is that of
whichever backend ran (its own ``autograd.Function`` included), ``torch.compile`` / ``torch.export`` trace into the
chosen backend's operations, ``torch.fx`` records one ``call_function`` node per call, and a scripted model calls
``torch.ops.acmix.*``, which dispatches at run time (``use_backend`` still applies). A scripted or traced model that
is saved and loaded again needs ``import acmix`` first, as torchvision's ops need ``import torchvision``.

The public Python functions check their arguments (clear one-line errors) and then call these ops; the checks are
skipped while TorchScript compiles and while ``torch.fx`` traces (:func:`acmix.ops._checks.is_symbolic`).
While ``torch.jit.trace`` runs (also ``torch.onnx.export(dynamo=False)``, which ultralytics' export uses) they call
the kernel directly instead, so the trace records standard operators that every ONNX runtime knows (the fast
backends step aside then, :mod:`acmix.ops._backends`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ._dispatch import AGGREGATE, choose_backend
from .conv_path import conv_path_maps_impl

__all__ = ["NAMESPACE"]

#: the custom-op namespace: ``torch.ops.acmix``
NAMESPACE = "acmix"

_SCHEMAS = {
    "local_attention": "(Tensor q, Tensor k, Tensor v, int kernel_size, int stride, Tensor? rel_pos, float? scale, "
    "str? backend) -> Tensor",
    "local_aggregate": "(Tensor x, Tensor weight, int kernel_size, int stride, str? backend) -> Tensor",
    "conv_path_maps": "(Tensor maps, int head_dim, Tensor fc_weight, Tensor group_weight, Tensor? fc_bias, "
    "int stride, str? impl, str order) -> Tensor",
}


def _local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: int,
    stride: int,
    rel_pos: torch.Tensor | None,
    scale: float | None,
    backend: str | None,
) -> torch.Tensor:
    return choose_backend(q, backend).fn(q, k, v, kernel_size, stride, rel_pos, scale)


def _local_aggregate(
    x: torch.Tensor, weight: torch.Tensor, kernel_size: int, stride: int, backend: str | None
) -> torch.Tensor:
    return AGGREGATE.choose(x, backend).fn(x, weight, kernel_size, stride)


_KERNELS: dict[str, Callable[..., torch.Tensor]] = {
    "local_attention": _local_attention,
    "local_aggregate": _local_aggregate,
    "conv_path_maps": conv_path_maps_impl,
}


def _register() -> None:
    for name, schema in _SCHEMAS.items():
        qualname = f"{NAMESPACE}::{name}"
        if hasattr(torch.ops, NAMESPACE) and hasattr(getattr(torch.ops, NAMESPACE), name):
            continue  # already registered in this process (a module reload)
        torch.library.define(qualname, schema)
        torch.library.impl(qualname, "CompositeImplicitAutograd")(_KERNELS[name])


_register()
