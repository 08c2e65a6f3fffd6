"""The ``pipe`` command: stdio MCP servers bridged to an endpoint over WebSocket.

The server under the pipe is a real child process (``tests/data/stdio_server.py``, stdlib only).
The endpoint is either a real relay on a loopback port with a caller connection doing MCP
round trips, or a *fake endpoint*: a bare trio-websocket server that hands each accepted
connection to the test, so the test is the MCP client and sees exactly the frames the pipe
sends, and can hold a handshake back to keep the pipe disconnected.

Most tests run :func:`run_pipe` in-process; one runs the real command in a subprocess and stops
it with SIGINT or SIGTERM.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import attrs
import pytest
import trio
import typer
from hypothesis import given
from hypothesis import strategies as st
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    WebSocketRequest,
    serve_websocket,
)
from typer.testing import CliRunner

from tests.helpers import peer, recv, send, start_command, start_relay, wait_for_counts
from trio_mcp_relay import testing
from trio_mcp_relay._cmd_pipe import register
from trio_mcp_relay._frames import _loads, dumps
from trio_mcp_relay._pipe import (
    Backoff,
    BridgeStatus,
    PipeConfigError,
    PipeFailed,
    PipeOptions,
    ServerSpec,
    _LineSplitter,
    _Outcome,
    _Session,
    compact_line,
    load_config_file,
    parse_config,
    prepare,
    read_dotenv,
    redact_url,
    run_pipe,
    server_url,
    server_urls,
    shown_endpoint,
)
from trio_mcp_relay._scoped import xiaozhi_safe

TIMEOUT = 10
SERVER = Path(__file__).parent / "data" / "stdio_server.py"
SECRET = "SECRETtoken0123456789abcdefSECRET"
FAST = PipeOptions(
    backoff_initial=0.05,
    backoff_max=0.2,
    ping_interval=0,
    kill_timeout=2,
    close_timeout=1,
    connect_timeout=5,
)
PIPE_ENV_NAMES = ("MCP_ENDPOINT", "MCP_CONFIG", "LOG_LEVEL")


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    for name in PIPE_ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    caplog.set_level(logging.INFO, logger="trio_mcp_relay.pipe")


# ----------------------------------------------------------------------------- helpers


def server(name: str = "calc", **env: str) -> ServerSpec:
    """The test stdio server as a pipe would run it."""
    return ServerSpec(name, (sys.executable, str(SERVER)), {**os.environ, **env})


async def wait_until(predicate: Callable[[], bool]) -> None:
    """Poll a status the pipe updates (it has no events to wait on, by design)."""
    while not predicate():  # noqa: ASYNC110
        await trio.sleep(0.01)


async def rpc(ws: WebSocketConnection, rid: Any, method: str, params: Any = None) -> Any:
    """Send a request and return its response, skipping notifications."""
    frame: dict[str, Any] = {"jsonrpc": "2.0", "id": rid, "method": method}
    if params is not None:
        frame["params"] = params
    await send(ws, frame)
    while True:
        answer = await recv(ws)
        if "method" not in answer:
            assert answer["id"] == rid, answer
            return answer


async def call(ws: WebSocketConnection, rid: Any, tool: str, **arguments: Any) -> str:
    """Call a tool that must succeed; its text."""
    answer = await rpc(ws, rid, "tools/call", {"name": tool, "arguments": arguments})
    assert "result" in answer, answer
    return answer["result"]["content"][0]["text"]  # type: ignore[no-any-return]


async def initialize(ws: WebSocketConnection, rid: Any = 0) -> Any:
    answer = await rpc(
        ws,
        rid,
        "initialize",
        {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "test", "version": "0"},
        },
    )
    await send(ws, {"jsonrpc": "2.0", "method": "notifications/initialized"})
    return answer


async def start_pipe(
    nursery: trio.Nursery,
    url: str,
    servers: list[ServerSpec],
    options: PipeOptions = FAST,
) -> list[BridgeStatus]:
    statuses: list[BridgeStatus] = await nursery.start(run_pipe, url, servers, options)
    return statuses


@attrs.define
class FakeEndpoint:
    """A WebSocket server that hands every accepted connection to the test.

    While ``accepting`` is not set, handshakes wait: the pipe stays disconnected.
    """

    port: int = 0
    connections: trio.MemoryReceiveChannel[WebSocketConnection] | None = None
    accepting: trio.Event = attrs.Factory(trio.Event)

    def url(self, token: str = SECRET) -> str:
        return f"ws://127.0.0.1:{self.port}/mcp/?token={token}"

    async def next(self) -> WebSocketConnection:
        assert self.connections is not None
        return await self.connections.receive()


async def start_fake_endpoint(nursery: trio.Nursery) -> FakeEndpoint:
    fake = FakeEndpoint()
    fake.accepting.set()
    send_channel, fake.connections = trio.open_memory_channel[WebSocketConnection](16)

    async def handler(request: WebSocketRequest) -> None:
        await fake.accepting.wait()
        ws = await request.accept()
        await send_channel.send(ws)
        await trio.sleep_forever()  # the test owns the connection until the endpoint stops

    ws_server = await nursery.start(serve_websocket, handler, "127.0.0.1", 0, None)
    fake.port = ws_server.port
    return fake


@asynccontextmanager
async def open_nursery_then_cancel() -> AsyncIterator[trio.Nursery]:
    """A nursery whose tasks (relays, pipes) are cancelled when the block ends."""
    async with trio.open_nursery() as nursery:
        yield nursery
        nursery.cancel_scope.cancel()


# ----------------------------------------------------------------------------- against a relay


async def test_round_trips_through_the_relay(caplog: pytest.LogCaptureFixture) -> None:
    with trio.fail_after(TIMEOUT):
        async with open_nursery_then_cancel() as nursery:
            relay = await start_relay(nursery)
            [status] = await start_pipe(nursery, relay.tool_url("calc"), [server()])
            await wait_for_counts(relay, tools=1, callers=0)
            assert status.connected
            async with peer(relay.caller_url("calc")) as caller:
                answer = await initialize(caller)
                assert answer["result"]["serverInfo"]["name"] == "stdio-test-server"
                tools = await rpc(caller, 1, "tools/list")
                assert "add" in [tool["name"] for tool in tools["result"]["tools"]]
                assert await call(caller, 2, "add", a=2, b=3) == "5"
                assert await call(caller, "three", "add", a=-1, b=0.5) == "-0.5"
                assert await call(caller, 4, "calls") == "3"
    token = relay.token("calc")
    assert "connected to ws://127.0.0.1" in caplog.text
    assert token not in caplog.text
    assert token.replace("+", "%2B") not in caplog.text  # nor its URL-quoted form


async def test_relay_restart_keeps_the_child_and_its_state() -> None:
    with trio.fail_after(TIMEOUT):
        async with open_nursery_then_cancel() as nursery:
            async with trio.open_nursery() as first_relay_nursery:
                relay = await start_relay(first_relay_nursery)
                [status] = await start_pipe(nursery, relay.tool_url("calc"), [server()])
                await wait_for_counts(relay, tools=1, callers=0)
                async with peer(relay.caller_url("calc")) as caller:
                    await initialize(caller)
                    assert await call(caller, 1, "calls") == "1"
                    assert await call(caller, 2, "calls") == "2"
                    state = json.loads(await call(caller, 3, "state"))
                first_relay_nursery.cancel_scope.cancel()
            await wait_until(lambda: not status.connected)

            # A new relay on the same port: the pipe redials it, with the same child.
            relay = await start_relay(nursery, port=relay.port)
            await wait_for_counts(relay, tools=1, callers=0)
            async with peer(relay.caller_url("calc")) as caller:
                await initialize(caller)
                assert await call(caller, 1, "calls") == "4"
                again = json.loads(await call(caller, 2, "state"))
            assert again == {"pid": state["pid"], "inits": 2}
            assert status.child_starts == 1
            assert status.connections == 2


async def test_a_crashed_child_is_restarted_and_reinitialized(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with trio.fail_after(TIMEOUT):
        async with open_nursery_then_cancel() as nursery:
            relay = await start_relay(nursery)
            # The first restart waits 0.24-0.36 s: long enough to see requests refused.
            options = attrs.evolve(FAST, backoff_initial=0.3, backoff_max=0.3)
            [status] = await start_pipe(nursery, relay.tool_url("calc"), [server()], options)
            await wait_for_counts(relay, tools=1, callers=0)
            async with peer(relay.caller_url("calc")) as caller:
                await initialize(caller)
                assert await call(caller, 1, "calls") == "1"
                first_pid = status.child_pid

                # The request in flight when the child dies is answered at once.
                crashed = await rpc(caller, 2, "tools/call", {"name": "crash", "arguments": {}})
                assert crashed["error"]["code"] == -32603
                assert "exited with code 3" in crashed["error"]["message"]

                # Until the new child is up and re-initialized, requests are refused...
                refused = await rpc(caller, 3, "tools/call", {"name": "add", "arguments": {}})
                assert refused["error"] == {
                    "code": -32603,
                    "message": "the MCP server is not running (restarting)",
                }
                rid = 4
                while "result" not in (
                    answer := await rpc(
                        caller, rid, "tools/call", {"name": "calls", "arguments": {}}
                    )
                ):
                    assert answer["error"]["code"] == -32603
                    rid += 1
                    await trio.sleep(0.01)
                # ...then the caller's session works without a new initialize: the pipe
                # replayed it (the test server refuses tools/call before initialize).
                assert answer["result"]["content"][0]["text"] == "1"
                state = json.loads(await call(caller, rid + 1, "state"))
            assert state["inits"] == 1
            assert state["pid"] == status.child_pid != first_pid
            assert status.child_starts == 2
            assert status.last_exit_code == 3
            assert status.connections == 1  # the WebSocket stayed up throughout
    assert "exited with code 3" in caplog.text
    assert "re-initialized" in caplog.text


async def test_config_with_a_disabled_server_and_remote_ones(tmp_path: Path) -> None:
    config = tmp_path / "mcp_config.json"
    config.write_text(
        json.dumps(
            {
                "mcpServers": {
                    "calc": {
                        "type": "stdio",
                        "command": sys.executable,
                        "args": [str(SERVER)],
                        "env": {"CALC_MODE": 1},
                    },
                    "spare": {"command": sys.executable, "args": [str(SERVER)], "disabled": True},
                    "remote": {"type": "sse", "url": "http://127.0.0.1:9/sse"},
                    "streamed": {
                        "transportType": "streamableHttp",
                        "url": "https://x/mcp",
                        "headers": {"Authorization": "Bearer t"},
                    },
                    "bare": {"url": "http://y/mcp"},
                }
            }
        )
    )
    servers = load_config_file(config, environ={"PATH": os.environ["PATH"]})
    assert [spec.name for spec in servers] == ["calc", "remote", "streamed", "bare"]
    assert servers[0].env["CALC_MODE"] == "1"
    assert servers[0].env["PYTHONUNBUFFERED"] == "1"
    remote = [(s.transport, s.url, dict(s.headers)) for s in servers[1:]]
    assert remote == [
        ("sse", "http://127.0.0.1:9/sse", {}),
        ("http", "https://x/mcp", {"Authorization": "Bearer t"}),
        ("http", "http://y/mcp", {}),
    ]
    servers = servers[:1]
    with trio.fail_after(TIMEOUT):
        async with open_nursery_then_cancel() as nursery:
            relay = await start_relay(nursery)
            await start_pipe(nursery, relay.tool_url("calc"), servers)
            await wait_for_counts(relay, tools=1, callers=0)
            async with peer(relay.caller_url("calc")) as caller:
                await initialize(caller)
                assert await call(caller, 1, "add", a=20, b=22) == "42"


async def test_two_servers_get_a_websocket_each(capfd: pytest.CaptureFixture[str]) -> None:
    with trio.fail_after(TIMEOUT):
        async with open_nursery_then_cancel() as nursery:
            fake = await start_fake_endpoint(nursery)
            statuses = await start_pipe(nursery, fake.url(), [server("one"), server("two")])
            first, second = await fake.next(), await fake.next()
            pids = set()
            for ws in (first, second):
                await initialize(ws)
                pids.add(json.loads(await call(ws, 1, "state"))["pid"])
            assert pids == {status.child_pid for status in statuses}
            assert len(pids) == 2
    err = capfd.readouterr().err
    assert "[one] stdio_server ready pid=" in err
    assert "[two] stdio_server ready pid=" in err


def two_server_config(tmp_path: Path, first: str = "one", second: str = "two") -> Path:
    """An mcp_config.json with two entries running the test server."""
    config = tmp_path / "mcp_config.json"
    entry = {"command": sys.executable, "args": [str(SERVER)]}
    config.write_text(json.dumps({"mcpServers": {first: entry, second: entry}}))
    return config


async def listed_tools(caller: WebSocketConnection, count: int, first_id: int = 100) -> list[str]:
    """The caller's tools/list once it holds ``count`` tools (servers join one by one)."""
    rid = first_id
    while True:
        answer = await rpc(caller, rid, "tools/list")
        names = [tool["name"] for tool in answer["result"]["tools"]]
        if len(names) >= count:
            return names
        rid += 1
        await trio.sleep(0.01)


