"""Backend registries and selection for the local ops (NATTEN-style dispatch).

Two ops have swappable implementations: the local attention of the ACmix attention path and SAN's patchwise
aggregation. Each has a :class:`Registry` of :class:`Backend` entries: a function with the op's signature plus a
predicate ``can_run(x) -> (ok, reason)`` and a priority. Selection order: the explicit ``backend=`` argument, then the
op's environment variable (``ACMIX_BACKEND`` for attention, ``ACMIX_AGGREGATE_BACKEND`` for aggregation), then the
runnable backend of highest priority. Every choice, and every skipped backend with its reason, is logged at DEBUG.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .._env import env_backend

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

    def __init__(self, op: str, env_reader: Callable[[], str | None]) -> None:
        self.op = op
        self._env_reader = env_reader
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
        """The argument, then the environment variable, then the best runnable backend for ``x``.

        Logging is skipped while ``torch.compile`` traces, so the choice does not break the graph.
        """
        requested = backend if backend is not None else self._env_reader()
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


def _env_aggregate_backend() -> str | None:
    value = os.environ.get("ACMIX_AGGREGATE_BACKEND", "").strip()
    return value or None


ATTENTION = Registry("local attention", env_backend)
AGGREGATE = Registry("local aggregation", _env_aggregate_backend)


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
    """Pick the local-attention backend for ``q``: argument, then ``ACMIX_BACKEND``, then the best runnable one."""
    return ATTENTION.choose(q, backend)


def choose_aggregate_backend(x: torch.Tensor, backend: str | None = None) -> Backend:
    """Pick the aggregation backend for ``x``: argument, then ``ACMIX_AGGREGATE_BACKEND``, then the best one."""
    return AGGREGATE.choose(x, backend)


def available_aggregate_backends() -> list[str]:
    """Names of every registered aggregation backend, best first."""
    return AGGREGATE.names()
