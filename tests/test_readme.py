"""The README's promises: its embedding example runs, its first commands stay true."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()


def test_embedding_example_runs() -> None:
    match = re.search(
        r"<!-- embedding-example -->\n```python\n(.*?)```\n<!-- /embedding-example -->",
        README,
        re.S,
    )
    assert match, "README lost its embedding example"
    result = subprocess.run(
        [sys.executable, "-c", match.group(1)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    printed = re.search(
        r"<!-- /embedding-example -->\n\nIt prints:\n\n```text\n(.*?)```", README, re.S
    )
    assert printed, "README no longer says what its embedding example prints"
    assert result.stdout.strip().splitlines() == printed.group(1).strip().splitlines()
    # The middleware saw the initialize the relay answered itself and the call it routed.
    assert "audit: kitchen initialize -> relay" in result.stdout


def test_readme_starts_with_the_two_commands_ci_runs() -> None:
    first_block = README.split("```sh\n", 1)[1].split("```", 1)[0].splitlines()
    assert first_block[0].startswith("pip install . && trio-mcp-relay serve")
    test_command = first_block[1].split("#")[0].strip()
    ci = (ROOT / ".ci" / "run").read_text()
    install, run = (part.strip() for part in test_command.split("&&"))
    assert install.replace("pip install", "python -m pip install") in ci.replace(
        "--quiet --disable-pip-version-check ", ""
    )
    assert ci.rstrip().endswith(run)


def test_testing_example_runs_against_an_embedded_relay(tmp_path: Path) -> None:
    match = re.search(
        r"<!-- testing-example -->\n```python\n(.*?)```\n<!-- /testing-example -->", README, re.S
    )
    assert match, "README lost its trio_mcp_relay.testing example"
    (tmp_path / "test_example.py").write_text(match.group(1))
    # As a user runs it: not as a worker of this run's pytest-xdist.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-W", "error", "-p", "no:cacheprovider", "."],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout
