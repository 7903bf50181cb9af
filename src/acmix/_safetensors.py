"""safetensors files that carry a SHA-256 of their tensor data, so a corrupt file is refused at load time.

The format has no checksum of its own: a flipped bit in the data section loads silently as a different weight. The
files acmix writes (checkpoints, ``acmix convert``) record ``sha256`` of the bytes after the header in the header's
``__metadata__`` (key :data:`CHECKSUM_KEY`); :func:`loads` verifies it when present. Any safetensors reader still
reads these files (the metadata is a plain string).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

import torch

__all__ = ["CHECKSUM_KEY", "ChecksumError", "dumps", "loads"]

CHECKSUM_KEY = "acmix_sha256"


class ChecksumError(ValueError):
    """The tensor data does not match the checksum recorded in the file: it was changed after writing."""


def _data_offset(data: bytes) -> int:
    if len(data) < 8:
        raise ValueError(f"{len(data)} bytes: shorter than a safetensors header")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise ValueError(f"header length {n} exceeds the file ({len(data)} bytes): truncated")
    return 8 + n


def dumps(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """Serialize CPU, contiguous tensors (that share no memory) with their data checksum in the metadata."""
    from safetensors.torch import save

    meta = {k: str(v) for k, v in (metadata or {}).items() if k != CHECKSUM_KEY}
    first = save(dict(tensors), metadata=meta)
    digest = hashlib.sha256(memoryview(first)[_data_offset(first) :]).hexdigest()
    return save(dict(tensors), metadata={**meta, CHECKSUM_KEY: digest})  # same data section, longer header


def loads(data: bytes) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file's bytes, after checking the recorded checksum (if any).

    Raises:
        ChecksumError: the checksum does not match.
        ValueError: not a readable safetensors file (truncated header, bad JSON, bad offsets...).
    """
    from safetensors.torch import load

    start = _data_offset(data)
    try:
        header = json.loads(data[8:start])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"the header is not JSON ({exc})") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    expected = meta.get(CHECKSUM_KEY) if isinstance(meta, dict) else None
    if expected is not None and hashlib.sha256(memoryview(data)[start:]).hexdigest() != expected:
        raise ChecksumError("the tensor data does not match its recorded SHA-256: the file is corrupt")
    try:
        return load(data)
    except Exception as exc:  # safetensors raises its own error types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(first[:200]) from None
