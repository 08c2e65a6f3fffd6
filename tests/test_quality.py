"""Static checks on the package: ruff and mypy --strict must stay clean."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is part of the test extra")
def test_ruff_clean() -> None:
    result = run("ruff", "check", "trio_mcp_relay", "tests", "scripts")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_clean() -> None:
    result = run(sys.executable, "-m", "mypy", "--strict", "trio_mcp_relay")
    assert result.returncode == 0, result.stdout + result.stderr
