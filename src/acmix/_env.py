"""Environment switches, read in one place.

``ACMIX_BACKEND``   force a local-attention backend (``reference``, ...); see :func:`acmix.ops.available_backends`.
``ACMIX_LOG_LEVEL`` log level for the ``acmix`` logger (``DEBUG`` shows backend choices).
``ACMIX_RUN_SLOW``  ``1`` runs tests marked ``slow``.
"""

from __future__ import annotations

import logging
import os


def env_backend() -> str | None:
    """The backend forced by ``ACMIX_BACKEND``, or None."""
    value = os.environ.get("ACMIX_BACKEND", "").strip()
    return value or None


def configure_logging() -> None:
    """Apply ``ACMIX_LOG_LEVEL`` to the package logger (called by the CLI, never on import)."""
    level = os.environ.get("ACMIX_LOG_LEVEL", "").strip().upper()
    if level:
        logging.getLogger("acmix").setLevel(level)
