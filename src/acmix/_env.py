"""Environment switches, read in one place.

``ACMIX_BACKEND``   force a local-attention backend (``reference``, ...); see :func:`acmix.ops.available_backends`.
``ACMIX_AGGREGATE_BACKEND`` force a SAN aggregation backend; see :func:`acmix.ops.available_aggregate_backends`.
``ACMIX_LOG_LEVEL`` log level for the ``acmix`` logger (``DEBUG`` shows backend choices).
``ACMIX_RUN_SLOW``  ``1`` runs tests marked ``slow``.
``ACMIX_NO_CPP``    ``1`` turns off the C++ CPU attention backend (``cpp``): it is then never built or chosen.
``ACMIX_EXTENSIONS_DIR`` where the ``cpp`` backend is built and cached (default: torch's extension cache).
"""

from __future__ import annotations

import logging
import os

#: the environment variable that forces each switchable op's backend (see :mod:`acmix.ops.context`)
BACKEND_ENV = {"attention": "ACMIX_BACKEND", "aggregate": "ACMIX_AGGREGATE_BACKEND"}


def env_backend(op: str = "attention") -> str | None:
    """The backend forced for ``op`` by its environment variable (:data:`BACKEND_ENV`), or None."""
    var = BACKEND_ENV.get(op)
    value = os.environ.get(var, "").strip() if var else ""
    return value or None


def env_no_cpp() -> bool:
    """True when ``ACMIX_NO_CPP`` is set to anything but ``""`` or ``0``."""
    return os.environ.get("ACMIX_NO_CPP", "").strip() not in ("", "0")


def env_extensions_dir() -> str | None:
    """The build cache folder set by ``ACMIX_EXTENSIONS_DIR``, or None."""
    value = os.environ.get("ACMIX_EXTENSIONS_DIR", "").strip()
    return value or None


def configure_logging() -> None:
    """Apply ``ACMIX_LOG_LEVEL`` to the package logger (called by the CLI, never on import)."""
    level = os.environ.get("ACMIX_LOG_LEVEL", "").strip().upper()
    if level:
        logging.getLogger("acmix").setLevel(level)
