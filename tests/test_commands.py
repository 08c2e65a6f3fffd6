"""The client-side commands, run for real: token, url, call, check, fuzz."""

from __future__ import annotations

import gc
import hashlib
import http.server
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote

import pytest
from typer.testing import CliRunner

from tests.helpers import KEY, RunningRelay, relay_in_thread
from trio_mcp_relay._auth import (
    AuthError,
    Endpoint,
    TokenAuthenticator,
    caller_url,
    decrypt_agent_id,
    xiaozhi_safe,
)
from trio_mcp_relay._cli import app
from trio_mcp_relay._transport import ConnectionClosed, WebSocket
from trio_mcp_relay.core.session import Session
from trio_mcp_relay.testing import FAMILIES

runner = CliRunner()
OLD = "fedcba9876543210fedcba9876543210"


async def calculator(ws: WebSocket) -> None:
    """A minimal MCP tool: initialize, tools/list (two pages), tools/call add/fail."""
    tools = [
        {
            "name": "add",
            "description": "Add two numbers.\nMore.",
            "inputSchema": {
                "type": "object",
                "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
            },
        },
        {"name": "fail", "description": "Always fails.", "inputSchema": {"type": "object"}},
    ]
    try:
        while True:
            frame = json.loads(await ws.receive())
            if "id" not in frame:
                continue
            method, params = frame["method"], frame.get("params") or {}
            result: Any
            if method == "initialize":
                result = {
                    "protocolVersion": params["protocolVersion"],
                    "capabilities": {"tools": {}},
                    "serverInfo": {"name": "calc", "version": "1"},
                }
            elif method == "tools/list":
                result = (
                    {"tools": tools[1:]}
                    if params.get("cursor")
                    else {"tools": tools[:1], "nextCursor": "page2"}
                )
            elif method == "tools/call" and params["name"] == "add":
                total = params["arguments"]["a"] + params["arguments"]["b"]
                result = {"content": [{"type": "text", "text": str(total)}], "isError": False}
            elif method == "tools/call":
                result = {"content": [{"type": "text", "text": "it failed"}], "isError": True}
            else:
                error = {"code": -32601, "message": "Method not found"}
                await ws.send_many(
                    [json.dumps({"jsonrpc": "2.0", "id": frame["id"], "error": error}).encode()]
                )
                continue
            await ws.send_many(
                [json.dumps({"jsonrpc": "2.0", "id": frame["id"], "result": result}).encode()]
            )
    except ConnectionClosed:
        return


@pytest.fixture
def relay() -> Iterator[RunningRelay]:
    with relay_in_thread(embedded_tools={"calc": calculator}) as running:
        yield running


def test_token_decrypts_to_the_agent_and_md5_form() -> None:
    result = runner.invoke(app, ["token", "agent-7", "--key", KEY])
    assert result.exit_code == 0, result.output
    assert decrypt_agent_id(KEY, result.stdout.strip()) == "agent-7"
    hashed = runner.invoke(app, ["token", "agent-7", "--key", KEY, "--md5", "--quoted"])
    expected = hashlib.md5(b"agent-7").hexdigest()
    assert decrypt_agent_id(KEY, unquote(hashed.stdout.strip())) == expected


