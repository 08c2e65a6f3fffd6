"""The ``trio-mcp-relay`` command line, with the server replaced by fakes."""

from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import parse_qs, urlsplit

import attrs
import pytest
import trio
import trio.testing
from typer.testing import CliRunner

from trio_mcp_relay import _cli
from trio_mcp_relay._auth import (
    Endpoint,
    TokenAuthenticator,
    TokenRole,
    routing_hint,
    xiaozhi_safe,
)
from trio_mcp_relay._cli import app, banner, run_with_banner
from trio_mcp_relay._config import CONFIG_FILE_NAME, RelayConfig

KEY = "0123456789abcdef0123456789abcdef"
ENV_NAMES = (
    "HOST",
    "PORT",
    "SERVER_KEY",
    "LOG_LEVEL",
    "ENABLE_CORS",
    "ALLOWED_ORIGINS",
    "DATA_DIR",
    "LOG_FILE",
    "LOG_MAX_FILE_SIZE",
    "LOG_BACKUP_COUNT",
    "LOG_FORMAT",
)

runner = CliRunner()


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI reads os.environ: keep the developer's HOST or PORT out of the tests."""
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)


# --- Help -----------------------------------------------------------------------------------


def test_help() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "serve" in result.stdout
    assert "Xiaozhi MCP endpoint" in result.stdout


def test_no_arguments_shows_help() -> None:
    result = runner.invoke(app, [])
    assert "Usage" in result.output
    assert "serve" in result.output


def test_serve_help_documents_every_option() -> None:
    result = runner.invoke(app, ["serve", "--help"])
    assert result.exit_code == 0
    text = " ".join(result.stdout.split())
    env_only = {"enable_cors", "allowed_origins"}
    derived = {"previous_keys"}  # the keys after the first --key
    file_only = {"tool_filters"}  # the config file's [tools] sections
    options = ["--config"] + [
        "--" + field.name.replace("_", "-")
        for field in attrs.fields(RelayConfig)
        if field.name not in env_only | derived | file_only
    ]
    for option in options:
        assert option in text
    env_names = ("HOST", "PORT", "SERVER_KEY", "DATA_DIR", "LOG_LEVEL", "ADMIN_KEY")
    for env_name in (*env_names, "REFERENCE_TOKENS", "TRUSTED_PROXIES"):
        assert f"Env: {env_name}." in text
    assert "[server]" in text  # brackets survive help formatting
    assert text.count("Default:") == len(options)


# --- Configuration errors -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["--port", "70000"], {}, "error: --port: 70000 is not a port number"),
        (["--log-level", "loud"], {}, "error: --log-level: 'LOUD' is not one of"),
        (["--forward-timeout", "0"], {}, "error: --forward-timeout: 0.0 is not a positive"),
        ([], {"PORT": "abc"}, "error: PORT (environment): 'abc' is not an integer"),
        ([], {"ENABLE_CORS": "perhaps"}, "error: ENABLE_CORS (environment): 'perhaps'"),
        (["--key", ""], {}, "error: --key: must not be empty"),
    ],
)
def test_config_error_exits_2_naming_the_setting(
    tmp_path: Path, args: list[str], env: dict[str, str], expected: str
) -> None:
    result = runner.invoke(app, ["serve", "--data-dir", str(tmp_path), *args], env=env)
    assert result.exit_code == 2
    assert expected in result.stderr
    assert result.stdout == ""
    assert list(tmp_path.iterdir()) == []


