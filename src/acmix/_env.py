"""Environment switches, read in one place.

``ACMIX_BACKEND``   force a local-attention backend (``reference``, ...); see :func:`acmix.ops.available_backends`.
``ACMIX_LOG_LEVEL`` log level for the ``acmix`` logger (``DEBUG`` shows backend choices).
``ACMIX_RUN_SLOW``  ``1`` runs tests marked ``slow``.
``ACMIX_NO_CPP``    ``1`` turns off the C++ CPU attention backend (``cpp``): it is then never built or chosen.
``ACMIX_EXTENSIONS_DIR`` where the ``cpp`` backend is built and cached (default: torch's extension cache).
"""

from __future__ import annotations

import logging
import os


def env_backend() -> str | None:
    """The backend forced by ``ACMIX_BACKEND``, or None."""
    value = os.environ.get("ACMIX_BACKEND", "").strip()
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
