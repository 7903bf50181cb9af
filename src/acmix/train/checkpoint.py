"""Checkpoints: safetensors weights + a small state file, written atomically, ``last`` and ``best``.

Layout of a run folder::

    checkpoints/<tag>.safetensors      model weights (immutable once written; <tag> = e<epoch>-u<updates>)
    checkpoints/<tag>.ema.safetensors  EMA weights, when EMA is on
    checkpoints/<tag>.state.pt         optimizer, scheduler, scaler, epoch/step, RNG states, config, metrics
    last.safetensors / last.state.pt   the newest checkpoint (copies of the files above)
    best.safetensors / best.state.pt   the best validation top-1 so far

Every file is written to a temporary name in the same folder, flushed and fsync'ed, then renamed over the
target with :func:`os.replace` (atomic on POSIX and Windows), and the folder is fsync'ed. A state file names its
own immutable weights file, so ``last.state.pt`` always points at complete, matching weights: a crash (even
``kill -9``) at any moment leaves the previous checkpoint loadable. State files are read with
``torch.load(weights_only=True)``: loading never runs code from the file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

_logger = logging.getLogger(__name__)

__all__ = [
    "CheckpointError",
    "atomic_write_bytes",
    "capture_rng",
    "find_state_file",
    "load_state",
    "load_weights",
    "restore_rng",
    "save_checkpoint",
    "unwrap_model",
]

STATE_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model (message names the file and the keys)."""


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare model under DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def _fsync_dir(path: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temp file in the same folder, fsync, ``os.replace``, fsync folder."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    _fsync_dir(path.parent)


def _atomic_copy(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    try:
        try:
            os.link(src, tmp)  # a hard link: no copy, same immutable bytes
        except OSError:
            shutil.copyfile(src, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, dst)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    _fsync_dir(dst.parent)


def _state_dict_bytes(sd: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    from safetensors.torch import save

    # safetensors needs contiguous tensors that share no memory
    clean = {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items() if isinstance(v, torch.Tensor)}
    return save(clean, metadata=metadata)


def _torch_bytes(obj: Any) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def capture_rng() -> dict[str, Any]:
    """Python, NumPy, torch (and CUDA) generator states as plain types (loadable with weights_only=True)."""
    np_state: Any = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [
            np_state[0],
            torch.from_numpy(np_state[1].astype(np.int64)),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        with contextlib.suppress(RuntimeError, IndexError):
            torch.cuda.set_rng_state_all(state["cuda"])


def _prune(ckpt_dir: Path, keep: set[str]) -> None:
    for p in ckpt_dir.iterdir():
        tag = p.name.split(".")[0]
        if p.name.startswith(".") and ".tmp-" in p.name:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()  # debris of an interrupted write
        elif tag not in keep:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


def save_checkpoint(
    run_dir: str | Path,
    kinds: tuple[str, ...],
    *,
    model: nn.Module,
    state: dict[str, Any],
    ema_model: nn.Module | None = None,
) -> Path:
    """Write one checkpoint and point ``kinds`` (``"last"``, ``"best"``) at it; returns the state file.

    ``state`` holds the non-weight state (optimizer, scheduler, epoch, ``updates``, RNG, config, metrics); its
    ``epoch`` and ``updates`` name the checkpoint. Older checkpoints not referenced by ``last`` or ``best`` are
    removed afterwards.
    """
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tag = f"e{int(state['epoch']):04d}-u{int(state['updates']):08d}"
    weights = ckpt_dir / f"{tag}.safetensors"
    meta = {"format": "acmix", "epoch": str(state["epoch"]), "updates": str(state["updates"])}
    if "model_name" in state:
        meta["model"] = str(state["model_name"])
    atomic_write_bytes(weights, _state_dict_bytes(unwrap_model(model).state_dict(), meta))
    full = dict(state, version=STATE_VERSION, weights=weights.name)
    if ema_model is not None:
        ema_file = ckpt_dir / f"{tag}.ema.safetensors"
        atomic_write_bytes(ema_file, _state_dict_bytes(unwrap_model(ema_model).state_dict(), meta))
        full["ema_weights"] = ema_file.name
    state_file = ckpt_dir / f"{tag}.state.pt"
    atomic_write_bytes(state_file, _torch_bytes(full))
    for kind in kinds:
        _atomic_copy(weights, run_dir / f"{kind}.safetensors")
        if ema_model is not None:
            _atomic_copy(ckpt_dir / full["ema_weights"], run_dir / f"{kind}.ema.safetensors")
        _atomic_copy(state_file, run_dir / f"{kind}.state.pt")  # last: the commit point of this checkpoint
    keep = {tag}
    for kind in ("last", "best"):
        sf = run_dir / f"{kind}.state.pt"
        if sf.exists():
            with contextlib.suppress(Exception):
                keep.add(str(load_state(sf)["weights"]).split(".")[0])
    _prune(ckpt_dir, keep)
    return state_file


def find_state_file(path: str | Path) -> Path:
    """Resolve ``--resume``: a run folder (its ``last.state.pt``), a ``*.state.pt`` or a ``*.safetensors`` file."""
    p = Path(path)
    if p.is_dir():
        p = p / "last.state.pt"
    elif p.suffix == ".safetensors":
        p = p.with_name(p.name[: -len(".safetensors")].removesuffix(".ema") + ".state.pt")
    if not p.is_file():
        raise FileNotFoundError(f"no checkpoint state file at {p}")
    return p


def load_state(path: str | Path) -> dict[str, Any]:
    """Read a state file safely (weights_only): no code from the file runs; corrupt files raise CheckpointError."""
    p = Path(path)
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # pickle errors, truncated zip, refused globals
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{p}: not a loadable acmix state file ({first[:300]})") from None
    if not isinstance(obj, dict) or "weights" not in obj:
        raise CheckpointError(f"{p}: not an acmix state file (no 'weights' entry)")
    return obj


def _summary(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file to CPU tensors; a truncated or corrupt file raises CheckpointError naming it."""
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"weights file not found: {p}")
    try:
        return load_file(str(p), device="cpu")
    except Exception as exc:
        raise CheckpointError(f"{p}: cannot read safetensors weights ({str(exc).splitlines()[0][:200]})") from None


def load_weights(model: nn.Module, path: str | Path, *, strict: bool = True) -> dict[str, list[str]]:
    """Load safetensors weights into ``model``; mismatches raise CheckpointError naming the file and keys.

    With ``strict=False`` missing/unexpected keys and shape mismatches are skipped and returned as
    ``{"missing": [...], "unexpected": [...], "mismatched": [...]}``.
    """
    sd = read_weights(path)
    target = unwrap_model(model)
    own = target.state_dict()
    mismatched = [k for k, v in sd.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if strict and (missing or unexpected or mismatched):
        parts = []
        if missing:
            parts.append(f"missing {_summary(missing)}")
        if unexpected:
            parts.append(f"unexpected {_summary(unexpected)}")
        if mismatched:
            detail = [f"{k} {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}" for k in mismatched]
            parts.append(f"shape mismatch {_summary(detail, 4)}")
        raise CheckpointError(f"{path}: does not fit {type(target).__name__}: " + "; ".join(parts))
    target.load_state_dict({k: v for k, v in sd.items() if k in own and k not in mismatched}, strict=False)
    if missing or unexpected or mismatched:
        _logger.warning(
            "%s: loaded non-strictly; skipped %d missing, %d unexpected, %d shape-mismatched key(s)",
            path,
            len(missing),
            len(unexpected),
            len(mismatched),
        )
    return {"missing": missing, "unexpected": unexpected, "mismatched": mismatched}


def state_weights_path(state_file: Path, state: Mapping[str, Any], key: str = "weights") -> Path:
    """The immutable weights file a state file refers to (``checkpoints/<tag>...``)."""
    name = str(state[key])
    for cand in (state_file.parent / name, state_file.parent / "checkpoints" / name):
        if cand.is_file():
            return cand
    raise CheckpointError(f"{state_file}: its weights file {name} is missing")
