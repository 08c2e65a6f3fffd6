"""Static checks: ruff and mypy --strict stay clean, and every async test has a time guard."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent
#: Guards that bound an async test's run: a hang becomes a failure with a traceback.
GUARDS = frozenset({"fail_after", "fail_at", "move_on_after"})


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_ruff_clean() -> None:
    # Run as a module of this interpreter: missing ruff is a failure, not a skip.
    result = run(sys.executable, "-m", "ruff", "check", "trio_mcp_relay", "tests", "scripts")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_clean() -> None:
    result = run(sys.executable, "-m", "mypy", "--strict", "trio_mcp_relay")
    assert result.returncode == 0, result.stdout + result.stderr


def _guarded(function: ast.AST) -> bool:
    """Whether the body opens with (or is wrapped in) a ``with trio.fail_after(...)``."""
    for statement in getattr(function, "body", []):
        if isinstance(statement, ast.With | ast.AsyncWith):
            for item in statement.items:
                call = item.context_expr
                if isinstance(call, ast.Call):
                    name = call.func.attr if isinstance(call.func, ast.Attribute) else None
                    if name in GUARDS:
                        return True
    return False


def test_every_async_test_runs_under_a_time_guard() -> None:
    unguarded = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in tree.body:
            is_test = isinstance(node, ast.AsyncFunctionDef) and node.name.startswith("test_")
            if is_test and not _guarded(node):
                unguarded.append(f"{path.name}::{node.name}")
    assert not unguarded, "async tests without trio.fail_after: " + ", ".join(unguarded)
