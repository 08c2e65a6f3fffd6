"""``call`` and ``check`` over the relay's MCP Streamable HTTP caller endpoint (#12), run for
real: the relay in this process on port 0, a WebSocket tool of its agent, and each command as
a subprocess (``python -m trio_mcp_relay``)."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from tests.helpers import KEY, RunningRelay, health, recv, result, send, start_relay, tool_peer
from trio_mcp_relay._auth import TokenRole, encrypt_token, scoped_token

#: Seconds a test may take: each command is a fresh Python process (about a second to start).
TIMEOUT = 60

ADD = {
    "name": "add",
    "description": "Add two numbers.\nMore.",
    "inputSchema": {
        "type": "object",
        "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
    },
}
FAIL = {"name": "fail", "description": "Always fails.", "inputSchema": {"type": "object"}}


async def serve_calculator(ws: WebSocketConnection, seen: list[dict[str, Any]]) -> None:
    """Answer ``tools/call`` of add (the sum) and fail (``isError``); other requests -32601.
    Every request the tool gets is appended to ``seen``."""
    try:
        while True:
            frame = await recv(ws)
            if "id" not in frame or "method" not in frame:
                continue
            seen.append(frame)
            params = frame.get("params") or {}
            if frame["method"] == "tools/call" and params.get("name") == "add":
                total = params["arguments"]["a"] + params["arguments"]["b"]
                text = {"content": [{"type": "text", "text": str(total)}], "isError": False}
                await send(ws, result(frame["id"], text))
            elif frame["method"] == "tools/call":
                text = {"content": [{"type": "text", "text": "it failed"}], "isError": True}
                await send(ws, result(frame["id"], text))
            else:
                error = {"code": -32601, "message": "Method not found"}
                await send(ws, {"jsonrpc": "2.0", "id": frame["id"], "error": error})
    except ConnectionClosed:
        return


@asynccontextmanager
async def calculator(
    nursery: trio.Nursery, relay: RunningRelay, agent: str
) -> AsyncIterator[list[dict[str, Any]]]:
    """The agent's tool (add, fail) while the block runs; yields the requests it gets."""
    seen: list[dict[str, Any]] = []
    async with tool_peer(relay.tool_url(agent), name="calc", tools=[ADD, FAIL]) as ws:
        nursery.start_soon(serve_calculator, ws, seen)
        yield seen


def http_caller_url(relay: RunningRelay, agent: str, token: str | None = None) -> str:
    token = encrypt_token(KEY, agent) if token is None else token
    return f"{relay.http}/mcp_endpoint/call/?token={quote(token, safe='')}"


async def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[bytes]:
    """``trio-mcp-relay ARGS`` as a subprocess, with no key in its environment or directory."""
    env = {k: v for k, v in os.environ.items() if k not in ("SERVER_KEY", "DATA_DIR")}
    done: subprocess.CompletedProcess[bytes] = await trio.run_process(
        [sys.executable, "-m", "trio_mcp_relay", *args],
        stdin=subprocess.DEVNULL,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        cwd=cwd,
        env=env,
    )
    return done


def out(done: subprocess.CompletedProcess[bytes]) -> str:
    return done.stdout.decode()


def err(done: subprocess.CompletedProcess[bytes]) -> str:
    return done.stderr.decode()


