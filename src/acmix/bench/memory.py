"""Peak memory measured in a fresh Python interpreter, and the memory modes shared by the op and model benchmarks.

Resident-set size only tells the truth in a process that has not already freed and kept pages from earlier work,
so on a CPU both benchmarks measure each row's peak in a child interpreter (``rss_hwm_subprocess``); on CUDA the
in-process ``torch.cuda.max_memory_allocated`` is exact (see :class:`acmix.bench.env.PeakMemory`).
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict

import torch

from ..models import create_model
from .config import BenchConfig
from .env import run_json_child
from .runner import prepare_with_oom_halving
from .switch import set_host_attention

__all__ = ["MEMORY_MODES", "check_memory_mode", "measure_memory_subprocess", "subprocess_method"]

#: ``auto``: a fresh subprocess per row on CPU, in-process on CUDA; ``subprocess``; ``inprocess``; ``off``
MEMORY_MODES = ("auto", "subprocess", "inprocess", "off")


def check_memory_mode(memory: str) -> None:
    """Raise ``ValueError`` naming the valid modes unless ``memory`` is one of :data:`MEMORY_MODES`."""
    if memory not in MEMORY_MODES:
        raise ValueError(f"unknown memory mode {memory!r}; valid: {', '.join(MEMORY_MODES)}")


def subprocess_method(method: str) -> str:
    """The ``mem_method`` of a peak measured in a child: ``rss_hwm`` there is ``rss_hwm_subprocess`` here."""
    return "rss_hwm_subprocess" if method == "rss_hwm" else method


def measure_memory_subprocess(
    model_name: str, mode: str, config: BenchConfig, *, timeout: float = 900.0
) -> tuple[float | None, str]:
    """Peak memory of ``warmup`` steps of a registered model, measured in a fresh Python interpreter.

    Returns ``(peak MiB or None, method)``; the method is ``rss_hwm_subprocess`` on a Linux CPU,
    ``cuda_max_allocated`` on CUDA. A failing child (killed for memory, for instance) gives ``(None, reason)``.
    """
    spec = {"model": model_name, "mode": mode, "config": asdict(config)}
    out, reason = run_json_child("acmix.bench.memory:_memory_child", json.dumps(spec), timeout)
    if out is None:
        return None, reason
    return out["peak_mib"], out["method"]


def _memory_child() -> int:
    """Entry point of :func:`measure_memory_subprocess`'s child: reads a JSON spec on stdin, prints JSON."""
    spec = json.loads(sys.stdin.read())
    config = BenchConfig(**spec["config"])
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    module = create_model(spec["model"], num_classes=config.num_classes, in_chans=config.in_chans)
    set_host_attention(module, config.backend)
    warm = prepare_with_oom_halving(module, spec["mode"], config, measure_memory=True)
    method = subprocess_method(warm.mem_method)
    sys.stdout.write(json.dumps({"peak_mib": warm.peak_mib, "method": method, "batch": warm.case.config.batch}) + "\n")
    return 0