def test_token_without_any_key_says_how_to_give_one(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SERVER_KEY", raising=False)
    result = runner.invoke(app, ["token", "a", "--data-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "--key" in result.stderr and "SERVER_KEY" in result.stderr


def test_url_prints_both_urls_for_the_agent() -> None:
    result = runner.invoke(
        app, ["url", "a1", "--key", KEY, "--host", "relay.example", "--port", "443", "--secure"]
    )
    assert result.exit_code == 0, result.output
    tool, caller, mcp = result.stdout.splitlines()
    assert tool.startswith("tool:    wss://relay.example:443/mcp_endpoint/mcp/?token=")
    assert caller.startswith("caller:  wss://relay.example:443/mcp_endpoint/call/?token=")
    assert mcp == caller.replace("caller:  wss://", "mcp:     https://")
    assert decrypt_agent_id(KEY, unquote(tool.split("token=")[1])) == "a1"


def scoped_check(key: str = KEY, now: float | None = None) -> TokenAuthenticator:
    return TokenAuthenticator((key,), accept_reference=False, clock=lambda: now or time.time())


@pytest.mark.parametrize("role", ["tool", "caller", "both"])
def test_token_with_a_role_is_scoped_to_it(role: str) -> None:
    result = runner.invoke(app, ["token", "agent-7", "--role", role, "--key", KEY])
    assert result.exit_code == 0, result.output
    token = result.stdout.strip()
    assert token.startswith("st1.") and xiaozhi_safe(token)
    grant = scoped_check()(token, Endpoint.CALLER if role == "caller" else Endpoint.TOOL)
    assert (grant.agent, grant.role.label, grant.expires, grant.server_id) == (
        "agent-7",
        role,
        None,
        None,
    )


def test_token_expires_and_server_id() -> None:
    before = time.time()
    args = ["token", "a", "--role", "tool", "--expires", "3600", "--server-id", "kitchen"]
    result = runner.invoke(app, [*args, "--key", f"{KEY},{OLD}"])  # the first key signs
    assert result.exit_code == 0, result.output
    grant = scoped_check()(result.stdout.strip(), Endpoint.TOOL)
    assert grant.server_id == "kitchen"
    assert grant.expires is not None and before + 3600 <= grant.expires <= time.time() + 3601
    late = scoped_check(now=grant.expires)
    with pytest.raises(AuthError, match="expired"):
        late(result.stdout.strip(), Endpoint.TOOL)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--role", "admin"], "--role: 'admin' is not a role"),
        (["--role", "tool", "--expires", "0"], "--expires: 0 is not a positive"),
        (["--expires", "60"], "--expires and --server-id need --role"),
        (["--server-id", "s"], "--expires and --server-id need --role"),
    ],
)
def test_token_and_url_usage_errors(args: list[str], message: str) -> None:
    for command in ("token", "url"):
        result = runner.invoke(app, [command, "a", *args, "--key", KEY])
        assert result.exit_code == 2, (command, result.output)
        assert message in result.stderr


@pytest.mark.parametrize(
    ("role", "labels"),
    [
        ("tool", ["tool"]),
        ("caller", ["caller", "xiaozhi", "mcp"]),
        ("both", ["tool", "caller", "mcp"]),
    ],
)
def test_url_with_a_role(role: str, labels: list[str]) -> None:
    result = runner.invoke(
        app, ["url", "a1", "--role", role, "--key", KEY, "--host", "relay.example", "--secure"]
    )
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == labels
    for line in lines:
        label, url = line.split(maxsplit=1)
        path = "/mcp_endpoint/call/" if label in ("caller:", "mcp:") else "/mcp_endpoint/mcp/"
        scheme = "https" if label == "mcp:" else "wss"
        assert url.startswith(f"{scheme}://relay.example:8004{path}?token=st1.")
        token = url.split("token=")[1]
        assert xiaozhi_safe(token)
        endpoint = Endpoint.CALLER if role == "caller" else Endpoint.TOOL
        assert scoped_check()(token, endpoint).agent == "a1"
    if role == "caller":  # what xiaozhi-server derives from its URL opens the caller side
        xiaozhi = lines[1].split()[1]
        assert xiaozhi.replace("/mcp/", "/call/") == lines[0].split()[1]


def test_reference_urls_never_spell_key_or_call() -> None:
    for number in range(15):  # the library is checked on 10,000 ids (test_scoped.py)
        result = runner.invoke(app, ["url", f"agent-{number}", "--key", KEY, "--host", "h"])
        for line in result.stdout.splitlines():
            assert xiaozhi_safe(line.split("token=")[1]), line


def test_call_tools_lists_every_page_as_a_table(relay: RunningRelay) -> None:
    result = runner.invoke(app, ["call", relay.caller_url("calc"), "tools"])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "add   (a, b)  Add two numbers.",
        "fail  ()  Always fails.",
    ]


