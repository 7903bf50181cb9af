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

Both kinds of file carry a SHA-256 of their content, checked on every load, so a file changed after writing (a
flipped bit on disk, a truncated copy) is refused with an error naming it instead of loading wrong numbers:
weights files in their safetensors metadata (:mod:`acmix._safetensors`), state files (version 2) as
``{"format": "acmix-state", "version": 2, "sha256": ..., "payload": <torch.save bytes of the state>}``. Version-1
state files (a plain dict, no checksum) still load.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import random
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

_logger = logging.getLogger(__name__)

__all__ = [
    "CheckpointError",
    "WriteError",
    "writing",
    "atomic_write_bytes",
    "capture_rng",
    "find_state_file",
    "load_state",
    "load_weights",
    "read_checkpoint_consistently",
    "restore_rng",
    "save_checkpoint",
    "unwrap_model",
]

STATE_VERSION = 2
_STATE_FORMAT = "acmix-state"
#: entries a state file may hold and their types (checked on load: a state must not fail later, at use)
_STATE_TYPES: dict[str, type | tuple[type, ...]] = {
    "weights": str,
    "ema_weights": str,
    "epoch": int,
    "batches_done": int,
    "updates": int,
    "best_epoch": int,
    "world": int,
    "num_classes": int,
    "best_top1": (int, float),
    "model_name": str,
    "model_kwargs": dict,
    "config": dict,
    "data": dict,
    "rng": dict,
    "optimizer": dict,
    "metrics": dict,
    "epoch_totals": dict,
}


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


class WriteError(OSError):
    """A run file could not be written (disk full, I/O error, read-only folder); ``str()`` is one line naming the
    file and the cause. The file's previous version, if any, is untouched (every write is a rename)."""

    def __init__(self, path: str | Path, cause: OSError) -> None:
        super().__init__(cause.errno, cause.strerror or str(cause))
        self.path, self.cause = Path(path), cause

    def __str__(self) -> str:
        code = errno.errorcode.get(self.errno) if self.errno is not None else None
        reason = (self.cause.strerror or str(self.cause) or type(self.cause).__name__).strip()
        return f"cannot write {self.path}: {reason}" + (f" ({code})" if code else "")


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Turn an OSError raised while writing ``path`` into a :class:`WriteError` naming it."""
    try:
        yield
    except WriteError:
        raise
    except OSError as exc:
        raise WriteError(path, exc) from exc


@contextlib.contextmanager
def _replacing(path: Path) -> Iterator[Path]:
    """A temporary name beside ``path`` for the body to fill; then ``os.replace`` over ``path`` and an fsync of the
    folder. The temporary file is removed whatever happens; an OSError becomes a :class:`WriteError` naming ``path``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with writing(path):
        try:
            yield tmp
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()
        _fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temp file in the same folder, fsync, ``os.replace``, fsync folder.

    Raises:
        WriteError: the write failed (the temp file is removed; ``path`` keeps its previous content).
    """
    with _replacing(Path(path)) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _atomic_copy(src: Path, dst: Path) -> None:
    with _replacing(dst) as tmp:
        try:
            os.link(src, tmp)  # a hard link: no copy, same immutable bytes
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EIO, errno.EROFS, errno.EDQUOT):
                raise
            shutil.copyfile(src, tmp)  # no hard links here (other file system, FAT, some network mounts)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())


def _state_dict_bytes(sd: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    from .._safetensors import dumps

    # safetensors needs contiguous tensors that share no memory
    clean = {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items() if isinstance(v, torch.Tensor)}
    return dumps(clean, metadata)


def _torch_bytes(obj: Any) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _state_bytes(state: dict[str, Any]) -> bytes:
    """A version-2 state file: the state's ``torch.save`` bytes wrapped with their SHA-256."""
    payload = _torch_bytes(state)
    digest = hashlib.sha256(payload).hexdigest()
    return _torch_bytes({"format": _STATE_FORMAT, "version": STATE_VERSION, "sha256": digest, "payload": payload})


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


