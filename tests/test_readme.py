"""The README's Python tour runs as written and its shape comments hold (the README stays true to the API)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def tour_block() -> str:
    """The first ```python block of the README's "A short tour" section."""
    text = README.read_text(encoding="utf-8")
    section = text.split("## A short tour", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README: no python block under '## A short tour'"
    return match.group(1)


def test_readme_tour_runs_and_its_shapes_hold(capsys):
    namespace: dict[str, object] = {}
    exec(compile(tour_block(), str(README), "exec"), namespace)  # the block's own assert_close runs here too
    logits, y = namespace["logits"], namespace["y"]
    assert isinstance(logits, torch.Tensor) and tuple(logits.shape) == (1, 10)
    assert isinstance(y, torch.Tensor) and tuple(y.shape) == (2, 128, 28, 28)
    printed = capsys.readouterr().out
    assert "reference" in printed  # available_backends() lists the always-runnable specification
