"""PNG plots for a run folder (loss and accuracy per epoch) and of ACmix alpha/beta by depth (matplotlib, Agg).

Each PNG is rendered in memory and written atomically (:func:`acmix.train.checkpoint.atomic_write_bytes`): a reader
never sees half a file, and a failed write (full disk) raises :class:`~acmix.train.checkpoint.WriteError` and leaves
the previous plot in place.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_logger = logging.getLogger(__name__)

__all__ = ["plot_alpha_beta", "plot_metrics", "read_metrics"]


class _Figures:
    """``subplots``/``close`` on plain :class:`matplotlib.figure.Figure` objects: no pyplot global state, no GUI
    backend, nothing kept alive between plots (a run plots every epoch for days)."""

    @staticmethod
    def subplots(figsize: tuple[float, float]) -> tuple[Any, Any]:
        from matplotlib.figure import Figure

        fig = Figure(figsize=figsize)
        return fig, fig.add_subplot(1, 1, 1)

    @staticmethod
    def close(fig: Any) -> None:
        fig.clear()


def _pyplot() -> _Figures:
    return _Figures()


def _save_png(fig: Any, path: Path) -> None:
    import io

    from .checkpoint import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic_write_bytes(path, buf.getvalue())


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The JSON-lines metrics file of a run, one dict per epoch (a line that is not a JSON object is skipped)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            _logger.warning("%s: skipping a line that is not JSON: %.60s", path, line)
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def plot_metrics(rows: Sequence[dict[str, Any]], out_dir: str | Path) -> list[Path]:
    """Write ``loss.png`` (train/val loss) and ``accuracy.png`` (val top-1/top-5) into ``out_dir``."""
    if not rows:
        return []
    plt = _pyplot()
    out_dir = Path(out_dir)
    epochs = [r["epoch"] + 1 for r in rows]
    written = []
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(epochs, [r.get("train_loss") for r in rows], marker="o", label="train")
    ax.plot(epochs, [r.get("val_loss") for r in rows], marker="o", label="validation")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    written.append(out_dir / "loss.png")
    try:
        _save_png(fig, written[-1])
    finally:
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(epochs, [r.get("val_top1") for r in rows], marker="o", label="val top-1")
    ax.plot(epochs, [r.get("val_top5") for r in rows], marker="o", label="val top-5")
    if any("ema_top1" in r for r in rows):
        ax.plot(epochs, [r.get("ema_top1") for r in rows], marker=".", label="EMA top-1")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy (%)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    written.append(out_dir / "accuracy.png")
    try:
        _save_png(fig, written[-1])
    finally:
        plt.close(fig)
    return written


def plot_alpha_beta(rows: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Plot alpha (attention) and beta (convolution) of each ACmix layer against its depth index."""
    plt = _pyplot()
    depth = list(range(len(rows)))
    fig, ax = plt.subplots(figsize=(max(5, 0.35 * len(rows) + 2), 3.5))
    ax.plot(depth, [r["alpha"] for r in rows], marker="o", label="alpha (attention)")
    ax.plot(depth, [r["beta"] for r in rows], marker="s", label="beta (convolution)")
    ax.set_xlabel("ACmix layer (depth order)")
    ax.set_ylabel("value")
    ax.set_xticks(depth)
    if len(rows) <= 20:
        ax.set_xticklabels([r["layer"] for r in rows], rotation=60, ha="right", fontsize=7)
    ax.axhline(0, color="grey", lw=0.5)
    ax.legend()
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    try:
        _save_png(fig, path)
    finally:
        plt.close(fig)
    return path
