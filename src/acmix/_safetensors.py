"""safetensors files that carry a SHA-256 of their tensor data, so a corrupt file is refused at load time.

The format has no checksum of its own: a flipped bit in the data section, or a changed dtype, shape or offset in
the header, loads silently as different weights. The files acmix writes (checkpoints, ``acmix convert``) record
the SHA-256 of the tensor entries of the header (canonical JSON: names, dtypes, shapes, offsets) followed by the
data section, in the header's ``__metadata__`` (key :data:`CHECKSUM_KEY`); :func:`loads` verifies it when present.
Any safetensors reader still reads these files (the metadata is a plain string).
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


def _digest(header: dict, data: bytes, start: int) -> str:
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    h = hashlib.sha256(json.dumps(entries, sort_keys=True, separators=(",", ":")).encode())
    h.update(memoryview(data)[start:])
    return h.hexdigest()


def dumps(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """Serialize CPU, contiguous tensors (that share no memory) with their checksum in the metadata."""
    from safetensors.torch import save

    meta = {k: str(v) for k, v in (metadata or {}).items() if k != CHECKSUM_KEY}
    first = save(dict(tensors), metadata=meta)
    start = _data_offset(first)
    digest = _digest(json.loads(first[8:start]), first, start)
    return save(dict(tensors), metadata={**meta, CHECKSUM_KEY: digest})  # same entries and data, longer header


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
    if expected is not None and _digest(header, data, start) != expected:
        raise ChecksumError("the tensors do not match their recorded SHA-256: the file is corrupt")
    try:
        return load(data)
    except Exception as exc:  # safetensors raises its own error types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(first[:200]) from None