def http_sessions_ended(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The relay's log lines of HTTP sessions that the client ended with DELETE."""
    return [
        r.getMessage()
        for r in caplog.records
        if "HTTP session for agent" in r.getMessage()
        and r.getMessage().endswith("ended: session ended by the client (DELETE)")
    ]


async def test_call_http_tools_lists_them_over_a_session_it_deletes(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="trio_mcp_relay.server")
    with trio.fail_after(TIMEOUT):
        relay = await start_relay(nursery)
        async with calculator(nursery, relay, "calc"):
            done = await cli("call", http_caller_url(relay, "calc"), "tools", cwd=tmp_path)
            assert done.returncode == 0, err(done)
            # The same table as over WebSocket (tests/test_commands.py).
            assert out(done).splitlines() == [
                "add   (a, b)  Add two numbers.",
                "fail  ()  Always fails.",
            ]
            # It was an HTTP session (not the WebSocket caller), ended by DELETE: none is left.
            assert len(http_sessions_ended(caplog)) == 1, caplog.text
            assert (await health(relay))["http_sessions"] == 0


async def test_call_http_calls_a_tool_with_its_arguments(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="trio_mcp_relay.server")
    with trio.fail_after(TIMEOUT):
        relay = await start_relay(nursery)
        async with calculator(nursery, relay, "calc") as seen:
            url = http_caller_url(relay, "calc")
            added = await cli(
                "call", url, "call", "add", "--args", '{"a": 2, "b": 40}', cwd=tmp_path
            )
            assert added.returncode == 0, err(added)
            assert out(added) == "42\n"
            calls = [f for f in seen if f["method"] == "tools/call"]
            assert [c["params"] for c in calls] == [{"name": "add", "arguments": {"a": 2, "b": 40}}]
            # An isError result: printed, exit status 1 (as over WebSocket).
            failed = await cli("call", url, "call", "fail", cwd=tmp_path)
            assert failed.returncode == 1, err(failed)
            assert out(failed) == "it failed\n"
            assert len(http_sessions_ended(caplog)) == 2, caplog.text


async def test_call_http_request_prints_the_raw_result_and_errors(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="trio_mcp_relay.server")
    with trio.fail_after(TIMEOUT):
        relay = await start_relay(nursery)
        async with calculator(nursery, relay, "calc"):
            url = http_caller_url(relay, "calc")
            listed = await cli("call", url, "request", "tools/list", cwd=tmp_path)
            assert listed.returncode == 0, err(listed)
            assert [t["name"] for t in json.loads(out(listed))["tools"]] == ["add", "fail"]
            pinged = await cli("call", url, "request", "ping", "{}", cwd=tmp_path)
            assert (pinged.returncode, out(pinged)) == (0, "{}\n"), err(pinged)
            # A JSON-RPC error from the tool comes back as over WebSocket: exit 1, code on stderr.
            missing = await cli("call", url, "request", "test/nope", cwd=tmp_path)
            assert missing.returncode == 1
            assert err(missing) == "error: the server answered with error -32601 Method not found\n"
            assert len(http_sessions_ended(caplog)) == 3, caplog.text
        no_tool = await cli("call", http_caller_url(relay, "nobody"), "tools", cwd=tmp_path)
        assert no_tool.returncode == 1 and "-32001" in err(no_tool), err(no_tool)


async def test_call_http_that_times_out_ends_its_session_so_the_tool_hears_the_cancel(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    with trio.fail_after(TIMEOUT):
        relay = await start_relay(nursery)
        frames_in, frames = trio.open_memory_channel[dict[str, Any]](16)
        async with tool_peer(relay.tool_url("slow"), tools=["never"]) as ws:

            async def listen() -> None:
                with contextlib.suppress(ConnectionClosed):
                    while True:
                        await frames_in.send(await recv(ws))

            nursery.start_soon(listen)
            url = http_caller_url(relay, "slow")
            done = await cli("call", url, "call", "never", "--timeout", "1", cwd=tmp_path)
            assert done.returncode == 1
            assert err(done) == "error: no answer within 1 s (--timeout)\n"
            # The DELETE on the way out ended the session: its call is cancelled at the tool
            # now, not when the session would have expired (300 s idle).
            with trio.fail_after(5):
                call, cancel = await frames.receive(), await frames.receive()
            assert call["method"] == "tools/call"
            assert cancel["method"] == "notifications/cancelled"
            assert cancel["params"]["requestId"] == call["id"]
            assert (await health(relay))["http_sessions"] == 0


async def test_call_http_with_a_bad_token_exits_1_naming_status_error_and_fix(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    with trio.fail_after(TIMEOUT):
        relay = await start_relay(nursery)
        wrong = http_caller_url(relay, "calc", token=encrypt_token("f" * 32, "calc"))
        done = await cli("call", wrong, "tools", cwd=tmp_path)
        assert done.returncode == 1
        assert out(done) == ""
        assert err(done) == (
            f"error: 127.0.0.1:{relay.port} answered HTTP 401 (-32004 Authentication error: "
            "token does not decrypt with this server's key) to initialize: the token was "
            "refused: use a caller URL with a token minted with this endpoint's key "
            "(trio-mcp-relay url AGENT)\n"
        )
        assert "token=" not in err(done)  # no secret in the message
        tool_token = scoped_token(KEY, "calc", TokenRole.TOOL)
        refused = await cli(
            "call", http_caller_url(relay, "calc", tool_token), "tools", cwd=tmp_path
        )
        assert refused.returncode == 1
        assert "answered HTTP 403 (-32004 Authentication error: a tool token cannot open" in err(
            refused
        )
        assert err(refused).endswith(
            "use a caller token (trio-mcp-relay url AGENT --role caller)\n"
        )


# ------------------------------------------------------------------------- an endpoint without it


@asynccontextmanager
async def without_streamable_http(upstream: int, status: int) -> AsyncIterator[int]:
    """A proxy to the relay at ``upstream`` that answers every POST with ``status``, as an
    endpoint without Streamable HTTP does (the reference server); yields its port."""

    async def handle(client: trio.SocketStream) -> None:
        async with client:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = await client.receive_some(65536)
                if not chunk:
                    return
                head += chunk
            if head.startswith(b"POST "):
                await client.send_all(
                    f"HTTP/1.1 {status} Refused\r\ncontent-type: text/plain\r\n"
                    "content-length: 7\r\nconnection: close\r\n\r\nRefused".encode()
                )
                return
            server = await trio.open_tcp_stream("127.0.0.1", upstream)
            async with server, trio.open_nursery() as pipes:
                await server.send_all(head)

                async def pump(source: trio.SocketStream, sink: trio.SocketStream) -> None:
                    try:
                        while chunk := await source.receive_some(65536):
                            await sink.send_all(chunk)
                        await sink.send_eof()
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass
                    pipes.cancel_scope.cancel()

                pipes.start_soon(pump, client, server)
                pipes.start_soon(pump, server, client)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, handle, 0, host="127.0.0.1")
        )
        yield listeners[0].socket.getsockname()[1]
        nursery.cancel_scope.cancel()


async def test_call_http_against_an_endpoint_without_it_says_to_use_websocket(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    with trio.fail_after(TIMEOUT):
        relay = await start_relay(nursery)
        async with without_streamable_http(relay.port, 405) as port:
            token = quote(encrypt_token(KEY, "calc"), safe="")
            url = f"http://127.0.0.1:{port}/mcp_endpoint/call/?token={token}"
            done = await cli("call", url, "tools", cwd=tmp_path)
    assert done.returncode == 1
    assert err(done) == (
        f"error: 127.0.0.1:{port} answered HTTP 405 (Refused) to initialize: no MCP Streamable "
        "HTTP endpoint there: check the path (/mcp_endpoint/call/); an endpoint that speaks "
        "only WebSocket (such as the reference mcp-endpoint-server) takes the WebSocket caller "
        f"URL, ws://127.0.0.1:{port}/mcp_endpoint/call/?token=...\n"
    )


# ------------------------------------------------------------------------- check

HTTP_PASSED = re.compile(
    r"^PASS  Streamable HTTP caller +session opened; tools/list offers check; tools/call "
    r"answered; DELETE 204$",
    re.M,
)


async def test_check_passes_the_streamable_http_caller_against_our_relay(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    with trio.fail_after(TIMEOUT):
        relay = await start_relay(nursery)
        done = await cli("check", "--port", str(relay.port), "--key", KEY, cwd=tmp_path)
        assert done.returncode == 0, out(done) + err(done)
        assert HTTP_PASSED.search(out(done)), out(done)
        assert "FAIL" not in out(done) and "SKIP" not in out(done)
        assert out(done).splitlines()[-1] == "10 passed, 0 failed"
        # The check's session was ended, not left to expire.
        assert (await health(relay))["http_sessions"] == 0


async def test_check_given_an_http_caller_url_checks_with_its_token(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    with trio.fail_after(TIMEOUT):
        relay = await start_relay(nursery)
        # An agent with no tool: the check's own tool connects with the token and is called.
        fresh = await cli("check", http_caller_url(relay, "nobody"), cwd=tmp_path)
        assert fresh.returncode == 0, out(fresh) + err(fresh)
        assert out(fresh).startswith("note: given a caller URL (/mcp_endpoint/call/); checking")
        assert HTTP_PASSED.search(out(fresh)), out(fresh)
        # An agent with its own tool: listed over HTTP, never called.
        async with calculator(nursery, relay, "calc") as seen:
            own = await cli("check", http_caller_url(relay, "calc"), cwd=tmp_path)
        assert own.returncode == 0, out(own) + err(own)
        assert re.search(
            r"^PASS  Streamable HTTP caller +session opened; tools/list: 2 tools: add, fail; "
            r"DELETE 204 \(the agent's own tool: nothing called\)$",
            out(own),
            re.M,
        ), out(own)
        assert not [f for f in seen if f["method"] == "tools/call"]


@pytest.mark.parametrize("status", [404, 405])
async def test_check_skips_streamable_http_where_it_is_not_served(
    nursery: trio.Nursery, tmp_path: Path, status: int
) -> None:
    with trio.fail_after(TIMEOUT):
        relay = await start_relay(nursery)
        async with without_streamable_http(relay.port, status) as port:
            done = await cli("check", "--port", str(port), "--key", KEY, cwd=tmp_path)
    # Every WebSocket step passes through the proxy; Streamable HTTP is skipped, not failed.
    assert done.returncode == 0, out(done) + err(done)
    assert re.search(
        r"^SKIP  Streamable HTTP caller +skipped: the endpoint does not serve MCP Streamable "
        rf"HTTP \(POST answered HTTP {status}\)$",
        out(done),
        re.M,
    ), out(done)
    assert out(done).splitlines()[-1] == "9 passed, 0 failed, 1 skipped"
