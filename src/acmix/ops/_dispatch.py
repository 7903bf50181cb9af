"""Backend registries and selection for the local ops (NATTEN-style dispatch).

Two ops have swappable backends: the local attention of the ACmix attention path and SAN's patchwise aggregation.
Each has a :class:`Registry` of :class:`Backend` entries: a function with the op's signature plus a predicate
``can_run(x) -> (ok, reason)`` and a priority. Selection order: the explicit ``backend=`` argument, then what
:mod:`acmix.ops.context` says (``use_backend`` block, ``set_backend`` default, environment), then the runnable backend
of highest priority. Every choice, and every skipped backend with its reason, is logged at DEBUG.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .context import current_backend

_logger = logging.getLogger(__name__)

AttnFn = Callable[..., torch.Tensor]
CanRun = Callable[[torch.Tensor], "tuple[bool, str]"]


@dataclass(frozen=True)
class Backend:
    """One implementation of an op, e.g. local attention ``fn(q, k, v, kernel_size, stride, rel_pos, scale)``."""

    name: str
    fn: AttnFn
    can_run: CanRun
    priority: int
    description: str = ""
    #: None: eligible for automatic selection; a string: opt-in only (chosen by name), with the measured reason
    opt_in: str | None = None


def _debug(msg: str, *args: object) -> None:
    if not torch.compiler.is_compiling():
        _logger.debug(msg, *args)


class Registry:
    """Named backends of one op, best (highest priority) first."""

    def __init__(self, op: str, key: str) -> None:
        self.op = op
        self.key = key  # the op's name in acmix.ops.context
        self._backends: dict[str, Backend] = {}

    def register(self, backend: Backend) -> None:
        """Add a backend; a duplicate name is an error (no silent overwrite)."""
        if backend.name in self._backends:
            raise ValueError(f"{self.op} backend {backend.name!r} is already registered")
        self._backends[backend.name] = backend

    def names(self) -> list[str]:
        return [b.name for b in sorted(self._backends.values(), key=lambda b: -b.priority)]

    def get(self, name: str) -> Backend:
        if name not in self._backends:
            raise ValueError(f"unknown backend {name!r}; valid backends: {', '.join(self.names())}")
        return self._backends[name]

    def status(self, x: torch.Tensor) -> list[tuple[str, bool, str]]:
        return [(name, *self._backends[name].can_run(x)) for name in self.names()]

    def choose(self, x: torch.Tensor, backend: str | None = None) -> Backend:
        """The argument, then :func:`acmix.ops.context.current_backend`, then the best runnable backend for ``x``.

        Logging is skipped while ``torch.compile`` traces, so the choice does not break the graph.
        """
        requested = backend if backend is not None else current_backend(self.key)
        if requested is not None and requested != "auto":
            chosen = self.get(requested)
            ok, reason = chosen.can_run(x)
            if not ok:
                raise ValueError(f"backend {requested!r} cannot run here: {reason}")
            _debug("%s: using requested backend %r", self.op, requested)
            return chosen
        for name in self.names():
            candidate = self._backends[name]
            ok, reason = candidate.can_run(x)
            if ok and candidate.opt_in is not None:
                ok, reason = False, f"opt-in only ({candidate.opt_in}); request it by name"
            if ok:
                _debug("%s: auto-selected backend %r for %s %s", self.op, name, x.device.type, x.dtype)
                return candidate
            _debug("%s: skipping backend %r: %s", self.op, name, reason)
        raise RuntimeError(f"no {self.op} backend can run; set ACMIX_LOG_LEVEL=DEBUG to see why")  # unreachable


ATTENTION = Registry("local attention", "attention")
AGGREGATE = Registry("local aggregation", "aggregate")


def register_backend(backend: Backend) -> None:
    """Add a local-attention backend; a duplicate name is an error (no silent overwrite)."""
    ATTENTION.register(backend)


def available_backends() -> list[str]:
    """Names of every registered local-attention backend, best first (whether or not this machine can run it)."""
    return ATTENTION.names()


def get_backend(name: str) -> Backend:
    """The local-attention backend called ``name``; an unknown name raises ValueError listing the valid ones."""
    return ATTENTION.get(name)


def backend_status(q: torch.Tensor | None = None) -> list[tuple[str, bool, str]]:
    """(name, runnable, reason) of every local-attention backend for a sample tensor (CPU float32 when None)."""
    return ATTENTION.status(torch.empty(1, 1, 1, 1, 1) if q is None else q)


def choose_backend(q: torch.Tensor, backend: str | None = None) -> Backend:
    """Pick the local-attention backend for ``q``: argument, then context/default/environment, then the best one."""
    return ATTENTION.choose(q, backend)


def choose_aggregate_backend(x: torch.Tensor, backend: str | None = None) -> Backend:
    """Pick the aggregation backend for ``x``: argument, then context/default/environment, then the best one."""
    return AGGREGATE.choose(x, backend)


def available_aggregate_backends() -> list[str]:
    """Names of every registered aggregation backend, best first."""
    return AGGREGATE.names()
