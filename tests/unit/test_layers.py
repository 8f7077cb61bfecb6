"""The packages import downwards only: quality and registry are below the engine, so
neither imports `maga_tasks.engine` anywhere (module level, inside a function, or under
`TYPE_CHECKING`); what they share with it (figures, results, outcomes) sits in
`maga_tasks.data`."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.support.paths import REPO

PACKAGE = REPO / "maga_tasks"
BELOW_THE_ENGINE = ("maga_tasks.quality", "maga_tasks.registry")
FORBIDDEN = "maga_tasks.engine"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """Every module `path` imports, wherever the import stands, relative ones resolved."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((node.lineno, module))
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return found


def layer_violations() -> list[str]:
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if not module_name(path).startswith(BELOW_THE_ENGINE):
            continue
        for line, module in imported_modules(path):
            if module == FORBIDDEN or module.startswith(FORBIDDEN + "."):
                violations.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {module}")
    return violations


def test_quality_and_registry_never_import_the_engine():
    assert layer_violations() == []


def test_the_walk_sees_imports_inside_functions_and_type_checking_blocks(tmp_path):
    """The check can fail: an import hidden in a function or a TYPE_CHECKING block is found."""
    sample = tmp_path / "sample.py"
    sample.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from maga_tasks.engine.shard import ShardResult\n"
        "def f():\n    import maga_tasks.engine.publish\n"
        "def g():\n    from maga_tasks import engine\n"
    )
    modules = [module for _, module in imported_modules(sample)]
    assert "maga_tasks.engine.shard" in modules
    assert "maga_tasks.engine.publish" in modules
    assert "maga_tasks.engine" in modules
    assert len(list(PACKAGE.glob("quality/*.py"))) > 1 and len(list(PACKAGE.glob("registry/*.py"))) > 1
