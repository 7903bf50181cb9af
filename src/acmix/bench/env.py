"""What a benchmark row must record about where it ran, and the device-neutral timing/memory primitives.

* :func:`environment`: device, device model, torch/acmix/Python versions, threads, platform.
* :func:`synchronize`: wait for queued device work before reading a clock.
* :func:`num_threads`: set torch's CPU threads for a block.
* :class:`PeakMemory`: peak memory above a starting level, ``torch.cuda.max_memory_allocated`` on CUDA, Linux
  ``VmHWM`` (after resetting it through ``/proc/self/clear_refs``) on CPU. RSS only tells the truth in a process
  that has not already freed and kept pages from earlier work, so CPU callers measure in a fresh subprocess.
"""

from __future__ import annotations

import contextlib
import platform
import sys
from collections.abc import Iterator
from typing import Any

import torch

from ..version import __version__

MIB = 1024.0 * 1024.0


def device_name(device: torch.device | str) -> str:
    """GPU model, or the CPU model from ``/proc/cpuinfo`` (``platform.processor()`` elsewhere)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    if dev.type == "cpu":
        try:
            with open("/proc/cpuinfo") as fh:
                for line in fh:
                    if line.startswith("model name"):
                        return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return platform.processor() or platform.machine()
    return dev.type


def environment(device: torch.device | str) -> dict[str, Any]:
    """The fields every benchmark row carries about its machine and software."""
    dev = torch.device(device)
    return {
        "device": dev.type,
        "device_name": device_name(dev),
        "torch": torch.__version__,
        "acmix": __version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu_count": _cpu_count(),
        "platform": sys.platform,
    }


def _cpu_count() -> int:
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def synchronize(device: torch.device) -> None:
    """Wait for queued work on ``device``; nothing to do on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def num_threads(threads: int | None) -> Iterator[None]:
    """``torch.set_num_threads(threads)`` inside the block (``None``: leave as is), restored afterwards."""
    old = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak memory above the level at :meth:`start`; ``method`` names how (``none`` where unsupported)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.method = "none"
        self._base = 0

    def start(self) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            self.method = "cuda_max_allocated"
            return
        self.method = "none"
        if self.device.type == "cpu":
            try:
                with open("/proc/self/clear_refs", "w") as fh:
                    fh.write("5")  # reset VmHWM to the current RSS
            except OSError:
                return
            rss = _status_kib("VmRSS")
            if rss is not None and _status_kib("VmHWM") is not None:
                self._base = rss * 1024
                self.method = "rss_hwm"

    def peak_mib(self) -> float | None:
        if self.method == "cuda_max_allocated":
            synchronize(self.device)
            return (torch.cuda.max_memory_allocated(self.device) - self._base) / MIB
        if self.method == "rss_hwm":
            hwm = _status_kib("VmHWM")
            return None if hwm is None else max(0.0, (hwm * 1024 - self._base) / MIB)
        return None


def run_json_child(entry: str, payload: str, timeout: float) -> tuple[dict[str, Any] | None, str]:
    """Run ``entry`` (``"module:function"``, a function returning an exit code) in a fresh interpreter.

    ``payload`` goes to its stdin; its last stdout line is parsed as JSON. Returns ``(result, "")`` or
    ``(None, reason)`` when the child timed out or failed (the reason names the exit code and stderr's last line).
    """
    import json
    import os
    import subprocess

    module, func = entry.split(":")
    code = f"import sys; from {module} import {func}; sys.exit({func}())"
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code],
            input=payload,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )
    except subprocess.TimeoutExpired:
        return None, f"subprocess timed out after {timeout:.0f} s"
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return None, f"subprocess failed (exit {proc.returncode}): {tail}"
    return json.loads(proc.stdout.strip().splitlines()[-1]), ""
