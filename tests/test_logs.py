"""Logs: the reference's [logging] section, rotation, the JSON format, the access log, and no
secret in any line.

The end-to-end test starts a real ``trio-mcp-relay serve`` with the reference's INI file
(``[logging]`` included, a tiny ``max_file_size`` so that it rotates during the run), drives
tools, callers, refused tokens and health checks through it, and then greps every log file,
current and rotated, for the key and every token, raw and URL-quoted.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import trio
import trio_websocket

from tests.helpers import KEY, http_get, peer, recv, request, result, send, tool_peer
from trio_mcp_relay._auth import (
    Endpoint,
    TokenRole,
    encrypt_token,
    endpoint_url,
    redact,
    scoped_token,
)
from trio_mcp_relay._config import ConfigError, RelayConfig, load_config
from trio_mcp_relay._logs import (
    JsonFormatter,
    SecretFilter,
    configured_logging,
    parse_size,
    scrub,
)

OTHER_KEY = "fedcba9876543210fedcba9876543210"


# --- max_file_size as the reference parses it -----------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("10MB", 10 * 1024 * 1024),
        ("10mb", 10 * 1024 * 1024),
        ("1.5MB", int(1.5 * 1024 * 1024)),
        ("512KB", 512 * 1024),
        ("2kb", 2048),
        ("100B", 100),
        ("4096", 4096),
        ("1GB", 1024**3),
        (" 10 MB ", 10 * 1024 * 1024),
    ],
)
def test_sizes_are_read_as_the_reference_reads_them(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "MB", "ten MB", "1.5B", "10 TB"])
def test_a_size_that_is_not_one_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="is not a size"):
        parse_size(text)


# --- [logging] in the config ----------------------------------------------------------------


def test_the_reference_logging_section_is_read(tmp_path: Path) -> None:
    path = tmp_path / "relay.cfg"
    path.write_text(
        f"[server]\nkey = {KEY}\n\n[logging]\nlog_file = logs/mcp_server.log\n"
        "max_file_size = 10MB\nbackup_count = 5\n"
    )
    config = load_config(flags={}, environ={}, config_file=path, data_dir=None)
    assert (config.log_file, config.max_file_size, config.backup_count) == (
        "logs/mcp_server.log",
        10 * 1024 * 1024,
        5,
    )
    assert config.log_format == "text"


def test_logging_defaults_are_the_reference_s_except_the_file() -> None:
    config = RelayConfig()
    assert (config.max_file_size, config.backup_count) == (10 * 1024 * 1024, 5)
    assert config.log_file == ""  # no file unless one is configured


def test_flags_beat_environment_beat_the_logging_section(tmp_path: Path) -> None:
    path = tmp_path / "relay.cfg"
    path.write_text(
        f"[server]\nkey = {KEY}\n[logging]\nlog_file = a.log\nmax_file_size = 1KB\n"
        "backup_count = 1\nlog_format = text\n"
    )
    environ = {"LOG_FILE": "b.log", "LOG_MAX_FILE_SIZE": "2KB", "LOG_FORMAT": "JSON"}
    config = load_config(
        flags={"backup_count": 3}, environ=environ, config_file=path, data_dir=None
    )
    assert (config.log_file, config.max_file_size, config.backup_count) == ("b.log", 2048, 3)
    assert config.log_format == "json"


@pytest.mark.parametrize(
    ("section", "flags", "environ", "expected"),
    [
        ("max_file_size = lots", {}, {}, "[logging] max_file_size in {path}: 'lots' is not a"),
        ("backup_count = -1", {}, {}, "[logging] backup_count in {path}: -1 is not zero or"),
        ("backup_count = five", {}, {}, "[logging] backup_count in {path}: 'five' is not an"),
        ("log_format = xml", {}, {}, "[logging] log_format in {path}: 'xml' is not one of"),
        ("", {"max_file_size": "1XB"}, {}, "--max-file-size: '1XB' is not a size"),
        ("", {}, {"LOG_FORMAT": "yaml"}, "LOG_FORMAT (environment): 'yaml' is not one of"),
    ],
)
def test_a_bad_logging_setting_is_named(
    tmp_path: Path, section: str, flags: dict[str, Any], environ: dict[str, str], expected: str
) -> None:
    path = tmp_path / "relay.cfg"
    path.write_text(f"[server]\nkey = {KEY}\n[logging]\n{section}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(flags=flags, environ=environ, config_file=path, data_dir=None)
    assert expected.format(path=path) in str(caught.value)


# --- Scrubbing ------------------------------------------------------------------------------


def secrets_of_a_run() -> list[str]:
    """A key and tokens of both schemes, good and bad."""
    return [
        KEY,
        encrypt_token(KEY, "agent-1"),
        encrypt_token(OTHER_KEY, "agent-1"),
        scoped_token(KEY, "agent-1", TokenRole.TOOL),
        scoped_token(OTHER_KEY, "agent-1", TokenRole.CALLER),
    ]


def spellings(secret: str) -> set[str]:
    return {secret, quote(secret, safe=""), quote(secret)}


@pytest.mark.parametrize(
    "secret",
    secrets_of_a_run(),
    ids=["key", "reference", "reference-other-key", "scoped", "scoped-other-key"],
)
@pytest.mark.parametrize(
    "template",
    [
        "GET /mcp_endpoint/mcp/?token={} HTTP/1.1",
        "dialing ws://relay:8004/mcp_endpoint/call/?server_id=x&token={}",
        "health /mcp_endpoint/health?key={}",
        "bad token {} from 10.0.0.1",
        "'{}'",
    ],
    ids=["request-line", "url", "health", "bare", "quoted"],
)
def test_scrub_hides_keys_and_tokens_raw_or_quoted(secret: str, template: str) -> None:
    for spelling in spellings(secret):
        text = scrub(template.format(spelling), [KEY])
        for hidden in spellings(secret):
            assert hidden not in text
        assert "…" in text


def test_scrub_leaves_ordinary_text_and_is_stable() -> None:
    plain = "127.0.0.1:5000 tool agent=single_module server=calculator close=1000 frames_in=3"
    assert scrub(plain, [KEY]) == plain
    path = "/usr/lib/python3.11/site-packages/trio/_core/_run.py line 1000"
    assert scrub(path) == path
    once = scrub(f"url ?token={encrypt_token(KEY, 'a')}&key={KEY}", [KEY])
    assert scrub(once, [KEY]) == once  # a second handler's pass shows no less


def test_the_filter_scrubs_message_exception_and_extras() -> None:
    token = encrypt_token(KEY, "agent")
    try:
        raise ValueError(f"cannot open ws://h/mcp_endpoint/mcp/?token={quote(token, safe='')}")
    except ValueError:
        exc_info = sys.exc_info()
    record = logging.LogRecord("lib", logging.ERROR, __file__, 1, "key %s", (KEY,), exc_info)
    record.url = f"ws://h/?token={token}"
    assert SecretFilter([KEY]).filter(record)
    shown = logging.Formatter().format(record) + json.dumps(record.url)
    for secret in (KEY, token, quote(token, safe="")):
        assert secret not in shown
    assert redact(KEY) in shown


def test_json_lines_carry_time_level_logger_message_and_extras() -> None:
    record = logging.LogRecord(
        "trio_mcp_relay.access", logging.INFO, __file__, 1, "hi %s", ("x",), None
    )
    record.agent = "a1"
    record.frames_in = 3
    line = JsonFormatter().format(record)
    assert "\n" not in line
    out = json.loads(line)
    assert out["level"] == "INFO" and out["logger"] == "trio_mcp_relay.access"
    assert out["message"] == "hi x" and out["agent"] == "a1" and out["frames_in"] == 3
    assert out["time"].endswith("Z")


def test_configured_logging_rotates_and_keeps_backup_count_files(tmp_path: Path) -> None:
    log_file = tmp_path / "logs" / "relay.log"  # the directory does not exist yet
    log = logging.getLogger("trio_mcp_relay.test")
    token = encrypt_token(KEY, "agent")
    with configured_logging(
        level="INFO", log_file=str(log_file), max_file_size=500, backup_count=2
    ):
        for n in range(60):
            log.info("line %d of a run with ?token=%s", n, token)
    log.info("after the block: not in the file")
    names = sorted(p.name for p in log_file.parent.iterdir())
    assert names == ["relay.log", "relay.log.1", "relay.log.2"]
    for path in log_file.parent.iterdir():
        text = path.read_text()
        assert path.stat().st_size <= 500
        assert token not in text and "token=" in text
    assert "line 59 " in log_file.read_text()
    assert "after the block" not in log_file.read_text()


def test_backup_count_zero_keeps_the_file_bounded_and_alone(tmp_path: Path) -> None:
    log_file = tmp_path / "relay.log"
    with configured_logging(
        level="INFO", log_file=str(log_file), max_file_size=300, backup_count=0
    ):
        for n in range(50):
            logging.getLogger("t").info("line %d %s", n, "x" * 40)
    assert [p.name for p in tmp_path.iterdir()] == ["relay.log"]
    assert log_file.stat().st_size <= 300


# --- End to end: the relay's own log file ---------------------------------------------------

REFERENCE_INI = """\
[server]
host = 127.0.0.1
port = 0
debug = false
log_level = {level}
key = {key}

