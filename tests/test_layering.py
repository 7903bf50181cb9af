"""Imports point one way: ops -> layers -> models -> {analysis, train, bench} -> tools -> {cli, integrations}
(style.md rule 1).

The checker resolves every import form to the acmix module it loads: ``import acmix``, ``import acmix.pkg[.mod]``,
``from acmix[.pkg] import X``, and relative imports at any depth (``from . import X``, ``from .. import X``,
``from ..pkg import X``, ``from ...pkg.mod import X``). ``from P import X`` also loads ``P.X`` when X is a module.
The root package and the top-level modules (``acmix.types``, ``acmix.version``...) sit as high as the highest
subpackage they import, so ``from acmix import X`` in ``acmix.ops`` is upward (the root imports ``acmix.models``).
Imports through ``importlib`` are not seen.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

ORDER = {
    "ops": 0, "layers": 1, "models": 2, "analysis": 3, "train": 3, "bench": 3, "tools": 4, "cli": 5, "integrations": 5,
}  # fmt: skip
SRC = Path(__file__).resolve().parents[1] / "src" / "acmix"


def imported(source: str, rel: tuple[str, ...]) -> list[tuple[str, ...]]:
    """The acmix modules a file imports, as parts below ``acmix`` (``()`` is the root package).

    ``from P import X`` gives ``P.X``: only its first part decides the layer, and a first part that is no module
    (``from acmix import ACmix``) stands for the root package.

    Args:
        source: the file's text.
        rel: the file's path below ``src/acmix`` as parts, e.g. ``("ops", "_backends", "tiled.py")``.
    """
    package = list(rel[:-1])
    out: list[tuple[str, ...]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "acmix":
                    out.append(tuple(parts[1:]))
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: level 1 is the file's own package, each further dot one package up
                if node.level - 1 > len(package):
                    raise ValueError(f"{'/'.join(rel)}: relative import beyond the acmix package")
                base = package[: len(package) - (node.level - 1)]
                parts = base + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == "acmix":
                parts = node.module.split(".")[1:]
            else:
                continue
            out += [tuple(parts) if alias.name == "*" else (*parts, alias.name) for alias in node.names]
    return out


class Layers:
    """Levels of the acmix modules below one source root (the real tree, or a copy in a test)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._top: dict[str, int] = {}

    def level(self, target: tuple[str, ...]) -> int:
        """The layer of an imported module: ORDER of its subpackage; for the root package and the top-level
        modules, the highest layer they import themselves (-1 for a leaf such as ``acmix.types``)."""
        head = target[0] if target else ""
        if head in ORDER:
            return ORDER[head]
        if head and (self.root / head).is_dir():
            raise AssertionError(f"acmix.{head} is a subpackage without a place in ORDER")
        module = head if head and (self.root / f"{head}.py").is_file() else ""  # "": the root package
        if module not in self._top:
            self._top[module] = -1  # a cycle back to a module in progress adds nothing
            rel = (f"{module}.py",) if module else ("__init__.py",)
            targets = [t for t in imported((self.root / rel[0]).read_text(), rel) if t[:1] != (module,)]
            self._top[module] = max((self.level(t) for t in targets), default=-1)
        return self._top[module]

    def violations(self, source: str, rel: tuple[str, ...]) -> list[str]:
        """Imports of ``source`` (a file at ``rel`` below the root) that point to the same or a higher layer."""
        own = rel[0]
        if own not in ORDER:
            return []
        bad = []
        for target in imported(source, rel):
            if target[:1] == (own,):
                continue
            if self.level(target) >= ORDER[own]:
                bad.append(f"{'/'.join(rel)} imports acmix{''.join('.' + p for p in target)}")
        return bad

    def scan(self) -> list[str]:
        bad = []
        for path in sorted(self.root.rglob("*.py")):
            bad += self.violations(path.read_text(), path.relative_to(self.root).parts)
        return bad


def test_imports_point_one_way():
    assert not Layers(SRC).scan()


UPWARD = [
    (("ops", "x.py"), "from ..models import create_model"),
    (("ops", "x.py"), "from .. import models"),
    (("ops", "x.py"), "from .. import ACmix"),
    (("ops", "x.py"), "from .. import layers as L"),
    (("layers", "x.py"), "from acmix import models"),
    (("layers", "x.py"), "from acmix import create_model"),
    (("ops", "x.py"), "import acmix"),
    (("ops", "x.py"), "import acmix.models"),
    (("ops", "x.py"), "import acmix.layers.acmix as a"),
    (("ops", "_backends", "x.py"), "from ...layers import ACmix"),
    (("ops", "_backends", "x.py"), "from ... import bench"),
    (("ops", "_backends", "x.py"), "from ...models._registry import list_models"),
    (("bench", "x.py"), "from acmix.cli.main import main"),
    (("bench", "x.py"), "from ..train import TrainConfig"),  # same layer, another package
    (("models", "x.py"), "def f():\n    from ..analysis import walk\n    return walk"),  # inside a function
    (("models", "x.py"), "from .. import version, cli"),
]

ALLOWED = [
    (("layers", "x.py"), "from ..ops import use_backend"),
    (("ops", "x.py"), "from . import _checks"),
    (("ops", "_backends", "x.py"), "from ... import ops"),
    (("ops", "_backends", "x.py"), "from ...ops._indexing import reflect_index"),
    (("ops", "x.py"), "import acmix.types"),
    (("ops", "x.py"), "from .. import types, version"),
    (("ops", "x.py"), "from acmix.version import __version__"),
    (("bench", "x.py"), "from ..models import create_model"),
    (("cli", "x.py"), "import acmix"),
    (("cli", "x.py"), "from .. import ACmix"),
]


@pytest.mark.parametrize(("rel", "source"), UPWARD, ids=[s.splitlines()[-1].strip() for _, s in UPWARD])
def test_a_planted_upward_import_of_every_form_is_seen(rel, source):
    assert Layers(SRC).violations(source, rel), f"{'/'.join(rel)}: {source!r} was not seen"


@pytest.mark.parametrize(("rel", "source"), ALLOWED, ids=[s for _, s in ALLOWED])
def test_downward_and_same_package_imports_pass(rel, source):
    assert not Layers(SRC).violations(source, rel)


def test_a_file_planted_in_a_copy_of_the_tree_fails_the_scan(tmp_path):
    root = tmp_path / "acmix"
    shutil.copytree(SRC, root, ignore=shutil.ignore_patterns("__pycache__"))
    assert not Layers(root).scan()
    (root / "ops" / "_backends" / "planted.py").write_text("from ... import create_model\n")
    (root / "types.py").write_text((root / "types.py").read_text() + "from .models import list_models\n")
    bad = Layers(root).scan()
    assert "ops/_backends/planted.py imports acmix.create_model" in bad
    # types.py now imports acmix.models, so ops and layers, which import acmix.types, import upward through it
    assert "ops/conv_path.py imports acmix.types.CONV_IMPLS" in bad, bad
