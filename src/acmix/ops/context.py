"""Which implementation the ops use: one switch for the whole library (as NATTEN's ``context`` and timm's
``set_fused_attn``).

Three ops have more than one implementation:

* ``attention``: the local attention of the ACmix attention path (:func:`acmix.ops.local_attention`), backends
  :func:`acmix.ops.available_backends`;
* ``aggregate``: SAN's patchwise aggregation (:func:`acmix.ops.local_aggregate`), backends
  :func:`acmix.ops.available_aggregate_backends`;
* ``conv``: the ACmix convolution path (:func:`acmix.ops.conv_path`), implementations :data:`acmix.types.CONV_IMPLS`.

Each call resolves its implementation in this order: the op's explicit argument (``backend=`` / ``impl=``, or a
layer's ``backend`` / ``conv_impl`` attribute when it is not ``None``), the innermost :func:`use_backend` block of
the calling thread, the process-wide :func:`set_backend` default, the environment (``ACMIX_BACKEND``,
``ACMIX_AGGREGATE_BACKEND``), then the automatic choice. ``use_backend(op="auto")`` asks for the automatic choice
inside its block (whatever outer blocks, the default or the environment say); ``set_backend(op="auto")`` removes the
process-wide default.

Under ``torch.compile`` the implementation is resolved while the graph is traced and stays fixed in that graph.

Example:
    >>> with acmix.ops.use_backend(attention="reference", conv="reference"):   # the official-style formulation
    ...     y = model(x)
    >>> @acmix.ops.use_backend(attention="offset")                             # as a decorator
    ... def lean_step(x): ...
"""

from __future__ import annotations

import contextlib
import threading

from .._env import env_backend
from ..types import CONV_IMPLS

__all__ = ["OPS", "current_backend", "set_backend", "use_backend"]

#: the ops whose implementation can be switched
OPS = ("attention", "aggregate", "conv")


class _Local(threading.local):
    def __init__(self) -> None:
        self.stack: list[dict[str, str]] = []


_local = _Local()
_global: dict[str, str] = {}


def _valid_names(op: str) -> list[str]:
    from ._dispatch import AGGREGATE, ATTENTION  # late: the registries import this module

    if op == "attention":
        return ATTENTION.names()
    if op == "aggregate":
        return AGGREGATE.names()
    return list(CONV_IMPLS)


def _validate(choices: dict[str, str | None]) -> dict[str, str]:
    """Drop ``None`` entries; every other name must be a registered implementation of its op (or ``"auto"``)."""
    out: dict[str, str] = {}
    for op, name in choices.items():
        if name is None:
            continue
        if not isinstance(name, str):
            raise ValueError(f"{op} backend must be a string name, got {type(name).__name__}")
        valid = ["auto"] + [n for n in _valid_names(op) if n != "auto"]
        if name not in valid:
            raise ValueError(f"unknown {op} backend {name!r}; valid backends: {', '.join(valid)}")
        out[op] = name
    return out


def current_backend(op: str) -> str | None:
    """The implementation requested for ``op`` by context, global default or environment; ``None``: automatic."""
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    for frame in reversed(_local.stack):
        if op in frame:
            return None if frame[op] == "auto" else frame[op]
    if op in _global:
        return _global[op]
    value = env_backend(op)
    return None if value == "auto" else value


def set_backend(attention: str | None = None, aggregate: str | None = None, conv: str | None = None) -> None:
    """Set the process-wide default implementation of each op given; ``"auto"`` removes the default (then the
    environment, then the automatic choice decide).

    Arguments left ``None`` keep their current default. A :func:`use_backend` block still takes precedence.
    """
    for op, name in _validate({"attention": attention, "aggregate": aggregate, "conv": conv}).items():
        if name == "auto":
            _global.pop(op, None)
        else:
            _global[op] = name


class use_backend(contextlib.ContextDecorator):  # noqa: N801  (lower case: used like a function, as NATTEN's)
    """Run the enclosed code (or the decorated function) with the given implementations; thread-local, nestable.

    Args:
        attention: local-attention backend (e.g. ``"reference"``, ``"tiled"``, ``"offset"``).
        aggregate: SAN aggregation backend (``"reference"``, ``"offset"``).
        conv: convolution-path implementation (``"fused"``, ``"reference"``, ``"auto"``).

    Unknown names raise ``ValueError`` when the block is entered, listing the valid ones.
    """

    def __init__(self, attention: str | None = None, aggregate: str | None = None, conv: str | None = None) -> None:
        self.choices = _validate({"attention": attention, "aggregate": aggregate, "conv": conv})

    def __enter__(self) -> use_backend:
        _local.stack.append(self.choices)
        return self

    def __exit__(self, *exc: object) -> None:
        _local.stack.pop()