def test_config_file_error_names_option_and_file(tmp_path: Path) -> None:
    cfg = tmp_path / CONFIG_FILE_NAME
    cfg.write_text("[server]\nport = eighty\n", encoding="utf-8")
    result = runner.invoke(app, ["serve", "--data-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert f"error: [server] port in {cfg}: 'eighty' is not an integer" in result.stderr


def test_a_log_file_that_cannot_be_created_exits_2(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    args = ["serve", "--data-dir", str(tmp_path), "--key", KEY, "--port", "0"]
    result = runner.invoke(app, [*args, "--log-file", str(blocker / "relay.log")])
    assert result.exit_code == 2
    assert f"error: log file {blocker / 'relay.log'}: " in result.stderr


def test_missing_explicit_config_file_exits_2(tmp_path: Path) -> None:
    missing = tmp_path / "missing.cfg"
    result = runner.invoke(app, ["serve", "--config", str(missing)])
    assert result.exit_code == 2
    assert "--config" in result.stderr
    assert str(missing) in result.stderr


def test_malformed_flag_type_is_a_usage_error() -> None:
    result = runner.invoke(app, ["serve", "--port", "abc"])
    assert result.exit_code == 2
    assert "--port" in result.stderr


# --- Serving, with a fake server ------------------------------------------------------------


def config(**overrides: object) -> RelayConfig:
    values: dict[str, object] = {"host": "0.0.0.0", "port": 0, "key": KEY}
    values.update(overrides)
    return RelayConfig(**values)  # type: ignore[arg-type]


def without_tokens(lines: list[str]) -> list[str]:
    """Banner lines with their tokens blanked: scoped tokens differ at every start."""
    return [re.sub(r"token=[^&\s]+", "token=T", line) for line in lines]


def test_banner_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_cli, "local_ip", lambda: "192.0.2.10")
    lines = banner(config(), 8123)
    assert lines[0] == "trio-mcp-relay listening on 0.0.0.0:8123"
    assert lines[1] == f"health:  http://192.0.2.10:8123/mcp_endpoint/health?key={KEY}"
    check = TokenAuthenticator((KEY,), accept_reference=False)
    for line, label, path, role in (
        (lines[2], "tool:    ", "/mcp_endpoint/mcp/", TokenRole.TOOL),
        (lines[3], "caller:  ", "/mcp_endpoint/call/", TokenRole.CALLER),
        (lines[4], "xiaozhi: ", "/mcp_endpoint/mcp/", TokenRole.CALLER),
        (lines[5], "mcp:     ", "/mcp_endpoint/call/", TokenRole.CALLER),
    ):
        assert line.startswith(label)
        url = urlsplit(line.removeprefix(label))
        scheme = "http" if label.startswith("mcp") else "ws"
        assert (url.scheme, url.netloc, url.path) == (scheme, "192.0.2.10:8123", path)
        token = parse_qs(url.query)["token"][0]
        endpoint = Endpoint.TOOL if role is TokenRole.TOOL else Endpoint.CALLER
        grant = check(token, endpoint)
        assert (grant.agent, grant.role, grant.expires) == ("single_module", role, None)
        assert xiaozhi_safe(url.query)
    # xiaozhi-server's own test of an endpoint URL, and the caller URL it derives from it.
    xiaozhi_url = lines[4].removeprefix("xiaozhi: ")
    assert xiaozhi_url.startswith("ws") and "/mcp/" in xiaozhi_url
    assert "key" not in xiaozhi_url.lower() and "call" not in xiaozhi_url.lower()
    assert urlsplit(xiaozhi_url.replace("/mcp/", "/call/")).path == "/mcp_endpoint/call/"
    assert len(lines) == 6


def test_a_cluster_banner_gives_every_url_the_agents_routing_hint(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_cli, "local_ip", lambda: "192.0.2.10")
    alone = banner(config(), 8123)
    assert not any("route=" in line for line in alone)
    lines = banner(attrs.evolve(config(), cluster="redis://127.0.0.1:6379/0"), 8123)
    hints = {parse_qs(urlsplit(line.split(maxsplit=1)[1]).query)["route"][0] for line in lines[2:]}
    assert hints == {routing_hint("single_module")}
    # Same hint whatever the role of the token, and xiaozhi's /call/ keeps it.
    xiaozhi_url = lines[4].removeprefix("xiaozhi: ").replace("/mcp/", "/call/")
    assert parse_qs(urlsplit(xiaozhi_url).query)["route"] == [routing_hint("single_module")]
    assert routing_hint("single_module") != routing_hint("another")
    assert "single_module" not in lines[2]


@pytest.mark.parametrize(
    ("host", "url_host"), [("127.0.0.1", "127.0.0.1"), ("::1", "[::1]"), ("::", "192.0.2.10")]
)
def test_banner_urls_use_a_specific_bind_address(
    monkeypatch: pytest.MonkeyPatch, host: str, url_host: str
) -> None:
    monkeypatch.setattr(_cli, "local_ip", lambda: "192.0.2.10")
    assert f"http://{url_host}:1/mcp_endpoint/health" in banner(config(host=host), 1)[1]


async def fake_serve_relay(
    config: RelayConfig,
    *,
    shutdown: trio.Event | None = None,
    embedded_tools: Any = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    task_status.started(4321)
    await trio.sleep_forever()


async def test_run_with_banner_prints_once_listening(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_cli, "local_ip", lambda: "192.0.2.10")
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_with_banner, config(), fake_serve_relay)
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
    out = capsys.readouterr().out.splitlines()
    assert without_tokens(out) == without_tokens(banner(config(), 4321))


def test_serve_prints_banner_and_exits_0_on_keyboard_interrupt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[RelayConfig] = []

    async def interrupted(
        config: RelayConfig,
        *,
        shutdown: trio.Event | None = None,
        embedded_tools: Any = None,
        handle: Any = None,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> NoReturn:
        seen.append(config)
        task_status.started(4321)
        raise KeyboardInterrupt

    monkeypatch.setattr(_cli, "_load_server", lambda: interrupted)
    args = ["serve", "--data-dir", str(tmp_path), "--port", "0", "--key", KEY, "--host", "::1"]
    result = runner.invoke(app, [*args, "--max-message-size", "2048", "--log-level", "debug"])
    assert result.exit_code == 0, result.output
    assert without_tokens(result.stdout.splitlines()) == without_tokens(banner(seen[0], 4321))
    assert seen[0].max_message_size == 2048
    assert seen[0].log_level == "DEBUG"
    assert result.stderr == ""


def test_serve_reports_a_port_in_use(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def port_taken(
        config: RelayConfig,
        *,
        shutdown: trio.Event | None = None,
        embedded_tools: Any = None,
        handle: Any = None,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> NoReturn:
        raise OSError(errno.EADDRINUSE, "Address already in use")

    monkeypatch.setattr(_cli, "_load_server", lambda: port_taken)
    result = runner.invoke(
        app, ["serve", "--data-dir", str(tmp_path), "--port", "8004", "--host", "127.0.0.1"]
    )
    assert result.exit_code == 1
    assert "error: cannot serve on 127.0.0.1:8004: Address already in use" in result.stderr
    assert result.stdout == ""


def bare_serve(directory: Path, **env: str) -> subprocess.Popen[str]:
    """``trio-mcp-relay serve`` with no arguments, in ``directory``, as a real process: only
    the environment moves it off the default port (PORT=0, HOST=127.0.0.1), so that a test
    can run beside anything else; ``env`` adds to that environment."""
    environment = {**os.environ, "PORT": "0", "HOST": "127.0.0.1", **env}
    for name in ("SERVER_KEY", "DATA_DIR", "ADMIN_KEY", "LOG_LEVEL"):
        environment.pop(name, None)
    command = [sys.executable, "-m", "trio_mcp_relay", "serve"]
    return subprocess.Popen(
        command,
        cwd=directory,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_serve_with_no_arguments_on_a_fresh_directory(tmp_path: Path) -> None:
    """`trio-mcp-relay serve` alone: generates and saves a key, prints the URLs, and they work.

    Only the environment moves it off the default port (PORT=0, HOST=127.0.0.1) so that the
    test can run beside anything else; the command line has no arguments at all.
    """
    import json
    import urllib.request

    with bare_serve(tmp_path) as relay:
        try:
            assert relay.stdout is not None
            lines = [relay.stdout.readline().strip() for _ in range(5)]
            assert lines[0].startswith("trio-mcp-relay listening on 127.0.0.1:")
            assert lines[1].startswith("health:  http://127.0.0.1:")
            assert lines[2].startswith("tool:    ws://127.0.0.1:")
            assert lines[3].startswith("caller:  ws://127.0.0.1:")
            assert lines[4].startswith("xiaozhi: ws://127.0.0.1:")
            saved = (tmp_path / "data" / CONFIG_FILE_NAME).read_text()
            key = parse_qs(urlsplit(lines[1].split()[-1]).query)["key"][0]
            assert f"key = {key}" in saved
            token = parse_qs(urlsplit(lines[2].split()[-1]).query)["token"][0]
            assert TokenAuthenticator(key)(token, Endpoint.TOOL).agent == "single_module"
            with urllib.request.urlopen(lines[1].split()[-1], timeout=5) as response:
                assert json.load(response)["result"]["status"] == "success"
        finally:
            relay.send_signal(signal.SIGTERM)
            assert relay.wait(timeout=15) == 0


def test_serve_does_not_import_hypothesis(tmp_path: Path) -> None:
    """Importing Hypothesis makes Trio's scheduler deterministic (it sorts and shuffles every
    batch of runnable tasks) and costs 0.4 s and megabytes: ``serve`` must not import it, nor
    trio.testing, however it is started; only ``fuzz`` and the public strategies need them."""
    import urllib.request

    with bare_serve(tmp_path, PYTHONPROFILEIMPORTTIME="1") as relay:
        try:
            assert relay.stdout is not None
            health = [relay.stdout.readline().strip() for _ in range(2)][1].split()[-1]
            with urllib.request.urlopen(health, timeout=5) as response:
                assert response.status == 200
        finally:
            relay.send_signal(signal.SIGTERM)
            _, stderr = relay.communicate(timeout=15)
    imported = {
        line.split("|")[-1].strip()
        for line in stderr.splitlines()
        if line.startswith("import time:")
    }
    assert "trio_mcp_relay.server.serve" in imported  # the import log is there
    assert not {name for name in imported if name.split(".")[0] == "hypothesis"}
    assert "trio.testing" not in imported


def test_version_prints_the_package_version() -> None:
    from trio_mcp_relay import __version__

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout == f"trio-mcp-relay {__version__}\n"


KITCHEN = '''
from trio_mcp_relay.plugins import Plugin, tool


class Kitchen(Plugin):
    @tool
    def boil(self, minutes: int) -> str:
        """Boil water."""
        return f"boiled for {minutes} min"
'''


def test_serve_tools_imports_plugins_from_the_current_directory_or_app_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As a console script sees it: the plugin's directory is not on sys.path by itself."""
    from trio_mcp_relay._cli import _embedded_tools

    plugin_dir = tmp_path / "plugins"
    plugin_dir.mkdir()
    (plugin_dir / "kitchen_tools.py").write_text(KITCHEN)
    cwd = str(Path.cwd())
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", cwd)])
    monkeypatch.delitem(sys.modules, "kitchen_tools", raising=False)
    monkeypatch.chdir(plugin_dir)
    assert set(_embedded_tools(["a=kitchen_tools:Kitchen"], Path("."))) == {"a"}
    monkeypatch.delitem(sys.modules, "kitchen_tools")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(plugin_dir)])
    monkeypatch.chdir(tmp_path)
    assert set(_embedded_tools(["b=kitchen_tools:Kitchen"], plugin_dir)) == {"b"}