def later_of(names: list[str], ids: tuple[str, str]) -> str:
    """Which of two servers with the same tools joined later: its tools have derived names
    (``<server_id>_<tool>``), the earlier one's keep the bare names."""
    (later,) = [i for i in ids if f"{i}_add" in names]
    derived = [n for n in names if n.startswith(f"{later}_")]
    bare = [n for n in names if n not in derived]
    assert "add" in bare
    assert sorted(derived) == sorted(f"{later}_{n}" for n in bare)
    return later


async def test_servers_of_one_config_join_the_agent_under_their_names(tmp_path: Path) -> None:
    servers = load_config_file(
        two_server_config(tmp_path, "one", "key-callback"), environ=dict(os.environ)
    )
    assert [spec.server_id for spec in servers] == ["one", "key-callback"]
    with trio.fail_after(TIMEOUT):
        async with open_nursery_then_cancel() as nursery:
            relay = await start_relay(nursery)
            statuses = await start_pipe(nursery, relay.tool_url("multi"), servers)
            await wait_for_counts(relay, tools=2, callers=0)
            async with peer(relay.caller_url("multi")) as caller:
                await initialize(caller)
                names = await listed_tools(caller, 14)
                # Both servers are there: the later one's colliding names are derived from
                # its server_id (the name in the config, decoded by the relay).
                assert len(names) == 14
                later = later_of(names, ("one", "key-callback"))
                first = json.loads(await call(caller, 1, "state"))["pid"]
                second = json.loads(await call(caller, 2, f"{later}_state"))["pid"]
                assert await call(caller, 3, f"{later}_add", a=1, b=2) == "3"
            assert {first, second} == {status.child_pid for status in statuses}
            assert first != second
            # Neither replaced the other: one connection each, never redialled.
            assert [status.connections for status in statuses] == [1, 1]


