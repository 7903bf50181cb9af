"""Helpers for the training-run tests: a small image folder of real digits and a file system that fails on cue."""

from __future__ import annotations

import builtins
import errno
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from acmix.train.data import digits_split


def digit_folder(root: Path, per_class: int = 12, val_per_class: int = 4) -> Path:
    """Real digit images (scikit-learn) written as 8 x 8 greyscale PNGs in the ImageNet layout."""
    from PIL import Image

    xtr, ytr, xva, yva = digits_split()
    for split, x, y, n in (("train", xtr, ytr, per_class), ("val", xva, yva, val_per_class)):
        for c in range(10):
            d = root / split / str(c)
            d.mkdir(parents=True, exist_ok=True)
            for j, i in enumerate((y == c).nonzero().flatten()[:n].tolist()):
                Image.fromarray((x[i, 0].numpy() * 255).astype(np.uint8), "L").save(d / f"{j}.png")
    return root


_TAG = re.compile(r"e\d{4}-u\d{8}")
_TMP = re.compile(r"\.tmp-\d+$")


def site_of(rel: str) -> str:
    """A write event's file with checkpoint tags and temp-file pids replaced: ``checkpoints/<tag>.state.pt``."""
    rel = _TMP.sub(".tmp", _TAG.sub("<tag>", rel))
    if rel.startswith(".") and rel.endswith(".tmp"):  # .last.state.pt.tmp -> last.state.pt
        rel = rel[1:-4]
    if "/." in rel and rel.endswith(".tmp"):
        head, tail = rel.rsplit("/.", 1)
        rel = f"{head}/{tail[:-4]}"
    return rel


class FaultyDisk:
    """Counts every write operation on files under ``root`` and fails them from number ``fail_at`` on.

    Write operations: opening a file for writing (``open``/``os.open``), ``write`` (half the data is written before
    a failure, as on a filling disk), ``os.write``, ``os.ftruncate``, ``os.fsync``, ``os.replace``, ``os.link`` and
    ``os.mkdir``. ``sticky``: every later write fails too (a full disk stays full); otherwise only the one.
    ``only``: fail only events whose :func:`site_of` passes this test (others are counted but succeed); ``ops``:
    fail only these operations.
    """

    def __init__(
        self,
        root: Path,
        fail_at: int | None = None,
        err: int = errno.ENOSPC,
        *,
        sticky: bool = True,
        only: Callable[[str], bool] | None = None,
        ops: tuple[str, ...] | None = None,
    ) -> None:
        self.root = str(Path(root).resolve())
        self.fail_at, self.err, self.sticky, self.only, self.ops = fail_at, err, sticky, only, ops
        self.events: list[tuple[str, str]] = []
        self.failed: list[tuple[str, str]] = []

    def _rel(self, path: Any) -> str | None:
        try:
            p = os.path.abspath(os.fspath(path))
        except TypeError:
            return None
        if p == self.root or p.startswith(self.root + os.sep):
            return os.path.relpath(p, self.root)
        return None

    def _fd_rel(self, fd: int) -> str | None:
        try:
            return self._rel(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            return None

    def hit(self, op: str, rel: str | None) -> None:
        if rel is None:
            return
        n = len(self.events)
        self.events.append((op, rel))
        armed = self.fail_at is not None and (n == self.fail_at or (self.sticky and n > self.fail_at))
        if armed and (self.only is None or self.only(site_of(rel))) and (self.ops is None or op in self.ops):
            self.failed.append((op, rel))
            raise OSError(self.err, os.strerror(self.err), os.path.join(self.root, rel))

    @contextmanager
    def installed(self) -> Iterator[FaultyDisk]:
        if not os.path.isdir("/proc/self/fd"):
            pytest.skip("the fault injector maps file descriptors to paths through /proc/self/fd (Linux)")
        disk = self
        real = {
            n: getattr(os, n) for n in ("fsync", "replace", "link", "mkdir", "open", "write", "ftruncate", "rename")
        }
        real_open = builtins.open

        class _File:
            def __init__(self, f: Any, rel: str) -> None:
                self._f, self._rel = f, rel

            def write(self, data: Any) -> int:
                try:
                    disk.hit("write", self._rel)
                except OSError:
                    self._f.write(data[: len(data) // 2])
                    raise
                return self._f.write(data)

            def __enter__(self) -> _File:
                return self

            def __exit__(self, *exc: Any) -> None:
                self._f.close()

            def __getattr__(self, name: str) -> Any:
                return getattr(self._f, name)

        def fake_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            rel = disk._rel(file) if isinstance(file, (str, bytes, os.PathLike)) else None
            if rel is not None and any(c in mode for c in "wax+"):
                disk.hit("open", rel)
                return _File(real_open(file, mode, *args, **kwargs), rel)
            return real_open(file, mode, *args, **kwargs)

        def fake_os_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                disk.hit("open", disk._rel(path))
            return real["open"](path, flags, *args, **kwargs)

        def by_fd(op: str) -> Callable[..., Any]:
            def fn(fd: int, *args: Any) -> Any:
                disk.hit(op, disk._fd_rel(fd))
                return real[op](fd, *args)

            return fn

        def by_dst(op: str) -> Callable[..., Any]:
            def fn(src: Any, dst: Any, *args: Any, **kwargs: Any) -> Any:
                disk.hit(op, disk._rel(dst))
                return real[op](src, dst, *args, **kwargs)

            return fn

        def fake_mkdir(path: Any, *args: Any, **kwargs: Any) -> None:
            disk.hit("mkdir", disk._rel(path))
            real["mkdir"](path, *args, **kwargs)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(builtins, "open", fake_open)
            mp.setattr(os, "open", fake_os_open)
            for op in ("fsync", "write", "ftruncate"):
                mp.setattr(os, op, by_fd(op))
            for op in ("replace", "link", "rename"):
                mp.setattr(os, op, by_dst(op))
            mp.setattr(os, "mkdir", fake_mkdir)
            yield self