def test_call_a_tool_prints_its_result(relay: RunningRelay) -> None:
    result = runner.invoke(
        app, ["call", relay.caller_url("calc"), "call", "add", "--args", '{"a": 2, "b": 40}']
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "42"
    failed = runner.invoke(app, ["call", relay.caller_url("calc"), "call", "fail"])
    assert failed.exit_code == 1 and "it failed" in failed.stdout


def test_call_request_prints_raw_result_and_errors(relay: RunningRelay) -> None:
    # The relay answers tools/list itself, in one page: it followed the tool's nextCursor.
    result = runner.invoke(app, ["call", relay.caller_url("calc"), "request", "tools/list"])
    assert result.exit_code == 0, result.output
    listed = json.loads(result.stdout)
    assert [tool["name"] for tool in listed["tools"]] == ["add", "fail"]
    assert "nextCursor" not in listed
    missing = runner.invoke(app, ["call", relay.caller_url("calc"), "request", "nope"])
    assert missing.exit_code == 1 and "-32601" in missing.stderr
    no_tool = runner.invoke(app, ["call", relay.caller_url("nobody"), "tools"])
    assert no_tool.exit_code == 1 and "-32001" in no_tool.stderr


def test_call_rejects_bad_arguments(relay: RunningRelay) -> None:
    bad = runner.invoke(app, ["call", relay.caller_url("calc"), "call", "add", "--args", "[1]"])
    assert bad.exit_code == 2 and "JSON object" in bad.stderr
    not_ws = runner.invoke(app, ["call", "http://x", "tools"])
    assert not_ws.exit_code == 2 and "ws://" in not_ws.stderr


def test_check_passes_against_our_relay(relay: RunningRelay) -> None:
    result = runner.invoke(app, ["check", "--port", str(relay.port), "--key", KEY])
    assert result.exit_code == 0, result.output
    assert "10 passed, 0 failed" in result.stdout
    assert "FAIL" not in result.stdout
    assert "connected; the endpoint initialized it as an MCP server" in result.stdout
    assert re.search(r"PASS  servers a caller sees +.*1 tool: check", result.stdout), result.stdout


def test_check_reports_a_wrong_key_with_hints(relay: RunningRelay) -> None:
    result = runner.invoke(app, ["check", "--port", str(relay.port), "--key", "f" * 32])
    assert result.exit_code == 1
    assert "FAIL  health with the key" in result.stdout
    assert "hint: wrong key" in result.stdout
    assert "hint: the token was refused" in result.stdout


class _PlainHttp(http.server.BaseHTTPRequestHandler):
    """A 'proxy' that answers every request with 200 and never upgrades to WebSocket."""

    def do_GET(self) -> None:
        body = b'{"jsonrpc":"2.0","result":{"status":"running","message":"success"}}'
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


# trio-websocket 0.12 leaks the client socket when a handshake is rejected (the stream is
# never closed); collect it inside this test so the warning is attributed, and ignored, here.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_check_blames_a_proxy_that_does_not_forward_upgrades() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _PlainHttp)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        result = runner.invoke(
            app, ["check", "--port", str(server.server_address[1]), "--key", KEY, "--timeout", "3"]
        )
    finally:
        server.shutdown()
        server.server_close()
    assert result.exit_code == 1
    gc.collect()
    assert "FAIL  tool connection" in result.stdout
    assert "proxy in front must forward it" in result.stdout
    assert "PASS  HTTP status endpoint" in result.stdout
    assert "FAIL  bad token refused" in result.stdout  # a 404 is no token check


def test_check_given_the_printed_health_url_passes_every_check(relay: RunningRelay) -> None:
    health = f"http://127.0.0.1:{relay.port}/mcp_endpoint/health?key={KEY}"
    result = runner.invoke(app, ["check", health])
    assert result.exit_code == 0, result.output
    assert "10 passed, 0 failed" in result.stdout.splitlines()[-1]