def test_server_urls_name_each_server_without_key_or_call() -> None:
    base = f"ws://h:1/mcp_endpoint/mcp/?token={SECRET}"
    specs = [
        ServerSpec("a b", server_id="a b"),
        ServerSpec("KeyBoard", server_id="KeyBoard"),
        ServerSpec("recall+x", server_id="recall+x"),
        ServerSpec("lone"),
    ]
    urls = server_urls(base, specs)
    assert urls == [
        f"{base}&server_id=a%20b",
        f"{base}&server_id=%4BeyBoard",
        f"{base}&server_id=re%63all%2Bx",
        base,
    ]
    for url, spec in zip(urls, specs, strict=True):
        added = url[len(base) :]
        assert xiaozhi_safe(added), url
        assert parse_qs(urlsplit(url).query).get("server_id", [None])[0] == spec.server_id
    # A single server keeps the server_id of the URL (its token may be bound to it)...
    bound = f"{base}&server_id=mine"
    assert server_urls(bound, specs[:1]) == [bound]
    # ...several cannot share one, nor have one the relay would refuse.
    with pytest.raises(PipeConfigError, match="needs its own"):
        server_urls(bound, specs[:2])
    with pytest.raises(PipeConfigError, match="1 to 64 printable"):
        server_urls(base, [ServerSpec("x" * 65, server_id="x" * 65)])
    with pytest.raises(PipeConfigError, match="two servers have the server_id"):
        server_urls(base, [ServerSpec("a", server_id="a"), ServerSpec("b", server_id="a")])
    assert server_url(bound, "other") == f"{base}&server_id=other"


@given(st.text(min_size=1, max_size=64).filter(str.isprintable))
def test_any_server_id_round_trips_through_a_xiaozhi_safe_url(name: str) -> None:
    base = "ws://h:1/mcp_endpoint/mcp/?token=T"
    url = server_url(base, name)
    assert xiaozhi_safe(url[len(base) :])
    assert parse_qs(urlsplit(url).query)["server_id"] == [name]


async def test_the_command_bridges_every_server_of_a_config(tmp_path: Path) -> None:
    config = two_server_config(tmp_path)
    with trio.fail_after(TIMEOUT):
        async with open_nursery_then_cancel() as nursery:
            relay = await start_relay(nursery)
            env = {k: v for k, v in os.environ.items() if k not in PIPE_ENV_NAMES}
            env["MCP_ENDPOINT"] = relay.tool_url("cli")
            command = [*pipe_command(), "pipe", "--config", str(config), "--ping-interval", "0"]
            process = await start_command(nursery, command, env=env, cwd=tmp_path)
            await wait_for_counts(relay, tools=2, callers=0)
            async with peer(relay.caller_url("cli")) as caller:
                await initialize(caller)
                names = await listed_tools(caller, 14)
                later = later_of(names, ("one", "two"))
                first = json.loads(await call(caller, 1, "state"))["pid"]
                second = json.loads(await call(caller, 2, f"{later}_state"))["pid"]
                assert first != second
                assert await call(caller, 3, f"{later}_add", a=2, b=2) == "4"
            process.send_signal(signal.SIGTERM)
            assert await process.wait() == 0