#: (device, inode, mtime_ns, size) of a state file -> the weights file it names (state files are replaced, never
#: modified in place, so this identifies one version; spares re-reading large optimizer states on every save)
_WEIGHTS_OF: dict[tuple[int, int, int, int], str] = {}


def _stat_key(path: Path) -> tuple[int, int, int, int]:
    st = path.stat()
    return st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size


def _committed_tags(run_dir: Path) -> set[str] | None:
    """Tags of the checkpoints that ``last`` and ``best`` point at; None if one of them exists but cannot be read
    (then nothing is pruned: its weights may be all that is left of that checkpoint)."""
    tags = set()
    for kind in ("last", "best"):
        sf = run_dir / f"{kind}.state.pt"
        try:
            key = _stat_key(sf)
        except FileNotFoundError:
            continue
        except OSError:
            return None
        if key not in _WEIGHTS_OF:
            try:
                _WEIGHTS_OF[key] = str(load_state(sf)["weights"])
            except Exception:
                return None
        tags.add(_WEIGHTS_OF[key].split(".")[0])
    return tags


def _prune(ckpt_dir: Path, keep: set[str]) -> None:
    """Remove checkpoints other than ``keep`` and debris of interrupted writes (failures are only logged)."""
    for p in ckpt_dir.iterdir():
        debris = p.name.startswith(".") and ".tmp-" in p.name
        if debris or p.name.split(".")[0] not in keep:
            try:
                p.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                _logger.warning("could not remove the old checkpoint file %s (%s)", p, exc.strerror or exc)


def _commit_order(kinds: tuple[str, ...]) -> list[str]:
    """``last`` is committed after ``best``: a resume then never starts past a checkpoint whose ``best`` failed."""
    return sorted(set(kinds), key=lambda k: (k == "last", k))


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

    Raises:
        WriteError: a file could not be written. ``last`` still points at the previous, complete checkpoint (or
            already at this one, if only the clean-up failed), and the files of this checkpoint that nothing
            points at are removed again, so no orphan weights are left beside the good checkpoint.
    """
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    tag = f"e{int(state['epoch']):04d}-u{int(state['updates']):08d}"
    try:
        state_file = _write_checkpoint_files(run_dir, ckpt_dir, tag, kinds, model, state, ema_model)
    except OSError as exc:
        committed = _committed_tags(run_dir)
        if ckpt_dir.is_dir() and committed is not None:
            _prune(ckpt_dir, committed)  # drop what nothing points at: this checkpoint's files if uncommitted
        raise exc if isinstance(exc, WriteError) else WriteError(ckpt_dir / tag, exc) from exc
    committed = _committed_tags(run_dir)
    if committed is not None:
        _prune(ckpt_dir, {tag} | committed)
    return state_file


def _write_checkpoint_files(
    run_dir: Path,
    ckpt_dir: Path,
    tag: str,
    kinds: tuple[str, ...],
    model: nn.Module,
    state: dict[str, Any],
    ema_model: nn.Module | None,
) -> Path:
    with writing(ckpt_dir):
        ckpt_dir.mkdir(parents=True, exist_ok=True)
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
    atomic_write_bytes(state_file, _state_bytes(full))
    _WEIGHTS_OF[_stat_key(state_file)] = weights.name
    for kind in _commit_order(kinds):
        _atomic_copy(weights, run_dir / f"{kind}.safetensors")
        if ema_model is not None:
            _atomic_copy(ckpt_dir / full["ema_weights"], run_dir / f"{kind}.ema.safetensors")
        _atomic_copy(state_file, run_dir / f"{kind}.state.pt")  # the commit point of this kind
        with contextlib.suppress(OSError):
            _WEIGHTS_OF[_stat_key(run_dir / f"{kind}.state.pt")] = weights.name
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


def _torch_load(source: Any, p: Path) -> Any:
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # pickle errors, truncated zip, refused globals, and whatever a damaged pickle raises
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{p}: not a loadable acmix state file ({first[:300]})") from None


def load_state(path: str | Path) -> dict[str, Any]:
    """Read a state file safely (weights_only: no code from the file runs) and check its checksum and entries.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: unreadable, corrupt (checksum), or not an acmix state (message names the file).
    """
    import io

    p = Path(path)
    obj = _torch_load(p, p)
    if isinstance(obj, dict) and obj.get("format") == _STATE_FORMAT:
        payload, digest = obj.get("payload"), obj.get("sha256")
        if not isinstance(payload, bytes) or not isinstance(digest, str):
            raise CheckpointError(f"{p}: damaged acmix state file (no payload or checksum)")
        if hashlib.sha256(payload).hexdigest() != digest:
            raise CheckpointError(f"{p}: corrupt acmix state file (its content does not match its SHA-256)")
        obj = _torch_load(io.BytesIO(payload), p)
    if not isinstance(obj, dict) or "weights" not in obj:
        raise CheckpointError(f"{p}: not an acmix state file (no 'weights' entry)")
    for key, types in _STATE_TYPES.items():
        value = obj.get(key)
        if value is not None and (not isinstance(value, types) or isinstance(value, bool) and types is int):
            raise CheckpointError(f"{p}: damaged acmix state file ({key!r} is a {type(value).__name__})")
    return obj


def _summary(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file to CPU tensors, checking its checksum when it has one (acmix writes one).

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: truncated, corrupt or changed since written (the message names the file).
    """
    from .._safetensors import loads

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"weights file not found: {p}")
    try:
        return loads(p.read_bytes())
    except ValueError as exc:
        raise CheckpointError(f"{p}: cannot read safetensors weights ({str(exc)[:200]})") from None