def test_check_given_a_tool_url_says_so_and_still_checks(
    relay: RunningRelay, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    monkeypatch.delenv("SERVER_KEY", raising=False)
    monkeypatch.chdir(tmp_path)
    with_key = runner.invoke(app, ["check", relay.tool_url("calc"), "--key", KEY])
    assert with_key.exit_code == 0, with_key.output
    assert with_key.stdout.startswith("note: given a tool URL (/mcp_endpoint/mcp/); checking")
    assert "10 passed, 0 failed" in with_key.stdout
    cases = (
        ("calc", "answered for the agent's tool", "7 passed, 0 failed, 3 skipped"),
        ("nobody", "forwarded", "8 passed, 0 failed, 2 skipped"),
    )
    for agent, trip, total in cases:
        result = runner.invoke(app, ["check", relay.tool_url(agent)])
        assert result.exit_code == 0, result.output
        assert "with this URL's token" in result.stdout.splitlines()[0]
        assert "SKIP  health with the key" in result.stdout
        assert re.search(rf"PASS  forwarded round trip +.*{trip}", result.stdout), result.stdout
        assert result.stdout.splitlines()[-1] == total


def test_call_takes_options_anywhere_and_a_tool_url(relay: RunningRelay) -> None:
    url = relay.caller_url("calc")
    listed = runner.invoke(app, ["call", url, "tools", "--timeout", "5"])
    assert listed.exit_code == 0, listed.output
    added = runner.invoke(
        app, ["call", "--timeout", "5", url, "call", "--args", '{"a": 2, "b": 3}', "add"]
    )
    assert added.exit_code == 0, added.output
    assert added.stdout.strip() == "5"
    via_tool_url = runner.invoke(app, ["call", relay.tool_url("calc"), "tools"])
    assert via_tool_url.exit_code == 0, via_tool_url.output
    assert "note: that is a tool URL" in via_tool_url.stderr
    assert via_tool_url.stdout.startswith("add ")
    health = f"{relay.http}/mcp_endpoint/health?key={KEY}"
    minted = runner.invoke(app, ["call", health, "tools", "--agent", "calc"])
    assert minted.exit_code == 0, minted.output


def test_fuzz_passes_against_our_relay(relay: RunningRelay) -> None:
    health = f"{relay.http}/mcp_endpoint/health?key={KEY}"
    # A generous grace costs nothing while every frame arrives, and keeps a loaded machine
    # from turning a late frame into a false finding.
    result = runner.invoke(app, ["fuzz", health, "--examples", "30", "--seed", "1", "--grace", "2"])
    assert result.exit_code == 0, result.output
    assert "30 scripts: every invariant held (10 families). Repeat with --seed 1." in result.stdout
    table = result.stdout.split("invariant family  result\n", 1)[1].splitlines()[:10]
    assert [line.split() for line in table] == [[name, "pass"] for name in FAMILIES]


def test_fuzz_finds_a_planted_bug_and_prints_the_minimal_script(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    original = Session._response_from_server

    def drops_integer_ids(self: Session, server: Any, frame: Any, now: float) -> Any:
        actions = original(self, server, frame, now)
        return [a for a in actions if not re.search(rb'"id":-?\d+,', a.data)]

    monkeypatch.setattr(Session, "_response_from_server", drops_integer_ids)
    with relay_in_thread() as relay:
        result = runner.invoke(
            app,
            ["fuzz", "--url", relay.base, "--key", KEY, "--examples", "30", "--grace", "0.1"],
        )
    assert result.exit_code == 1, result.output
    out = result.stdout
    assert "FINDING 1 [answers]: every well-formed request is answered exactly once" in out
    assert "caller 0 never got an answer to request #0 with id 0\n" in out
    script = out.split("Minimal script (1 caller, each connected and answered once):\n")[1]
    assert script.startswith("  caller 0 sends a request (tools/call) with id 0\nFrames exchanged:")
    assert re.search(r"^answers +FAIL  \(finding 1\)$", out, re.M)
    assert "Traceback" not in result.output


def test_fuzz_skips_a_known_defect_and_checks_only_what_is_asked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(Session, "_notification_from_server", lambda self, server, frame: [])
    with relay_in_thread() as relay:
        base = ["fuzz", relay.base, "--key", KEY, "--examples", "20", "--grace", "1"]
        skipped = runner.invoke(app, [*base, "--skip", "notifications", "--skip", "progress"])
        only = runner.invoke(app, [*base, "--only", "notifications,answers"])
    assert skipped.exit_code == 0, skipped.output
    assert re.search(r"^notifications +skipped \(--skip\)$", skipped.stdout, re.M)
    assert only.exit_code == 1, only.output
    assert "FINDING 1 [notifications]" in only.stdout
    assert re.search(r"^ids +skipped \(--only\)$", only.stdout, re.M)
    assert re.search(r"^answers +pass$", only.stdout, re.M)


def test_fuzz_refuses_an_unknown_family(relay: RunningRelay) -> None:
    result = runner.invoke(app, ["fuzz", relay.base, "--key", KEY, "--skip", "idz"])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: --skip 'idz' is not an invariant family; choose")


def _one_line_error(result: Any) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot fuzz: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


# trio-websocket 0.12 leaks the socket of a rejected handshake (see above).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_fuzz_cannot_fuzz_a_wrong_key_a_closed_port_or_plain_http(relay: RunningRelay) -> None:
    wrong = _one_line_error(runner.invoke(app, ["fuzz", relay.base, "--key", "f" * 32]))
    assert "refused the token" in wrong and "server key" in wrong
    closed = _one_line_error(
        runner.invoke(app, ["fuzz", f"ws://127.0.0.1:{free_port()}", "--key", KEY])
    )
    assert "nothing listens at 127.0.0.1:" in closed
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _PlainHttp)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        plain = _one_line_error(
            runner.invoke(
                app, ["fuzz", f"http://127.0.0.1:{server.server_address[1]}", "--key", KEY]
            )
        )
    finally:
        server.shutdown()
        server.server_close()
    gc.collect()
    assert "answered HTTP 200 instead of a WebSocket upgrade" in plain


def test_fuzz_needs_a_key_with_a_tool_url(
    relay: RunningRelay, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    monkeypatch.delenv("SERVER_KEY", raising=False)
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["fuzz", relay.tool_url("calc")])
    assert result.exit_code == 2
    assert "fuzz mints a token for a fresh agent per script, so it needs the server key" in (
        result.stderr
    )


def test_every_command_has_complete_help() -> None:
    for command in (["token"], ["url"], ["check"], ["fuzz"], ["call"], ["call", "ws://x", "tools"]):
        result = runner.invoke(app, [*command, "--help"])
        assert result.exit_code == 0, command
        assert "Usage:" in result.stdout


def test_serve_runs_plugins_in_process_for_an_agent(tmp_path: Any) -> None:
    """`serve --tools AGENT=module:Class` serves the plugin with no socket hop."""
    port = free_port()
    spec = "calc=trio_mcp_relay.examples.calculator:Calculator"
    command = [sys.executable, "-m", "trio_mcp_relay", "serve", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--key", KEY, "--data-dir", str(tmp_path), "--tools", spec]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as relay:
        try:
            assert relay.stdout is not None
            relay.stdout.readline()  # "listening on": the relay is up
            url = caller_url(f"ws://127.0.0.1:{port}", KEY, "calc")
            listed = runner.invoke(app, ["call", url, "tools"])
            assert listed.exit_code == 0, listed.output
            assert listed.stdout.startswith("calculate")
            result = runner.invoke(
                app, ["call", url, "call", "calculate", "--args", '{"expression": "6*7"}']
            )
            assert result.exit_code == 0, result.output
            assert "42" in result.stdout
        finally:
            relay.send_signal(signal.SIGTERM)
            assert relay.wait(timeout=15) == 0


def test_serve_refuses_a_bad_tools_option(tmp_path: Any) -> None:
    for value, message in (("calc", "AGENT=module:Class"), ("calc=nope.module:X", "nope")):
        result = runner.invoke(
            app, ["serve", "--key", KEY, "--data-dir", str(tmp_path), "--tools", value]
        )
        assert result.exit_code == 2, result.output
        assert message in result.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