# ----------------------------------------------------------------------------- frames


async def test_frames_are_compact_single_lines_both_ways() -> None:
    with trio.fail_after(TIMEOUT):
        async with open_nursery_then_cancel() as nursery:
            fake = await start_fake_endpoint(nursery)
            # The server ends its lines with \r\n; the endpoint must never see it.
            await start_pipe(nursery, fake.url(), [server(STDIO_SERVER_EOL="\r\n")])
            ws = await fake.next()
            pretty = {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "initialize",
                "params": {"protocolVersion": "2024-11-05", "capabilities": {}},
            }
            await ws.send_message(json.dumps(pretty, indent=2))
            reply = await ws.get_message()
            assert isinstance(reply, str)
            assert not reply.endswith(("\n", "\r"))
            assert json.loads(reply)["result"]["protocolVersion"] == "2024-11-05"

            # What the child read: one compact line, whatever the endpoint sent.
            request = {
                "jsonrpc": "2.0",
                "id": 2,
                "method": "tools/call",
                "params": {"name": "raw", "arguments": {"text": "a\nb ☃", "list": [1, 2]}},
            }
            await ws.send_message(json.dumps(request, indent=4, ensure_ascii=True))
            reply = await ws.get_message()
            assert isinstance(reply, str)
            assert "\r" not in reply
            assert "\n" not in reply
            line = json.loads(reply)["result"]["content"][0]["text"]
            seen = json.loads(line)
            assert line == json.dumps(seen, separators=(",", ":"), ensure_ascii=False)
            assert json.loads(reply)["id"] == 2  # the child saw an id of the pipe's own
            assert {**seen, "id": 2} == request

            # Not JSON: passed on with its newlines removed, for the server to reject.
            await ws.send_message("not json\nat\r\nall")
            parse_error = json.loads(await ws.get_message())
            assert parse_error["error"]["code"] == -32700
            assert parse_error["error"]["data"] == "not jsonatall"

            # Binary frames holding JSON, and integers beyond 64 bits, pass exactly.
            await ws.send_message(
                b'{"jsonrpc":"2.0","id":123456789012345678901234567890,"method":"ping"}'
            )
            raw = await ws.get_message()
            assert "123456789012345678901234567890" in raw
            assert json.loads(raw)["id"] == 123456789012345678901234567890


async def test_output_is_buffered_while_disconnected_dropping_the_oldest(
    caplog: pytest.LogCaptureFixture,
) -> None:
    options = attrs.evolve(FAST, buffer_lines=3)
    with trio.fail_after(TIMEOUT):
        async with open_nursery_then_cancel() as nursery:
            fake = await start_fake_endpoint(nursery)
            [status] = await start_pipe(nursery, fake.url(), [server()], options)
            ws = await fake.next()
            await initialize(ws)
            fake.accepting = trio.Event()  # hold the next handshake: the pipe stays offline
            assert await call(ws, 1, "spam", n=10, delay=0.2) == "ok"
            await ws.aclose()
            await wait_until(lambda: status.dropped_lines == 7)
            assert not status.connected
            fake.accepting.set()
            ws = await fake.next()
            flushed = [json.loads(await ws.get_message()) for _ in range(3)]
            assert [frame["params"]["data"] for frame in flushed] == [7, 8, 9]
            # The child is the same one, and the new connection works.
            assert await call(ws, 2, "calls") == "2"
            assert status.child_starts == 1
    assert "dropping the oldest" in caplog.text
    assert "7 output lines were dropped" in caplog.text


async def test_answers_to_an_earlier_connection_are_not_flushed() -> None:
    with trio.fail_after(TIMEOUT):
        async with open_nursery_then_cancel() as nursery:
            fake = await start_fake_endpoint(nursery)
            [status] = await start_pipe(nursery, fake.url(), [server()])
            ws = await fake.next()
            await initialize(ws)
            await send(
                ws,
                {
                    "jsonrpc": "2.0",
                    "id": 7,
                    "method": "tools/call",
                    "params": {"name": "sleep", "arguments": {"seconds": 0.3}},
                },
            )
            await ws.aclose()
            ws = await fake.next()
            # Id 7 again, on the new connection: it must get its own answer, not the old one.
            assert await call(ws, 7, "add", a=1, b=1) == "2"
            await trio.sleep(0.5)  # the old answer is written by the child meanwhile
            assert await call(ws, 8, "calls") == "3"  # and it did not arrive before this
            assert status.connections == 2


async def test_an_endpoint_that_stops_answering_pings_is_redialled(
    caplog: pytest.LogCaptureFixture,
) -> None:
    options = attrs.evolve(FAST, ping_interval=0.1, ping_timeout=0.2, close_timeout=0.1)
    with trio.fail_after(TIMEOUT):
        async with open_nursery_then_cancel() as nursery:
            fake = await start_fake_endpoint(nursery)
            [status] = await start_pipe(nursery, fake.url(), [server()], options)
            ws = await fake.next()
            await initialize(ws)
            # Stop reading: once trio-websocket's one-message queue is full, its reader stops
            # reading the socket, pings included.
            assert await call(ws, 1, "spam", n=5, delay=0) == "ok"
            await fake.next()
            await wait_until(lambda: status.connections == 2)
            assert status.child_starts == 1
    assert "no pong from the endpoint within 0.2 s" in caplog.text


# ----------------------------------------------------------------------------- stopping


