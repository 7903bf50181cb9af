"""Run folders: claimed once, locked while a run writes them, never silently overwritten.

- A new run refuses a folder that is not empty, with one line naming the two ways on: ``--resume DIR`` continues
  that run, ``--overwrite`` deletes its files first. A folder holding only a ``config.yaml`` (a run that stopped
  before its first checkpoint or epoch, e.g. on a bad image) has nothing to lose and is reused.
- The default folder ``runs/<model>-<YYYYmmdd-HHMMSS>`` gets a suffix ``-1``, ``-2``, ... when the name is taken
  (as timm's ``get_outdir(..., inc=True)``) and is claimed with an atomic ``mkdir``, so two runs started in the
  same second never share it.
- The writing process holds an exclusive OS lock (``fcntl.flock``) on ``<run>/.lock``, which also records its pid.
  The kernel drops the lock when the process ends in any way (``kill -9`` included), so no stale lock is left
  behind; a second writer is refused with one line naming the holder's pid. Readers (``acmix eval``, ``predict``,
  ``inspect``) take no lock: every file they read is replaced atomically (see :mod:`acmix.train.checkpoint`).
- Where ``fcntl`` is missing (Windows) the lock is skipped with a logged note. ``flock`` on network file systems
  (NFS) may be local to one machine.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import time
from pathlib import Path
from types import TracebackType

from .checkpoint import WriteError, writing

_logger = logging.getLogger(__name__)

__all__ = ["LOCK_NAME", "RunFolderError", "RunLock", "claim_run_dir", "default_run_dir", "run_artifacts"]

LOCK_NAME = ".lock"
#: what a run writes into its folder: removed by ``--overwrite`` (anything else in the folder is left alone)
_ARTIFACT_PREFIXES = ("last.", "best.")
_ARTIFACT_NAMES = ("checkpoints", "metrics.jsonl", "config.yaml", "loss.png", "accuracy.png", "tensorboard")


class RunFolderError(ValueError):
    """The run folder may not be written: another process holds it, or it holds a run and neither ``--resume``
    nor ``--overwrite`` was given. The message is one line naming the way on."""


def default_run_dir(model: str, root: str | Path = "runs", stamp: str | None = None, *, create: bool = True) -> Path:
    """``root/<model>-<stamp>``, or with ``-1``, ``-2``, ... appended when taken; created atomically (``mkdir``).

    Args:
        stamp: the time part (default: now, ``YYYYmmdd-HHMMSS``).
        create: claim the folder by creating it (``False``: only the name, for ranks that do not write).
    """
    base = Path(root) / f"{model.replace('/', '_')}-{stamp or time.strftime('%Y%m%d-%H%M%S')}"
    if not create:
        return base
    for n in range(10_000):
        cand = base if n == 0 else base.with_name(f"{base.name}-{n}")
        try:
            with writing(cand):
                base.parent.mkdir(parents=True, exist_ok=True)
                cand.mkdir()
            return cand
        except WriteError as exc:
            if not isinstance(exc.cause, FileExistsError):
                raise

    raise RunFolderError(f"{base}: 10000 run folders of that name exist; pass --output")


def run_artifacts(run_dir: Path) -> list[Path]:
    """The files and folders in ``run_dir`` that a run wrote (checkpoints, metrics, plots, config, debris)."""
    out = []
    for p in sorted(run_dir.iterdir()):
        name = p.name
        if name in _ARTIFACT_NAMES or name.startswith(_ARTIFACT_PREFIXES) or (name.startswith(".") and ".tmp-" in name):
            out.append(p)
    return out


def _nothing_to_lose(p: Path) -> bool:
    """Written by a run before it has trained anything worth keeping: its config, debris of a failed write."""
    return p.name == "config.yaml" or (p.name.startswith(".") and ".tmp-" in p.name)


def _describe(entries: list[Path], limit: int = 4) -> str:
    names = [p.name + ("/" if p.is_dir() else "") for p in entries]
    return ", ".join(names[:limit]) + (f", ... ({len(names)} entries)" if len(names) > limit else "")


class RunLock:
    """An exclusive, non-blocking ``flock`` on ``<run_dir>/.lock`` holding this process's pid; a context manager."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> RunLock:
        try:
            import fcntl
        except ImportError:
            _logger.warning("no fcntl on this platform: %s is not locked against a second writer", self.path.parent)
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunFolderError(
                f"{self.path.parent} is being written by another acmix process ({self.holder()}); "
                "wait for it to finish or stop it, or pass another --output"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        except OSError as exc:  # a full disk: the lock holds all the same, only the note of its holder is missing
            _logger.warning("%s: could not record the pid (%s)", self.path, exc.strerror or exc)
        return self

    def holder(self, attempts: int = 20) -> str:
        """``"pid N on HOST"`` from the lock file (the holder writes it just after locking: retried briefly)."""
        for _ in range(attempts):
            with contextlib.suppress(OSError):
                text = self.path.read_text().strip()
                if text:
                    return text
            time.sleep(0.05)
        return "pid unknown"

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        os.close(fd)  # closing the descriptor drops the flock; the file stays (deleting it would race a new holder)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def _same_folder(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and a.samefile(b))
    except OSError:
        return False


def claim_run_dir(run_dir: Path, *, resume_dir: Path | None = None, overwrite: bool = False) -> RunLock:
    """Create and lock ``run_dir`` for a run; refuse a folder holding another run. Returns the held lock.

    Args:
        resume_dir: the folder of the run being resumed (``--resume``): writing into it is allowed.
        overwrite: delete the files of a previous run in ``run_dir`` (only those a run writes) and start over.

    Raises:
        RunFolderError: another process holds the folder, or it is not empty and neither applies.
        WriteError: the folder or its lock file cannot be created (read-only, full disk).
    """
    with writing(run_dir):
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = RunLock(run_dir).acquire()
    try:  # checked under the lock: no other writer can fill the folder between the check and the first write
        if resume_dir is not None and _same_folder(run_dir, resume_dir):
            return lock
        entries = [p for p in sorted(run_dir.iterdir()) if p.name != LOCK_NAME]
        if all(_nothing_to_lose(p) for p in entries):
            return lock  # empty, or left by a run that stopped before its first epoch or checkpoint
        if not overwrite:
            if (run_dir / "last.state.pt").is_file():
                raise RunFolderError(
                    f"{run_dir} already holds a run ({_describe(entries)}): continue it with --resume {run_dir}, "
                    "or pass --overwrite to delete it and start over"
                )
            raise RunFolderError(
                f"{run_dir} is not empty ({_describe(entries)}): pass another --output, or --overwrite to start "
                f"over in it (--resume {run_dir} continues a run that has a checkpoint)"
            )
        _clear(run_dir)
    except BaseException:
        lock.release()
        raise
    return lock


def _clear(run_dir: Path) -> None:
    removed = run_artifacts(run_dir)
    for p in removed:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)
    kept = [p for p in run_dir.iterdir() if p.name != LOCK_NAME]
    _logger.warning(
        "--overwrite: deleted the previous run in %s (%s)%s",
        run_dir,
        _describe(removed) or "nothing",
        f"; kept other files: {_describe(kept)}" if kept else "",
    )
