"""Import layering. The whole contract (front ends over serving over the engine over quant over the model, server
and batch as peers, a torch-free scheduler, an HTTP-free engine and serving layer) lives in ``pyproject.toml``'s
``[tool.importlinter]`` and is checked by import-linter here and in CI; the AST checks below say the kernel rules
in plain Python: ``falconlm.native`` is a leaf (buffers and shapes only) and the model knows nothing of it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import falconlm

ROOT = Path(falconlm.__file__).parent
PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def imported_modules(package: str) -> dict[str, set[str]]:
    """For each module file of ``falconlm.<package>``, the absolute falconlm modules it imports."""
    out: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = ["falconlm", *path.relative_to(ROOT).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        here = parts if path.name == "__init__.py" else parts[:-1]  # the package a relative import starts from
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = here[: len(here) - node.level + 1] if node.level else []
                module = ".".join([*base, node.module] if node.module else base)
                found |= {module} | {f"{module}.{alias.name}" for alias in node.names}
        out[".".join(parts)] = {m for m in found if m.startswith("falconlm")}
    return out


def test_native_is_a_leaf() -> None:
    for module, imports in imported_modules("native").items():
        outside = {m for m in imports if not m.startswith("falconlm.native")}
        assert not outside, f"{module} imports {sorted(outside)}"


def test_the_model_imports_nothing_from_native_quant_or_engine() -> None:
    for module, imports in imported_modules("model").items():
        bad = {m for m in imports if m.startswith(("falconlm.native", "falconlm.quant", "falconlm.engine"))}
        assert not bad, f"{module} imports {sorted(bad)}"


def test_the_import_linter_contracts_hold() -> None:
    # In a child interpreter: import-linter reconfigures logging, which would blind later tests' caplog.
    lint = f"lint_imports({str(PYPROJECT)!r}, no_cache=True)"
    code = f"import sys; from importlinter.cli import lint_imports; sys.exit({lint})"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"lint-imports broke a contract:\n{run.stdout[-4000:]}{run.stderr[-2000:]}"