def load_weights(model: nn.Module, path: str | Path, *, strict: bool = True) -> dict[str, list[str]]:
    """Load safetensors weights into ``model``; mismatches raise CheckpointError naming the file and keys.

    With ``strict=False`` missing/unexpected keys and shape mismatches are skipped and returned as
    ``{"missing": [...], "unexpected": [...], "mismatched": [...]}``.
    """
    return apply_weights(model, read_weights(path), path, strict=strict)


def apply_weights(
    model: nn.Module, sd: Mapping[str, torch.Tensor], path: str | Path, *, strict: bool = True
) -> dict[str, list[str]]:
    """:func:`load_weights` for a state dict already read from ``path`` (named in the messages)."""
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


def read_checkpoint_consistently(
    state_file: Path, key: str = "weights", attempts: int = 20
) -> tuple[dict[str, Any], Path, dict[str, torch.Tensor]]:
    """Read a state file and the weights it names as one consistent pair, even while a run writes the folder.

    A run replaces ``last.state.pt``/``best.state.pt`` and then removes the checkpoint files nothing points at any
    more; a reader that read the old state file can find its weights gone. Then the state file has been replaced,
    and it is read again (up to ``attempts`` times). A weights file missing while the state file is unchanged is
    an error.

    Returns:
        ``(state, weights path, weights)``.
    """
    for attempt in range(attempts):
        before = _stat_key(state_file)
        state = load_state(state_file)
        if key not in state:
            raise CheckpointError(f"{state_file}: no {key!r} entry (this run has no such weights)")
        try:
            path = state_weights_path(state_file, state, key)
            return state, path, read_weights(path)
        except (FileNotFoundError, CheckpointError):
            replaced = state_file.exists() and _stat_key(state_file) != before
            if not replaced or attempt == attempts - 1:
                raise
            _logger.debug("%s was replaced while reading it (a run is writing): reading it again", state_file)
    raise AssertionError("unreachable")


def state_weights_path(state_file: Path, state: Mapping[str, Any], key: str = "weights") -> Path:
    """The immutable weights file a state file refers to (``checkpoints/<tag>...``)."""
    name = str(state[key])
    for cand in (state_file.parent / name, state_file.parent / "checkpoints" / name):
        if cand.is_file():
            return cand
    raise CheckpointError(f"{state_file}: its weights file {name} is missing")