async def test_a_child_that_ignores_sigterm_is_killed(caplog: pytest.LogCaptureFixture) -> None:
    options = attrs.evolve(FAST, kill_timeout=0.3)
    with trio.fail_after(TIMEOUT):
        async with open_nursery_then_cancel() as nursery:
            fake = await start_fake_endpoint(nursery)
            [status] = await start_pipe(
                nursery, fake.url(), [server(STDIO_SERVER_STUBBORN="1")], options
            )
            ws = await fake.next()
            await initialize(ws)
            pid = status.child_pid
            assert pid is not None
        with pytest.raises(ConnectionClosed) as caught:
            await ws.get_message()
    assert caught.value.reason is not None
    assert caught.value.reason.code == 1000
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert "ignored SIGTERM" in caplog.text


SHIM = (
    "import typer\n"
    "from trio_mcp_relay._cmd_pipe import register\n"
    "app = typer.Typer()\n"
    "app.callback()(lambda: None)\n"
    "register(app)\n"
    "app()\n"
)


def pipe_command() -> list[str]:
    """``python -m trio_mcp_relay`` once the lead has wired ``pipe`` in; a shim until then."""
    from trio_mcp_relay._cli import app

    if "pipe" in [command.name for command in app.registered_commands]:
        return [sys.executable, "-m", "trio_mcp_relay"]
    return [sys.executable, "-c", SHIM]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
async def test_the_command_stops_cleanly_on_a_signal(tmp_path: Path, signum: int) -> None:
    with trio.fail_after(TIMEOUT):
        async with open_nursery_then_cancel() as nursery:
            fake = await start_fake_endpoint(nursery)
            env = {k: v for k, v in os.environ.items() if k not in PIPE_ENV_NAMES}
            command = [
                *pipe_command(),
                "pipe",
                "--endpoint",
                fake.url(),
                "--ping-interval",
                "0",
                "--",
                sys.executable,
                str(SERVER),
            ]
            process = await start_command(
                nursery, command, env=env, cwd=tmp_path, stderr=subprocess.PIPE
            )
            assert process.stderr is not None
            stderr = bytearray()
            async with process.stderr:

                async def collect() -> None:
                    assert process.stderr is not None
                    while chunk := await process.stderr.receive_some():
                        stderr.extend(chunk)

                nursery.start_soon(collect)
                ws = await fake.next()
                await initialize(ws)
                child_pid = json.loads(await call(ws, 1, "state"))["pid"]
                process.send_signal(signum)
                with pytest.raises(ConnectionClosed) as caught:
                    await ws.get_message()
                assert await process.wait() == 0
        output = stderr.decode()
    assert caught.value.reason is not None
    assert caught.value.reason.code == 1000, output
    with pytest.raises(ProcessLookupError):
        os.kill(child_pid, 0)
    assert f"[stdio_server] stdio_server ready pid={child_pid}" in output
    assert f"{signal.Signals(signum).name}: stopping" in output
    assert SECRET not in output
    assert "(token SECR…)" in output


# ----------------------------------------------------------------------------- the command line

runner = CliRunner()


def pipe_app() -> typer.Typer:
    app = typer.Typer(add_completion=False, rich_markup_mode=None)

    @app.callback()
    def root() -> None:
        """Test root."""

    register(app)
    return app


