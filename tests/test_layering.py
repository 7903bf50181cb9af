"""Imports point one way: ops -> layers -> models -> {analysis, train, bench} -> tools -> {cli, integrations}
(style.md rule 1)."""

from __future__ import annotations

import ast
from pathlib import Path

ORDER = {
    "ops": 0, "layers": 1, "models": 2, "analysis": 3, "train": 3, "bench": 3, "tools": 4, "cli": 5, "integrations": 5,
}  # fmt: skip
SRC = Path(__file__).resolve().parents[1] / "src" / "acmix"


def _imported_subpackages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    rel = path.relative_to(SRC).parts
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's package
                base = list(rel[:-1])[: len(rel) - node.level]
                parts = base + (node.module.split(".") if node.module else [])
            elif node.module and node.module.startswith("acmix."):
                parts = node.module.split(".")[1:]
            else:
                continue
            if parts:
                found.add(parts[0])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("acmix."):
                    found.add(alias.name.split(".")[1])
    return found


def test_imports_point_one_way():
    bad = []
    for path in SRC.rglob("*.py"):
        own = path.relative_to(SRC).parts[0]
        if own not in ORDER:
            continue
        for target in _imported_subpackages(path):
            if target in ORDER and target != own and ORDER[target] >= ORDER[own]:
                bad.append(f"{path.relative_to(SRC)} imports acmix.{target}")
    assert not bad, bad
