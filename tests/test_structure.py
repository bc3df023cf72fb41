"""The package's layering: every import flows the way the folders' docstrings say, the Lightning internals and
`determined` are each reached from one place, and no module grows past a few hundred lines.

The expected flow is written out here, not read from the code, and the docstrings' `Imports:` lines must agree
with it, so that the rule and its documentation cannot drift apart unnoticed.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dpo_lightning"

# Top-level modules every layer may use; they import nothing else of the package.
FOUNDATION = {
    "errors",
    "hub",
    "builtin",
    "layout",
    "integrity",
    "console",
    "lightning_compat",
    "memory",
    "losses",
    "pair_losses",
}
# Each folder and the layers it may import (the foundation always).
ALLOWED = {
    "config": set(),
    "data": {"config"},
    "models": {"config"},
    "dpo": {"config", "data", "models"},
    "online": {"config", "data", "models", "dpo"},
    "evaluation": {"config", "data", "models", "dpo", "online"},
    "training": {"config", "data", "models", "dpo", "online"},
    "determined": {"config", "data", "models", "dpo", "online", "training"},
}
MAX_LINES = 420  # "about 400"


def _modules(root: Path = PACKAGE) -> list[Path]:
    return sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)


def _layer(path: Path, root: Path) -> str:
    """The folder a module belongs to; "foundation" for a top-level module (the package's __init__ too)."""
    relative = path.relative_to(root)
    return relative.parts[0] if len(relative.parts) > 1 else "foundation"


def _imported_layers(path: Path) -> list[tuple[int, str, str]]:
    """(line, module imported, its layer) of every dpo_lightning import in `path`, function-level ones too."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] != "dpo_lightning" or len(parts) < 2:
                continue  # `from dpo_lightning import __version__` and other packages
            target = parts[1]
            layer = "foundation" if target in FOUNDATION else target if target in ALLOWED else f"unknown {target}"
            found.append((node.lineno, name, layer))
    return found


def _violations(root: Path) -> list[str]:
    """Every import of a module under `root` (a dpo_lightning tree) against the flow."""
    violations = []
    for path in _modules(root):
        layer = _layer(path, root)
        allowed = {"foundation"} | ({layer} | ALLOWED[layer] if layer in ALLOWED else set())
        for line, name, target in _imported_layers(path):
            if target not in allowed:
                violations.append(f"{path.relative_to(root).as_posix()}:{line} ({layer}) imports {name} ({target})")
    return violations


def test_every_folder_and_module_is_known():
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders == set(ALLOWED)
    top = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert top == FOUNDATION


def test_imports_flow_one_way():
    violations = _violations(PACKAGE)
    assert not violations, "\n".join(violations)


def test_the_import_check_catches_imports_against_the_flow(tmp_path):
    """The check has teeth: an upward import, even inside a function, and a foundation module importing a
    layer are reported; a downward import is not."""
    root = tmp_path / "dpo_lightning"
    for folder in ("data", "dpo"):
        (root / folder).mkdir(parents=True)
    (root / "data" / "bad.py").write_text("def f():\n    from dpo_lightning.training.run import train\n")
    (root / "dpo" / "fine.py").write_text(
        "from dpo_lightning.data.batch import PairBatch\nimport dpo_lightning.errors\n"
    )
    (root / "hub.py").write_text("from dpo_lightning.config import DPOConfig\n")
    assert _violations(root) == [
        "data/bad.py:2 (data) imports dpo_lightning.training.run (training)",
        "hub.py:1 (foundation) imports dpo_lightning.config (config)",
    ]


@pytest.mark.parametrize("folder", sorted(ALLOWED))
def test_folder_docstrings_state_the_flow(folder):
    init = PACKAGE / folder / "__init__.py"
    docstring = ast.get_docstring(ast.parse(init.read_text()))
    assert docstring, f"{folder}/__init__.py has no docstring"
    match = re.search(r"^Imports: (.+)$", docstring, re.MULTILINE)
    assert match, f"{folder}/__init__.py does not say what it may import (an `Imports:` line)"
    stated = {name.strip() for name in match.group(1).split(",")}
    assert stated == {"foundation"} | ALLOWED[folder]


def test_determined_is_imported_in_one_module_only():
    importers = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any(name == "determined" or name.startswith("determined.") for name in names):
                importers.append(path.relative_to(PACKAGE).as_posix())
    assert set(importers) == {"determined/bridge.py"}


def test_lightning_internals_are_reached_from_one_module():
    """Lightning's private attributes (`_name`) and loop internals appear only in lightning_compat.py."""
    internal = re.compile(r"\.(_checkpoint_connector|_trainer|_results|fit_loop|epoch_loop|batch_progress|val_loop)\b")
    found = []
    for path in _modules():
        if path.name == "lightning_compat.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if internal.search(line):
                found.append(f"{path.relative_to(PACKAGE).as_posix()}:{number}: {line.strip()}")
    assert not found, "\n".join(found)


def test_no_module_is_much_over_400_lines():
    long = {
        p.relative_to(PACKAGE).as_posix(): n for p in _modules() if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long


def test_the_pair_layout_has_one_owner():
    """Only data/batch.py splits per-row results into chosen and rejected halves."""
    found = []
    for path in _modules():
        if path.relative_to(PACKAGE).as_posix() == "data/batch.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if ".chunk(2" in line or ".repeat(2)" in line:
                found.append(f"{path.relative_to(PACKAGE).as_posix()}:{number}")
    assert not found


def test_no_docstring_cites_a_design_document_the_repository_lacks():
    found = [p.relative_to(PACKAGE).as_posix() for p in _modules() if "DESIGN.md" in p.read_text()]
    assert not found


def test_the_tests_write_into_temporary_caches_not_the_users():
    import os
    import tempfile

    from dpo_lightning.hub import cache_root

    for path in (cache_root(), Path(os.environ["HF_HOME"]), Path(os.environ["HF_DATASETS_CACHE"])):
        assert str(path).startswith(tempfile.gettempdir()), path
        assert not str(path).startswith(str(Path.home() / ".cache")), path