[websocket]
max_connections = 1000
ping_interval = 30
ping_timeout = 10
close_timeout = 10

[security]
allowed_origins = *
enable_cors = true

[logging]
log_file = logs/mcp_server.log
max_file_size = {size}
backup_count = {backups}
log_format = {log_format}
"""

MAX_FILE_SIZE = 2048
BACKUP_COUNT = 3


async def scripted_run(port: int) -> list[str]:
    """Tools, callers, refused tokens and health checks; returns every secret it used."""
    base = f"ws://127.0.0.1:{port}"
    used = [KEY, OTHER_KEY]
    for n in range(6):
        agent = f"agent-{n}"
        tool_token = (
            scoped_token(KEY, agent, TokenRole.TOOL) if n % 2 else encrypt_token(KEY, agent)
        )
        caller_token = (
            scoped_token(KEY, agent, TokenRole.CALLER) if n % 2 else encrypt_token(KEY, agent)
        )
        used += [tool_token, caller_token]
        # Half the tools name themselves by server_id, the others by serverInfo.
        tool_url = endpoint_url(base, Endpoint.TOOL, tool_token)
        tool_url += f"&server_id=srv{n}" if n % 2 else ""
        async with (
            tool_peer(tool_url, name="calculator", tools=["add"]) as tool,
            peer(endpoint_url(base, Endpoint.CALLER, caller_token)) as caller,
        ):
            await send(caller, request(1, "tools/list"))
            await recv(caller)
            await send(caller, request(2, "tools/call", {"name": "add", "arguments": {}}))
            forwarded = await recv(tool)
            await send(tool, result(forwarded["id"], {"content": []}))
            assert (await recv(caller))["id"] == 2
        # Refused: a token of another key (both schemes), and garbage.
        for wrong in (
            encrypt_token(OTHER_KEY, agent),
            scoped_token(OTHER_KEY, agent, TokenRole.CALLER),
            f"not-a-token-{n}",
        ):
            used.append(wrong)
            async with peer(endpoint_url(base, Endpoint.CALLER, wrong)) as refused:
                with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                    await refused.get_message()
                assert closed.value.reason.code == 1008
        # A token pasted where it does not belong (as the server_id): the relay logs the
        # server's identity, and the last line of defence must catch it.
        misplaced = encrypt_token(OTHER_KEY, f"pasted-{n}")
        used.append(misplaced)
        url = endpoint_url(base, Endpoint.TOOL, tool_token) + "&server_id=" + quote(misplaced)
        async with tool_peer(url, name="calculator", tools=["add"]):
            pass
        ok = await http_get(port, f"/mcp_endpoint/health?key={quote(KEY, safe='')}")
        assert ok.status == 200
        bad = await http_get(port, f"/mcp_endpoint/health?key={OTHER_KEY}")
        assert bad.status in (403, 429)
    return used


def start_serve(tmp_path: Path, log_format: str, level: str) -> tuple[subprocess.Popen[str], int]:
    config = tmp_path / "data" / ".mcp-endpoint-server.cfg"
    config.parent.mkdir()
    config.write_text(
        REFERENCE_INI.format(
            key=KEY,
            size=f"{MAX_FILE_SIZE}B",
            backups=BACKUP_COUNT,
            log_format=log_format,
            level=level,
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOG_")}
    for name in ("HOST", "PORT", "SERVER_KEY", "DATA_DIR", "ADMIN_KEY"):
        env.pop(name, None)
    # The reference INI alone, plus what a test needs: refused tokens answered at once.
    command = [sys.executable, "-m", "trio_mcp_relay", "serve", "--auth-delay", "0"]
    command += ["--auth-failures", "0"]
    relay = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert relay.stdout is not None
    first = relay.stdout.readline()
    assert first.startswith("trio-mcp-relay listening on 127.0.0.1:"), first
    for _ in range(4):
        relay.stdout.readline()  # the URLs
    return relay, int(first.rsplit(":", 1)[1])


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_the_relay_writes_rotates_and_keeps_secrets_out_of_its_log_file(
    tmp_path: Path, log_format: str
) -> None:
    relay, port = start_serve(tmp_path, log_format, "DEBUG")
    try:

        async def main() -> list[str]:
            with trio.fail_after(60):
                return await scripted_run(port)

        used = trio.run(main)
    finally:
        relay.send_signal(signal.SIGTERM)
        _, stderr = relay.communicate(timeout=15)
    assert relay.returncode == 0, stderr

    logs = tmp_path / "logs"
    files = sorted(logs.iterdir())
    names = {path.name for path in files}
    # Rotation happened, and no more backups than backup_count are kept.
    assert names == {"mcp_server.log"} | {f"mcp_server.log.{n}" for n in range(1, BACKUP_COUNT + 1)}
    lines: list[str] = []
    for path in files:
        assert path.stat().st_size <= MAX_FILE_SIZE
        lines += path.read_text(encoding="utf-8").splitlines()
    # No line of any file, nor of stderr, holds the key or a token, raw or URL-quoted.
    for line in lines + stderr.splitlines():
        for secret in used:
            for spelling in spellings(secret):
                assert spelling not in line, (spelling, line)

    if log_format == "json":
        records = [json.loads(line) for line in lines]
        assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
        access = [r for r in records if r["logger"] == "trio_mcp_relay.access"]
        assert access, "the access log's lines are in the file"
        tools = [r for r in access if r["role"] == "tool"]
        servers = {r["server"] for r in tools}
        assert "calculator" in servers and "srv5" in servers  # the last run's, not rotated out
        shortened = {server for server in servers if server.endswith("…")}
        assert shortened, "the pasted token is shown shortened in the structured field too"
        assert servers - shortened <= {"calculator", "srv1", "srv3", "srv5"}
        assert all(r["frames_in"] >= 1 and r["frames_out"] >= 1 for r in tools)
        assert all(r["remote"].startswith("127.0.0.1:") for r in access)
        assert all(r["duration"] >= 0 and r["close_code"] is not None for r in access)
    else:
        access = [line for line in lines if " trio_mcp_relay.access: " in line]
        assert access
        assert any(
            " caller agent=agent-" in line and " close=1000 by=client " in line for line in access
        )
