"""Reporting shared by the op and model benchmarks: text tables, ratios, and atomic CSV / JSON / PNG writers.

Every writer goes through :func:`atomic_write`: the parent directory is created if needed, the content is written to
a unique hidden temporary file beside the target and moved over it with ``os.replace``, so a reader never sees a
half-written file and an interrupted run leaves the previous file intact (the temporary file is removed on error).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["atomic_write", "columns", "fmt", "ratio", "save_figure", "write_csv", "write_json"]


def fmt(value: float | None, spec: str, suffix: str = "") -> str:
    """``format(value, spec)`` plus ``suffix``, or ``"-"`` for a value that was not measured."""
    return "-" if value is None else format(value, spec) + suffix


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``, or ``None`` when a side is missing or ``b`` is not positive."""
    return None if a is None or b is None or b <= 0 else a / b


def columns(head: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    """A fixed-width text table: the header, a rule of dashes, one line per row (trailing blanks stripped)."""
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip() for line in (head, *body)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then move it over ``path``; returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_csv(rows: Sequence[Any], path: str | Path, fieldnames: Sequence[str]) -> Path:
    """Write dataclass rows as CSV, one column per field in ``fieldnames`` order, atomically."""

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(fieldnames))
            writer.writeheader()
            for row in rows:
                writer.writerow(dataclasses.asdict(row))

    return atomic_write(path, write)


def write_json(doc: Mapping[str, Any], path: str | Path) -> Path:
    """Write ``doc`` as indented JSON with a final newline, atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(doc, indent=2) + "\n"))


def save_figure(fig: Any, path: str | Path, dpi: int = 110) -> Path:
    """Save a matplotlib figure as PNG, atomically, and close it."""
    import matplotlib.pyplot as plt

    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))
    finally:
        plt.close(fig)
