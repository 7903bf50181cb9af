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


def _draw(path: Path, epochs: list[int], series: list[tuple[str, list[Any], str]], ylabel: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    try:
        for label, values, marker in series:
            ax.plot(epochs, values, marker=marker, label=label)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        _save_png(fig, path)
    finally:
        plt.close(fig)


def plot_metrics(rows: Sequence[dict[str, Any]], out_dir: str | Path) -> list[Path]:
    """Write ``loss.png`` (train/val loss) and ``accuracy.png`` (val top-1/top-5) into ``out_dir``.

    Raises:
        WriteError: a plot could not be written (after trying the other one).
    """
    if not rows:
        return []
    out_dir = Path(out_dir)
    epochs = [r["epoch"] + 1 for r in rows]
    loss = [("train", [r.get("train_loss") for r in rows], "o"), ("validation", [r.get("val_loss") for r in rows], "o")]
    acc = [("val top-1", [r.get("val_top1") for r in rows], "o"), ("val top-5", [r.get("val_top5") for r in rows], "o")]
    if any("ema_top1" in r for r in rows):
        acc.append(("EMA top-1", [r.get("ema_top1") for r in rows], "."))
    written, errors = [], []
    for name, series, ylabel in (("loss.png", loss, "loss"), ("accuracy.png", acc, "accuracy (%)")):
        try:
            _draw(out_dir / name, epochs, series, ylabel)
            written.append(out_dir / name)
        except OSError as exc:
            errors.append(exc)
    if errors:
        raise errors[0]
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
