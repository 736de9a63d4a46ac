"""Server and batch are peers over the HTTP-free serving layer: neither imports the other, and serving imports
neither (only the CLI composes them)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import falconlm

from ..test_layering import imported_modules


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("server", ("falconlm.batch", "falconlm.cli")),
        ("batch", ("falconlm.server", "falconlm.cli")),
        ("serving", ("falconlm.server", "falconlm.batch", "falconlm.cli")),
    ],
)
def test_package_does_not_import(package: str, forbidden: tuple[str, ...]) -> None:
    modules = imported_modules(package)
    assert modules, f"no modules found in falconlm.{package}"
    for module, imports in modules.items():
        bad = {m for m in imports if m.startswith(forbidden)}
        assert not bad, f"{module} imports {sorted(bad)}"


def test_serving_layer_has_no_http() -> None:
    """The serving layer returns pydantic objects and raises APIError; only ``falconlm.server`` speaks HTTP."""
    root = Path(falconlm.__file__).parent / "serving"
    for path in sorted(root.glob("*.py")):
        tree = ast.parse(path.read_text())
        names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        names |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        http = {n for n in names if n.split(".")[0] in {"fastapi", "starlette", "uvicorn"}}
        assert not http, f"{path.name} imports {sorted(http)}"
