"""Backend registry and selection for the local attention op (NATTEN-style dispatch).

A backend is a function with the signature of :func:`acmix.ops._reference.local_attention_reference` plus a
predicate ``can_run(q) -> (ok, reason)``. Selection order: the explicit ``backend=`` argument, then the
``ACMIX_BACKEND`` environment variable, then the runnable backend of highest priority. The choice is logged at DEBUG.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .._env import env_backend

_logger = logging.getLogger(__name__)

AttnFn = Callable[..., torch.Tensor]
CanRun = Callable[[torch.Tensor], "tuple[bool, str]"]


@dataclass(frozen=True)
class Backend:
    """A local-attention implementation: ``fn(q, k, v, kernel_size, stride, rel_pos, scale)``."""

    name: str
    fn: AttnFn
    can_run: CanRun
    priority: int
    description: str = ""


_BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend) -> None:
    """Add a backend; a duplicate name is an error (no silent overwrite)."""
    if backend.name in _BACKENDS:
        raise ValueError(f"backend {backend.name!r} is already registered")
    _BACKENDS[backend.name] = backend


def available_backends() -> list[str]:
    """Names of every registered backend, best first (whether or not this machine can run it)."""
    return [b.name for b in sorted(_BACKENDS.values(), key=lambda b: -b.priority)]


def get_backend(name: str) -> Backend:
    if name not in _BACKENDS:
        raise ValueError(f"unknown backend {name!r}; valid backends: {', '.join(available_backends())}")
    return _BACKENDS[name]


def backend_status(q: torch.Tensor | None = None) -> list[tuple[str, bool, str]]:
    """(name, runnable, reason) of every backend for a sample tensor (CPU float32 when None)."""
    sample = torch.empty(1, 1, 1, 1, 1) if q is None else q
    return [(name, *get_backend(name).can_run(sample)) for name in available_backends()]


def choose_backend(q: torch.Tensor, backend: str | None = None) -> Backend:
    """Pick the backend for ``q``: argument, then ``ACMIX_BACKEND``, then the best runnable one."""
    requested = backend if backend is not None else env_backend()
    if requested is not None and requested != "auto":
        chosen = get_backend(requested)
        ok, reason = chosen.can_run(q)
        if not ok:
            raise ValueError(f"backend {requested!r} cannot run here: {reason}")
        _logger.debug("local attention: using requested backend %r", requested)
        return chosen
    for name in available_backends():
        candidate = _BACKENDS[name]
        ok, reason = candidate.can_run(q)
        if ok:
            _logger.debug("local attention: auto-selected backend %r for %s %s", name, q.device.type, q.dtype)
            return candidate
        _logger.debug("local attention: skipping backend %r: %s", name, reason)
    raise RuntimeError("no local attention backend can run; set ACMIX_LOG_LEVEL=DEBUG to see why")  # unreachable