@pytest.mark.parametrize(
    ("args", "files", "expected"),
    [
        ([], {}, ["no endpoint", "--endpoint", "MCP_ENDPOINT", ".env"]),
        (["--", "python", "x.py"], {}, ["no endpoint"]),
        (["--endpoint", "ws://127.0.0.1:1/mcp/?token=t"], {}, ["no server to run", "--config"]),
        (
            ["--endpoint", f"http://127.0.0.1/mcp/?token={SECRET}", "--", "python", "x.py"],
            {},
            ["ws:// or wss://"],
        ),
        (
            ["--endpoint", "ws://127.0.0.1:1/?token=t"],
            {"mcp_config.json": '{"mcpServers": {"a": {"command": "python",}}}'},
            ["mcp_config.json is not valid JSON", "line 1"],
        ),
        (
            ["--endpoint", "ws://127.0.0.1:1/?token=t"],
            {"mcp_config.json": '{"servers": {}}'},
            ["mcpServers object is missing"],
        ),
        (
            ["--endpoint", "ws://127.0.0.1:1/?token=t"],
            {"mcp_config.json": '{"mcpServers": {"a": {"type": "stdio", "args": []}}}'},
            ["server 'a'", '"command"'],
        ),
        (
            ["--endpoint", "ws://127.0.0.1:1/?token=t"],
            {"mcp_config.json": '{"mcpServers": {"a": {"command": "python", "disabled": true}}}'},
            ["no enabled server"],
        ),
        (
            ["--endpoint", "ws://127.0.0.1:1/?token=t", "--config", "missing.json"],
            {},
            ["cannot read config", "missing.json"],
        ),
        (
            ["--endpoint", "ws://127.0.0.1:1/?token=t", "--", "no-such-program-xyz"],
            {},
            ["command not found", "no-such-program-xyz"],
        ),
        (
            ["--endpoint", "ws://127.0.0.1:1/?token=t&server_id=s"],
            {
                "mcp_config.json": '{"mcpServers": {"a": {"command": "python"}, "b": {"url": '
                '"http://h/mcp"}}}'
            },
            ["server_id='s'", "each of the 2 servers needs its own"],
        ),
        (
            ["--endpoint", "ws://127.0.0.1:1/?token=t"],
            {"mcp_config.json": json.dumps({"mcpServers": {"n" * 65: {"url": "http://h/"}}})},
            ["cannot be a server_id: 1 to 64 printable characters"],
        ),
    ],
)
def test_errors_say_what_to_fix(
    args: list[str],
    files: dict[str, str],
    expected: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    result = runner.invoke(pipe_app(), ["pipe", *args])
    assert result.exit_code == 2, result.output
    for fragment in expected:
        assert fragment in result.output
    assert SECRET not in result.output


def test_help_documents_every_option() -> None:
    result = runner.invoke(pipe_app(), ["pipe", "--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "trio-mcp-relay pipe --endpoint" in result.output
    assert "-- python calculator.py" in result.output
    command = typer.main.get_command(pipe_app())
    assert isinstance(command, typer.core.TyperGroup)
    params = command.commands["pipe"].params
    assert len(params) >= 10
    for param in params:
        assert getattr(param, "help", None), param.name
        for opt in param.opts:
            if opt.startswith("--"):
                assert opt in text
    for env_name in ("MCP_ENDPOINT", "MCP_CONFIG", "LOG_LEVEL"):
        assert env_name in text


# ----------------------------------------------------------------------------- inputs


def test_endpoint_comes_from_flag_then_environment_then_dotenv(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(
        "# comment\n"
        "export MCP_ENDPOINT='ws://from-dotenv/mcp/?token=a'\n"
        'EXTRA="quoted value"\n'
        "PLAIN=plain # comment\n"
        "not a pair\n"
    )
    command = [sys.executable, str(SERVER)]

    def endpoint(flag: str | None, environ: dict[str, str]) -> str:
        url, _ = prepare(
            endpoint=flag, config=None, command=command, name=None, environ=environ, cwd=tmp_path
        )
        return url

    assert endpoint(None, {}) == "ws://from-dotenv/mcp/?token=a"
    assert endpoint(None, {"MCP_ENDPOINT": "wss://env/x"}) == "wss://env/x"
    assert endpoint("ws://flag/y", {"MCP_ENDPOINT": "wss://env/x"}) == "ws://flag/y"
    _, [spec] = prepare(
        endpoint=None,
        config=None,
        command=command,
        name=None,
        environ={"PLAIN": "from environ"},
        cwd=tmp_path,
    )
    assert spec.name == "stdio_server"
    assert spec.command == tuple(command)
    # .env values reach the child, as with mcp_pipe.py's load_dotenv(); the environment wins.
    assert spec.env["EXTRA"] == "quoted value"
    assert spec.env["PLAIN"] == "from environ"
    assert "MCP_ENDPOINT" not in spec.env  # the token stays with the pipe


def test_read_dotenv(tmp_path: Path) -> None:
    path = tmp_path / ".env"
    path.write_text("A=1\n B = two \nC='x=y'\nD=\"\"\nE=v # c\nF='keep # this'\n=nokey\n")
    assert read_dotenv(path) == {
        "A": "1",
        "B": "two",
        "C": "x=y",
        "D": "",
        "E": "v",
        "F": "keep # this",
    }
    assert read_dotenv(tmp_path / "missing") == {}


def test_config_is_found_by_flag_environment_or_default(tmp_path: Path) -> None:
    entry = {"command": sys.executable, "args": [str(SERVER)]}
    for name in ("default", "from-env", "from-flag"):
        path = tmp_path / ("mcp_config.json" if name == "default" else f"{name}.json")
        path.write_text(json.dumps({"mcpServers": {name: entry}}))

    def names(config: Path | None, environ: dict[str, str]) -> list[str]:
        _, servers = prepare(
            endpoint="ws://h/", config=config, command=[], name=None, environ=environ, cwd=tmp_path
        )
        return [spec.name for spec in servers]

    assert names(None, {}) == ["default"]
    assert names(None, {"MCP_CONFIG": "from-env.json"}) == ["from-env"]
    assert names(Path("from-flag.json"), {"MCP_CONFIG": "from-env.json"}) == ["from-flag"]
    with pytest.raises(PipeConfigError, match="not both"):
        prepare(
            endpoint="ws://h/",
            config=Path("from-flag.json"),
            command=["python"],
            name=None,
            environ={},
            cwd=tmp_path,
        )


def fake_python(directory: Path, pythonpath: Path | None = None) -> Path:
    """A ``python`` for PATH that is our interpreter with its own PYTHONPATH: the user's
    active environment, whose packages trio-mcp-relay's own interpreter does not have."""
    directory.mkdir(parents=True, exist_ok=True)
    python = directory / "python"
    extra = f'PYTHONPATH="{pythonpath}" ' if pythonpath is not None else ""
    python.write_text(f'#!/bin/sh\n{extra}exec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    return python


def test_a_lone_python_script_runs_with_the_python_on_path(tmp_path: Path) -> None:
    with pytest.raises(PipeConfigError, match=r"no such script: calc\.py"):
        prepare(
            endpoint="ws://h/",
            config=None,
            command=["calc.py"],
            name=None,
            environ={},
            cwd=tmp_path,
        )
    (tmp_path / "calc.py").write_text("")
    python = fake_python(tmp_path / "bin")
    found = {"PATH": str(python.parent)}
    for environ, flag, expected in (
        (found, None, str(python)),
        (found, sys.executable, sys.executable),
    ):
        _, [spec] = prepare(
            endpoint="ws://h/",
            config=None,
            command=["calc.py"],
            name=None,
            environ=environ,
            cwd=tmp_path,
            python=flag,
        )
        assert spec.command == (expected, "calc.py")
        assert spec.name == "calc"
    with pytest.raises(PipeConfigError, match=r"no python on PATH to run calc\.py: .*--python"):
        prepare(
            endpoint="ws://h/",
            config=None,
            command=["calc.py"],
            name=None,
            environ={"PATH": str(tmp_path / "empty")},
            cwd=tmp_path,
        )


async def test_a_script_whose_dependencies_live_only_in_the_active_environment_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    deps = tmp_path / "site"
    deps.mkdir()
    (deps / "kitchen_dep.py").write_text("GREETING = 'from the user environment'\n")
    script = tmp_path / "server.py"
    script.write_text(
        "import runpy, sys, kitchen_dep\n"
        f"sys.argv = [{str(SERVER)!r}]\n"
        f"runpy.run_path({str(SERVER)!r}, run_name='__main__')\n"
    )
    python = fake_python(tmp_path / "bin", deps)
    monkeypatch.chdir(tmp_path)
    environ = {**os.environ, "PATH": f"{python.parent}{os.pathsep}{os.environ['PATH']}"}
    url_unused = "ws://127.0.0.1:9/mcp/?token=x"
    _, [spec] = prepare(
        endpoint=url_unused,
        config=None,
        command=["server.py"],
        name=None,
        environ=environ,
        cwd=tmp_path,
    )
    with trio.fail_after(TIMEOUT):
        async with open_nursery_then_cancel() as nursery:
            relay = await start_relay(nursery)
            await start_pipe(nursery, relay.tool_url("calc"), [spec])
            await wait_for_counts(relay, tools=1, callers=0)
            async with peer(relay.caller_url("calc")) as caller:
                await initialize(caller)
                assert await call(caller, 1, "add", a=1, b=2) == "3"


async def test_a_missing_module_is_reported_once_and_restarts_are_bounded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    script = tmp_path / "broken.py"
    script.write_text("import no_such_kitchen_module\n")
    spec = ServerSpec("broken", (sys.executable, str(script)), dict(os.environ))
    options = attrs.evolve(FAST, max_restarts=3, backoff_initial=0.01, backoff_max=0.02)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            fake = await start_fake_endpoint(nursery)
            with pytest.raises(PipeFailed) as failed:
                await run_pipe(fake.url(), [spec], options)
            nursery.cancel_scope.cancel()
    assert str(failed.value) == (
        "the MCP server 'broken' exited 4 times in a row, each within 30 s of starting "
        "(No module named 'no_such_kitchen_module'); not restarting it"
    )
    hints = [r.getMessage() for r in caplog.records if "cannot import" in r.getMessage()]
    assert len(hints) == 1
    assert "no_such_kitchen_module" in hints[0] and "--python" in hints[0]


def test_redact_url() -> None:
    shown = redact_url(f"wss://api.xiaozhi.me/mcp/?token={SECRET}&x=1")
    assert SECRET not in shown
    assert shown == "wss://api.xiaozhi.me/mcp/?token=SECR…&x=1"


def test_logged_endpoints_show_only_the_start_of_the_token() -> None:
    url = f"wss://api.xiaozhi.me/mcp/?x=1&token={SECRET}"
    assert shown_endpoint(url) == "wss://api.xiaozhi.me/mcp/ (token SECR…)"
    assert shown_endpoint("ws://127.0.0.1:8004/mcp/") == "ws://127.0.0.1:8004/mcp/"


# ----------------------------------------------------------------------------- pure parts


def test_backoff_doubles_up_to_the_cap_with_jitter_and_resets() -> None:
    exact = Backoff(1.0, 60.0, jitter=0.2, uniform=lambda low, high: 1.0)
    assert [exact.next_delay() for _ in range(8)] == [1, 2, 4, 8, 16, 32, 60, 60]
    exact.reset()
    assert exact.next_delay() == 1
    low = Backoff(1.0, 60.0, jitter=0.2, uniform=lambda low, high: low)
    high = Backoff(1.0, 60.0, jitter=0.2, uniform=lambda low, high: high)
    assert [low.next_delay() for _ in range(3)] == pytest.approx([0.8, 1.6, 3.2])
    assert [high.next_delay() for _ in range(7)][-1] == 60  # never above the cap
    real = Backoff(1.0, 60.0)
    for _ in range(20):
        assert 0 < real.next_delay() <= 60


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=20,
)


@given(json_values, st.sampled_from([None, 2, 4]))
def test_compact_line_is_one_line_of_the_same_json(value: Any, indent: int | None) -> None:
    text = json.dumps(value, indent=indent, ensure_ascii=False)
    line = compact_line(text)
    assert b"\n" not in line
    assert json.loads(line) == json.loads(text)
    assert compact_line(line) == line


@given(
    st.lists(st.binary().filter(lambda b: b"\n" not in b), max_size=10),
    st.lists(st.integers(1, 20), min_size=1, max_size=50),
)
def test_line_splitter_finds_the_same_lines_in_any_chunking(
    lines: list[bytes], cuts: list[int]
) -> None:
    data = b"".join(line + b"\n" for line in lines)
    splitter = _LineSplitter(limit=1000)
    out: list[bytes | None] = []
    position = 0
    for size in cuts * (len(data) // len(cuts) + 1):
        out += splitter.feed(data[position : position + size])
        position += size
        if position >= len(data):
            break
    out += splitter.finish()
    assert out == lines


def test_line_splitter_drops_overlong_lines_once() -> None:
    splitter = _LineSplitter(limit=8)
    assert splitter.feed(b"short\n0123456789") == [b"short", None]
    assert splitter.feed(b"0123456789") == []
    assert splitter.feed(b"tail\nnext") == []
    assert splitter.feed(b"\n" + b"x" * 20 + b"\nok\n") == [b"next", None, b"ok"]
    assert splitter.finish() == []
    unterminated = _LineSplitter(limit=8)
    assert unterminated.feed(b"last") == []
    assert unterminated.finish() == [b"last"]


def test_session_gives_the_child_its_own_ids_and_restores_the_endpoints() -> None:
    session = _Session()
    first = session.new_generation()
    line, child_id = session.to_child({"jsonrpc": "2.0", "id": 5, "method": "tools/call"}, first)
    assert child_id is not None
    assert json.loads(line)["id"] == child_id
    # The endpoint cancels its request 5: the child hears of its own id.
    cancel = {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 5}}
    line, _ = session.to_child(cancel, first)
    assert json.loads(line)["params"]["requestId"] == child_id
    # A new connection reuses id 5 while the old request is still in flight.
    second = session.new_generation()
    _, reused = session.to_child({"jsonrpc": "2.0", "id": 5, "method": "ping"}, second)
    assert reused != child_id
    # Answers come back with id 5, each tagged with the connection that asked.
    for answered, generation in ((reused, second), (child_id, first)):
        outcome, line, tag = session.from_child(
            json.dumps({"jsonrpc": "2.0", "id": answered, "result": {}}).encode()
        )
        assert outcome is _Outcome.FORWARD
        assert json.loads(line) == {"jsonrpc": "2.0", "id": 5, "result": {}}
        assert tag == generation
    assert session.pending == {}
    # Lines that are not answers to our requests pass untouched; junk is flagged.
    note = b'{"jsonrpc": "2.0", "method": "notifications/message"}'
    assert session.from_child(note) == (_Outcome.FORWARD, note, None)
    assert session.from_child(b"Server started!")[0] is _Outcome.NOT_JSON


# Ids that break naive id tables, all in flight at once: 1 and "1" and 1.0, 0 and "", floats,
# integers far beyond 64 bits.
TOGETHER = [1, "1", 1.0, 0, "", 0.0, 1.5, -2.5e-300, 2**64, -(2**70), 10**30, "0"]


@given(
    st.lists(testing.ids(), max_size=12).flatmap(lambda extra: st.permutations(TOGETHER + extra)),
    st.randoms(use_true_random=False),
)
def test_every_endpoint_id_comes_back_exactly_whatever_else_is_in_flight(
    endpoint_ids: list[Any], rnd: Any
) -> None:
    session = _Session()
    generation = session.new_generation()
    sent = []
    for n, rid in enumerate(endpoint_ids):
        frame = {"jsonrpc": "2.0", "id": rid, "method": "tools/call", "params": {"n": n}}
        line, child_id = session.to_child(frame, generation)
        assert _loads(line) == {**frame, "id": child_id}
        sent.append((child_id, rid, n))
    assert len({child_id for child_id, _, _ in sent}) == len(sent)
    rnd.shuffle(sent)  # the child answers in any order
    for child_id, rid, n in sent:
        answer = dumps({"jsonrpc": "2.0", "id": child_id, "result": {"n": n}})
        outcome, line, tag = session.from_child(answer)
        back = _loads(line)
        assert outcome is _Outcome.FORWARD and tag == generation
        assert testing.same_json(back["id"], rid), (back["id"], rid)
        assert back["result"] == {"n": n}
    assert session.pending == {}


HTTP_SERVER = Path(__file__).parent / "data" / "http_server.py"


@asynccontextmanager
async def sdk_http_server(port: int, log: Path, *transport: str) -> AsyncIterator[None]:
    """The official SDK's Streamable HTTP server on 127.0.0.1:port, until the block ends
    (its output is appended to ``log``)."""
    pytest.importorskip("mcp")
    with log.open("ab") as output:
        process = await trio.lowlevel.open_process(
            [sys.executable, str(HTTP_SERVER), str(port), *transport], stdout=output, stderr=output
        )
    try:
        while True:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                await trio.sleep(0.05)
                continue
            await stream.aclose()
            break
        yield
    finally:
        process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def call_until_it_works(caller: WebSocketConnection, first_id: int) -> str:
    """Call add until the remote server answers (it may be reconnecting)."""
    rid = first_id
    while True:
        answer = await rpc(
            caller, rid, "tools/call", {"name": "add", "arguments": {"a": 2, "b": 5}}
        )
        if "result" in answer:
            return answer["result"]["content"][0]["text"]  # type: ignore[no-any-return]
        rid += 1
        await trio.sleep(0.1)


async def test_an_http_entry_bridges_a_streamable_http_server_and_reconnects(
    tmp_path: Path,
) -> None:
    with trio.fail_after(60):
        port = _free_port()
        config = tmp_path / "mcp_config.json"
        entry = {
            "type": "http",
            "url": f"http://127.0.0.1:{port}/mcp",
            "headers": {"Authorization": "Bearer kitchen"},
        }
        config.write_text(json.dumps({"mcpServers": {"kitchen": entry}}))
        servers = load_config_file(config, environ=dict(os.environ))
        log = tmp_path / "server.log"
        try:
            await _bridge_and_reconnect(servers, port, log)
        except trio.TooSlowError:
            pytest.fail("timed out; the SDK server logged:\n" + log.read_text(errors="replace"))


async def _bridge_and_reconnect(servers: list[ServerSpec], port: int, log: Path) -> None:
    with trio.fail_after(60):
        async with open_nursery_then_cancel() as nursery:
            relay = await start_relay(nursery)
            async with sdk_http_server(port, log):
                await start_pipe(nursery, relay.tool_url("kitchen"), servers)
                await wait_for_counts(relay, tools=1, callers=0)
                async with peer(relay.caller_url("kitchen")) as caller:
                    init = await initialize(caller)
                    assert init["result"]["serverInfo"]["name"] == "kitchen-http"
                    listed = await rpc(caller, 1, "tools/list")
                    names = [t["name"] for t in listed["result"]["tools"]]
                    assert names == ["add", "echo"]
                    assert await call(caller, 2, "echo", text="héllo") == "héllo"
            # The server goes away and comes back: its session is gone, the pipe starts a
            # new one (replaying the caller's initialize) and calls work again.
            async with sdk_http_server(port, log), peer(relay.caller_url("kitchen")) as caller:
                assert await call_until_it_works(caller, 10) == "7"


async def test_an_sse_entry_bridges_an_http_sse_server(tmp_path: Path) -> None:
    port = _free_port()
    entry = {
        "type": "sse",
        "url": f"http://127.0.0.1:{port}/sse",
        "headers": {"Authorization": "Bearer kitchen"},
    }
    servers = parse_config(
        {"mcpServers": {"kitchen": entry}}, source="test", environ=dict(os.environ)
    )
    log = tmp_path / "server.log"
    with trio.fail_after(60):
        async with open_nursery_then_cancel() as nursery:
            relay = await start_relay(nursery)
            async with sdk_http_server(port, log, "sse"):
                await start_pipe(nursery, relay.tool_url("kitchen"), servers)
                await wait_for_counts(relay, tools=1, callers=0)
                async with peer(relay.caller_url("kitchen")) as caller:
                    init = await initialize(caller)
                    assert init["result"]["serverInfo"]["name"] == "kitchen-http", log.read_text()
                    listed = await rpc(caller, 1, "tools/list")
                    assert [t["name"] for t in listed["result"]["tools"]] == ["add", "echo"]
                    assert await call(caller, 2, "add", a=40, b=2) == "42"
