"""The planner and the config stay pure: importing them pulls in no torch, Ray, MLflow or Hydra."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("module", ["launcher.planner", "launcher.config"])
def test_pure_modules_import_no_side_effect_libraries(module: str) -> None:
    code = (
        f"import sys, {module}; "
        "bad = [m for m in ('torch', 'ray', 'mlflow', 'hydra', 'omegaconf') if m in sys.modules]; "
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_hydra_is_imported_only_by_the_cli() -> None:
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    users = [
        p.relative_to(root).as_posix()
        for d in ("launcher", "recipes")
        for p in (root / d).rglob("*.py")
        if "import hydra" in p.read_text() or "from hydra" in p.read_text()
    ]
    assert users == ["launcher/cli.py"]


def test_no_function_is_longer_than_a_screen() -> None:
    """Every ``def`` in launcher/ and recipes/ fits in 60 lines (a function you read in one sitting)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    long = [
        f"{p.relative_to(root)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for d in ("launcher", "recipes")
        for p in sorted((root / d).rglob("*.py"))
        for node in ast.walk(ast.parse(p.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno is not None
        and node.end_lineno - node.lineno + 1 > 60
    ]
    assert long == []
