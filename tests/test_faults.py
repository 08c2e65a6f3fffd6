"""Faults, limits and hostile input against a live relay on a loopback port.

Every test here breaks something on purpose (a peer that stops reading, never answers a ping,
floods, lies or sends garbage) and then checks what the *other* peers see: their round trips
keep completing, their answers carry their own ids, their connections stay up.

Peers that misbehave cannot be trio-websocket clients (it reads in the background and answers
pings by itself), so they are :class:`RawClient`: wsproto driven by hand on a socket the test
owns, which reads only when asked, answers pings only when told to, and can be given a tiny
receive buffer so that the relay's writes to it really block.

Timing: the relay runs with small limits (fractions of a second), and every wait is bounded by a
``trio.fail_after``. Lower bounds ("not closed before the grace period") are measured with
``trio.current_time()``, the same clock the relay uses, since both run in one Trio run.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import attrs
import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Event,
    Message,
    Ping,
    TextMessage,
)
from wsproto.events import Request as WsRequest

from tests.helpers import (
    CUSTOM,
    KEY,
    RunningRelay,
    health,
    http_get,
    notification,
    peer,
    recv,
    request,
    result,
    send,
    start_relay,
    tool_peer,
    wait_for_counts,
)
from trio_mcp_relay._auth import encrypt_token
from trio_mcp_relay._config import RelayConfig

TIMEOUT = 5
#: A receive buffer so small that a peer which does not read stops the relay's writes to it
#: after a few kilobytes (the kernel rounds it up to its minimum, about 2 KiB).
TINY_RCVBUF = 1024
#: Frames this large outgrow whatever the kernel buffers between the relay and a stalled
#: peer: on Linux the relay's send buffer autotunes up to ``tcp_wmem[2]`` (4 MiB by default).
BIG = 2_500_000

# ----------------------------------------------------------------------------- frames


def masked_frame(opcode: int, payload: bytes) -> bytes:
    """One final client-to-server frame, masked with a zero key (so the payload is as is)."""
    n = len(payload)
    if n < 126:
        header = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 65536:
        header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    return header + b"\0\0\0\0" + payload


OP_TEXT, OP_BINARY = 0x1, 0x2

# ----------------------------------------------------------------------------- raw client


class Closed(Exception):
    """The relay closed a :class:`RawClient`: its close code (1006 for a bare TCP close)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason


@attrs.define(eq=False)
class RawClient:
    """A WebSocket client with nothing in the background: it does only what the test says."""

    stream: trio.SocketStream
    ws: WSConnection
    events: deque[Event] = attrs.Factory(deque)
    pings: int = 0

    async def _read(self) -> None:
        try:
            data = await self.stream.receive_some(65536)
        except trio.BrokenResourceError:  # reset by the relay
            data = b""
        if self.ws.state is not ConnectionState.CLOSED:
            self.ws.receive_data(bytes(data) or None)
            self.events.extend(self.ws.events())
        elif not data:
            raise Closed(1006, "EOF after close")

    async def next_event(self) -> Event:
        while not self.events:
            await self._read()
        return self.events.popleft()

    async def receive(self, *, pong: bool = True) -> str | bytes:
        """The next message. Pings are answered only if ``pong``; a close raises Closed."""
        parts: list[Any] = []
        while True:
            event = await self.next_event()
            if isinstance(event, Message):
                parts.append(event.data)
                if event.message_finished:
                    return "".join(parts) if isinstance(event, TextMessage) else b"".join(parts)
            elif isinstance(event, Ping):
                self.pings += 1
                if pong:
                    await self.send_raw(self.ws.send(event.response()))
            elif isinstance(event, CloseConnection):
                if self.ws.state is ConnectionState.REMOTE_CLOSING:
                    with _suppress_broken():
                        await self.send_raw(self.ws.send(event.response()))
                raise Closed(event.code, event.reason or "")

    async def receive_json(self, *, pong: bool = True) -> Any:
        return json.loads(await self.receive(pong=pong))

    async def expect_close(self, *, pong: bool = True) -> Closed:
        """Read (and discard messages) until the relay closes the connection."""
        with pytest.raises(Closed) as caught:
            while True:
                await self.receive(pong=pong)
        return caught.value

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def send_json(self, obj: Any) -> None:
        await self.send_raw(self.ws.send(TextMessage(data=json.dumps(obj))))


def _suppress_broken() -> contextlib.suppress:
    return contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError)


async def open_tcp(port: int, *, rcvbuf: int | None = None) -> trio.SocketStream:
    """A TCP connection to the relay; ``rcvbuf`` is set before connecting, so it sticks."""
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
    try:
        if rcvbuf is not None:
            sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, rcvbuf)
        await sock.connect(("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


@asynccontextmanager
async def raw_client(
    port: int, target: str, *, rcvbuf: int | None = None
) -> AsyncIterator[RawClient]:
    """A :class:`RawClient` past a successful handshake; the socket is closed on exit."""
    stream = await open_tcp(port, rcvbuf=rcvbuf)
    try:
        ws = WSConnection(ConnectionType.CLIENT)
        client = RawClient(stream, ws)
        handshake = WsRequest(host=f"127.0.0.1:{port}", target=target, extra_headers=[])
        await client.send_raw(ws.send(handshake))
        event = await client.next_event()
        assert isinstance(event, AcceptConnection), event
        yield client
    finally:
        await trio.aclose_forcefully(stream)


def target_of(url: str) -> str:
    """The path and query of a ws:// URL."""
    return "/" + url.split("/", 3)[3]


# ----------------------------------------------------------------------------- helpers


@asynccontextmanager
async def tool_and_callers(
    relay: RunningRelay, agent: str, n_callers: int, **kwargs: Any
) -> AsyncIterator[tuple[WebSocketConnection, list[WebSocketConnection]]]:
    """A trio-websocket tool and ``n_callers`` callers for ``agent``, registered."""
    before = await health(relay)
    async with AsyncExitStack() as stack:
        tool = await stack.enter_async_context(tool_peer(relay.tool_url(agent), **kwargs))
        callers = [
            await stack.enter_async_context(peer(relay.caller_url(agent), **kwargs))
            for _ in range(n_callers)
        ]
        await wait_for_counts(
            relay,
            tools=before["tool_connections"] + 1,
            callers=before["robot_connections"] + n_callers,
        )
        yield tool, callers


async def round_trip(tool: WebSocketConnection, caller: WebSocketConnection, rid: Any) -> None:
    """One request from ``caller`` answered by ``tool``; checks the answer is the caller's."""
    await send(caller, request(rid, CUSTOM, params={"probe": rid}))
    frame = await recv(tool)
    assert frame["params"] == {"probe": rid}
    await send(tool, result(frame["id"], {"probe": rid}))
    assert await recv(caller) == result(rid, {"probe": rid})


async def expect_close(ws: WebSocketConnection) -> tuple[int, str]:
    """Read until the relay closes a trio-websocket peer; its close code and reason."""
    with pytest.raises(ConnectionClosed) as caught:
        while True:
            await ws.get_message()
    assert caught.value.reason is not None
    return caught.value.reason.code, caught.value.reason.reason or ""


async def callers_of(relay: RunningRelay, agent: str) -> int:
    counts = await health(relay)
    return int(counts["robot_connections_by_agent"].get(agent, 0))


async def poll(predicate: Callable[[], Awaitable[bool]]) -> None:
    """Wait for something only visible over the network (the relay has no event for it)."""
    while True:
        if await predicate():
            return
        await trio.sleep(0.01)


@pytest.fixture(autouse=True)
def no_relay_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Faults end peers, never the relay: nothing here may log an unexpected exception."""
    yield
    records = [r for phase in ("setup", "call") for r in caplog.get_records(phase)]
    errors = [
        logging.Formatter().format(r)
        for r in [*records, *caplog.records]
        if r.name.startswith("trio_mcp_relay") and r.levelno >= logging.ERROR
    ]
    assert not errors, errors


@attrs.frozen
class Embedded:
    """A relay started through ``serve_relay(config, shutdown=...)``."""

    relay: RunningRelay
    shutdown: trio.Event
    returned: trio.Event


# ----------------------------------------------------------------------------- 1. stalled caller


# ----------------------------------------------------------------------------- 2. deaf tool


# ----------------------------------------------------------------------------- 3. limits


async def test_max_message_size_closes_the_sender_with_1009(nursery: trio.Nursery) -> None:
    relay = await start_relay(nursery, max_message_size=1000)
    with trio.fail_after(TIMEOUT):
        async with tool_and_callers(relay, "size", 2) as (tool, [big, small]):
            await send(big, request("big", CUSTOM, params={"data": "y" * 1000}))
            code, reason = await expect_close(big)
            assert code == 1009
            assert "1000" in reason
            # The frame never reached the tool: the next thing it sees is this probe.
            await round_trip(tool, small, "small")
            await wait_for_counts(relay, tools=1, callers=1)
            # The limit applies to tools too.
            await send(tool, notification("notifications/message", {"data": "y" * 1000}))
            code, _ = await expect_close(tool)
            assert code == 1009
            await send(small, request("no-tool", CUSTOM))
            assert (await recv(small))["error"]["code"] == -32001


async def test_max_inflight_per_caller(nursery: trio.Nursery) -> None:
    relay = await start_relay(nursery, max_inflight_per_caller=2)
    with trio.fail_after(TIMEOUT):
        async with tool_and_callers(relay, "inflight", 2) as (tool, [alice, bob]):
            await send(alice, request("a1", CUSTOM))
            await send(alice, request("a2", CUSTOM))
            held = [await recv(tool), await recv(tool)]
            await send(alice, request("a3", CUSTOM))
            refused = await recv(alice)
            assert refused["id"] == "a3"
            assert refused["error"]["code"] == -32007
            assert "max_inflight_per_caller" in json.dumps(refused["error"])
            assert "2" in refused["error"]["data"]
            # The limit is per caller: Bob is not affected, and the tool never saw a3.
            await send(bob, request("b1", CUSTOM, params={"who": "bob"}))
            frame = await recv(tool)
            assert frame["params"] == {"who": "bob"}
            await send(tool, result(frame["id"], "for bob"))
            assert await recv(bob) == result("b1", "for bob")
            # Once one of Alice's requests is answered she may send another.
            await send(tool, result(held[0]["id"], "first"))
            assert await recv(alice) == result("a1", "first")
            await send(alice, request("a4", CUSTOM, params={"n": 4}))
            frame = await recv(tool)
            assert frame["params"] == {"n": 4}
            await send(tool, result(frame["id"], "fourth"))
            assert await recv(alice) == result("a4", "fourth")


async def test_max_callers_per_agent(nursery: trio.Nursery) -> None:
    relay = await start_relay(nursery, max_callers_per_agent=2)
    with trio.fail_after(TIMEOUT):
        async with tool_and_callers(relay, "crowded", 2) as (tool, [alice, bob]):
            async with peer(relay.caller_url("crowded")) as carol:
                code, reason = await expect_close(carol)
            assert code == 4002
            assert "limit 2" in reason
            await wait_for_counts(relay, tools=1, callers=2)
            await round_trip(tool, alice, "alice")
            await round_trip(tool, bob, "bob")
            # The limit is per agent: another agent's callers are not counted.
            async with tool_and_callers(relay, "elsewhere", 2) as (other_tool, others):
                for index, other in enumerate(others):
                    await round_trip(other_tool, other, index)
        # Once a caller has left there is room again.
        async with tool_and_callers(relay, "crowded", 2) as (tool, [alice, bob]):
            async with peer(relay.caller_url("crowded")) as carol:
                assert (await expect_close(carol))[0] == 4002
            await bob.aclose()
            await wait_for_counts(relay, tools=1, callers=1)
            async with peer(relay.caller_url("crowded")) as dave:
                await wait_for_counts(relay, tools=1, callers=2)
                await round_trip(tool, dave, "dave")
            await round_trip(tool, alice, "alice again")


UPGRADE = {
    "Connection": "Upgrade",
    "Upgrade": "websocket",
    "Sec-WebSocket-Version": "13",
    "Sec-WebSocket-Key": "MDEyMzQ1Njc4OWFiY2RlZg==",
}


async def test_max_connections_answers_503(nursery: trio.Nursery) -> None:
    relay = await start_relay(nursery, max_connections=3)
    token = quote(relay.token("full"), safe="")
    with trio.fail_after(TIMEOUT):
        # Two peers plus the health check that confirms them: three connections at most.
        async with tool_and_callers(relay, "full", 1) as (tool, [caller]):
            async with raw_client(relay.port, target_of(relay.caller_url("full"))) as third:
                # Every connection counts, whatever it is: a fourth is refused...
                upgrade = await http_get(relay.port, f"/mcp_endpoint/call/?token={token}", UPGRADE)
                assert upgrade.status == 503
                assert "sec-websocket-accept" not in upgrade.headers
                plain = await http_get(relay.port, f"/mcp_endpoint/health?key={KEY}")
                assert plain.status == 503
                assert "limit 3" in plain.json()["error"]
                # ...and those already open keep working.
                await round_trip(tool, caller, "inside the limit")
                await third.send_json(request("third", CUSTOM))
                frame = await recv(tool)
                await send(tool, result(frame["id"], "ok"))
                assert await third.receive_json() == result("third", "ok")

            # One left: the next connection is served again.
            async def served() -> bool:
                health_check = f"/mcp_endpoint/health?key={KEY}"
                return (await http_get(relay.port, health_check)).status == 200

            await poll(served)


async def test_max_tool_requests(nursery: trio.Nursery) -> None:
    relay = await start_relay(nursery, max_tool_requests=1)
    sampling = {"messages": [], "maxTokens": 10}
    with trio.fail_after(TIMEOUT):
        async with tool_and_callers(relay, "asker", 1) as (tool, [caller]):
            # Tool requests go to a caller with a request in flight to that tool.
            await send(caller, request("work", CUSTOM))
            work = await recv(tool)
            await send(tool, request("s1", "sampling/createMessage", sampling))
            asked = await recv(caller)
            assert asked["method"] == "sampling/createMessage"
            await send(tool, request("s2", "sampling/createMessage", sampling))
            refused = await recv(tool)
            assert refused["id"] == "s2"
            assert refused["error"]["code"] == -32007
            assert "max_tool_requests" in refused["error"]["data"]
            # The caller never saw s2: its answer to s1 reaches the tool with the tool's id.
            await send(caller, result(asked["id"], {"content": "hi"}))
            assert await recv(tool) == result("s1", {"content": "hi"})
            await send(tool, request("s3", "roots/list"))
            asked = await recv(caller)
            assert asked["method"] == "roots/list"
            await send(caller, result(asked["id"], {"roots": []}))
            assert await recv(tool) == result("s3", {"roots": []})
            await send(tool, result(work["id"], "done"))
            assert await recv(caller) == result("work", "done")


# ----------------------------------------------------------------------------- 4. request timeout


# ----------------------------------------------------------------------------- 5. liveness


async def read_until_closed(stream: trio.SocketStream) -> bytes:
    """Everything the relay sends until it closes (a reset counts as closed)."""
    data = b""
    try:
        while chunk := await stream.receive_some(65536):
            data += chunk
    except trio.BrokenResourceError:
        pass
    return data


# ----------------------------------------------------------------------------- 6. shutdown


async def connection_refused(port: int) -> bool:
    """Whether a new TCP connection is refused, or closed without an answer."""
    try:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    except OSError:
        return True
    async with stream:
        with _suppress_broken():
            await stream.send_all(b"GET /mcp_endpoint/ HTTP/1.1\r\nHost: x\r\n\r\n")
        return await read_until_closed(stream) == b""


# ----------------------------------------------------------------------------- 7. SIGTERM


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM")
async def test_sigterm_lets_requests_in_flight_finish(tmp_path: Path) -> None:
    with trio.fail_after(30):
        port = free_port()
        command = [
            sys.executable, "-m", "trio_mcp_relay", "serve",
            "--host", "127.0.0.1", "--port", str(port), "--key", KEY,
            "--data-dir", str(tmp_path), "--shutdown-grace", "2",
        ]  # fmt: skip
        # The settings the command line does not give must not come from this environment.
        unset = {"HOST", "PORT", "SERVER_KEY", "ADMIN_KEY", "DATA_DIR", "LOG_LEVEL"}
        env = {k: v for k, v in os.environ.items() if k not in unset}
        with (tmp_path / "relay.log").open("wb") as log_file:
            process = await trio.lowlevel.open_process(
                command, stdout=subprocess.PIPE, stderr=log_file, env=env
            )
        assert process.stdout is not None
        try:
            with trio.fail_after(10):
                banner = b""
                while b"listening on" not in banner:
                    chunk = await process.stdout.receive_some(4096)
                    assert chunk, (tmp_path / "relay.log").read_text()
                    banner += chunk
                relay = RunningRelay(port=port, config=RelayConfig(key=KEY))
                async with tool_and_callers(relay, "sigterm", 1) as (tool, [caller]):
                    ids = ["one", "two", "three"]
                    for rid in ids:
                        await send(caller, request(rid, CUSTOM, params={"rid": rid}))
                    frames = [await recv(tool) for _ in ids]
                    process.send_signal(signal.SIGTERM)
                    # The relay has begun its shutdown once it stops accepting connections...
                    await poll(functools.partial(connection_refused, port))
                    await send(caller, request("refused", CUSTOM))
                    assert (await recv(caller))["error"]["code"] == -32003
                    # ...and the requests in flight still get their answers from the tool.
                    for frame in frames:
                        await send(tool, result(frame["id"], frame["params"]["rid"]))
                    for rid in ids:
                        assert await recv(caller) == result(rid, rid)
                    assert (await expect_close(caller))[0] == 1001
                    assert (await expect_close(tool))[0] == 1001
                with trio.fail_after(5):
                    assert await process.wait() == 0
        finally:
            if process.returncode is None:
                process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()
                await process.stdout.aclose()


# ----------------------------------------------------------------------------- 8. security

ADMIN_KEY = "admin-only-9f8e7d6c5b4a39281706"


async def test_health_with_an_admin_key_refuses_the_server_key(nursery: trio.Nursery) -> None:
    relay = await start_relay(nursery, admin_key=ADMIN_KEY, auth_failures=100)
    with trio.fail_after(TIMEOUT):
        ok = await http_get(relay.port, f"/mcp_endpoint/health?key={quote(ADMIN_KEY)}")
        assert ok.status == 200
        assert ok.json()["result"]["status"] == "success"
        # Near misses of every kind: the server key, prefixes, extensions, another length,
        # non-ASCII text (compared as bytes, never raising).
        for wrong in [KEY, ADMIN_KEY[:-1], ADMIN_KEY + "0", ADMIN_KEY.upper(), "ключ", ""]:
            response = await http_get(relay.port, f"/mcp_endpoint/health?key={quote(wrong)}")
            assert response.status == 403, wrong
            assert b"success" not in response.body
            assert response.json()["error"]["code"] == -32004
            assert ADMIN_KEY.encode() not in response.body
        # Tokens are still made with the server key, not the admin key.
        async with tool_and_callers(relay, "admin", 1) as (tool, [caller]):
            await round_trip(tool, caller, "tokens use the server key")


async def test_an_address_that_keeps_failing_gets_429_but_never_for_a_valid_credential(
    nursery: trio.Nursery,
) -> None:
    ban = 0.5
    relay = await start_relay(nursery, auth_failures=3, auth_window=10, auth_ban=ban)
    bad = quote(encrypt_token("not the server key", "victim"), safe="")
    health_target = f"/mcp_endpoint/health?key={KEY}"
    with trio.fail_after(TIMEOUT):
        # Peers connected before are not disturbed.
        async with tool_and_callers(relay, "established", 1) as (tool, [caller]):
            for url in (
                f"{relay.base}/mcp_endpoint/call/?token={bad}",
                f"{relay.base}/mcp_endpoint/mcp/",
            ):
                async with peer(url) as refused:
                    assert (await expect_close(refused))[0] == 1008
            wrong_key = await http_get(relay.port, "/mcp_endpoint/health?key=guess")
            assert wrong_key.status == 403
            # Three failures: further failing requests are refused at once, before any
            # handshake...
            upgrade = await http_get(relay.port, f"/mcp_endpoint/call/?token={bad}", UPGRADE)
            assert upgrade.status == 429
            assert 1 <= int(upgrade.headers["retry-after"]) <= 1 + ban
            assert "sec-websocket-accept" not in upgrade.headers
            wrong_again = await http_get(relay.port, "/mcp_endpoint/health?key=guess")
            assert wrong_again.status == 429
            assert b"success" not in wrong_again.body
            assert "retry-after" in wrong_again.headers
            # ...but a valid token and the right health key from the same address are not.
            assert (await http_get(relay.port, health_target)).status == 200
            async with peer(relay.caller_url("established")) as newcomer:
                await wait_for_counts(relay, tools=1, callers=2)
                await round_trip(tool, newcomer, "while failures are refused")
            # Only this address: 127.0.0.2 failing gets its 1008 (a 403 here), not a 429.
            other = await http_get(relay.port, "/mcp_endpoint/health?key=x", source="127.0.0.2")
            assert other.status == 403
            await round_trip(tool, caller, "during the refusal")
            await trio.sleep(ban)  # the point of the test: the refusal runs out
            async with peer(f"{relay.base}/mcp_endpoint/call/?token={bad}") as refused:
                assert (await expect_close(refused))[0] == 1008


async def test_browser_origins_are_checked_on_the_handshake(nursery: trio.Nursery) -> None:
    relay = await start_relay(nursery, allowed_origins=("https://good.example",))
    token = quote(relay.token("origins"), safe="")
    with trio.fail_after(TIMEOUT):
        evil = await http_get(
            relay.port,
            f"/mcp_endpoint/call/?token={token}",
            {**UPGRADE, "Origin": "https://evil.example"},
        )
        assert evil.status == 403
        assert "sec-websocket-accept" not in evil.headers
        allowed = [(b"Origin", b"https://good.example")]
        async with (
            tool_peer(relay.tool_url("origins"), extra_headers=allowed) as tool,
            peer(relay.caller_url("origins")) as no_origin,  # not a browser: no Origin
        ):
            await wait_for_counts(relay, tools=1, callers=1)
            await round_trip(tool, no_origin, "accepted")


@pytest.mark.parametrize(
    ("enable_cors", "allowed", "origin", "expected"),
    [
        (True, ("https://good.example",), "https://good.example", "https://good.example"),
        (True, ("https://good.example",), "https://evil.example", None),
        (True, ("*",), "https://any.example", "*"),
        (False, ("*",), "https://any.example", None),
        (False, ("https://good.example",), "https://good.example", None),
    ],
)
async def test_cors_headers_on_http_endpoints(
    nursery: trio.Nursery,
    enable_cors: bool,
    allowed: tuple[str, ...],
    origin: str,
    expected: str | None,
) -> None:
    relay = await start_relay(nursery, enable_cors=enable_cors, allowed_origins=allowed)
    with trio.fail_after(TIMEOUT):
        for method, target, status in [
            ("GET", "/mcp_endpoint/", 200),
            ("GET", f"/mcp_endpoint/health?key={KEY}", 200),
            ("OPTIONS", "/mcp_endpoint/health", 204),
        ]:
            response = await http_get(relay.port, target, {"Origin": origin}, method=method)
            assert response.status == status
            assert response.headers.get("access-control-allow-origin") == expected, target
            if expected is None:
                assert not any(name.startswith("access-control-") for name in response.headers)
            else:
                assert "GET" in response.headers["access-control-allow-methods"]


async def test_tokens_and_keys_never_reach_the_log(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    relay = await start_relay(nursery, admin_key=ADMIN_KEY, auth_failures=100)
    good_tool, good_caller = relay.tool_url("logged"), relay.caller_url("logged")
    secrets = {KEY, ADMIN_KEY, relay.token("logged")}
    wrong_key_token = encrypt_token("not the server key", "logged")
    garbage_token = "ThisIsNotAToken+But/SecretLooking=="
    secrets |= {wrong_key_token, garbage_token}
    secrets |= {quote(secret, safe="") for secret in secrets}
    with trio.fail_after(TIMEOUT):
        async with tool_and_callers(relay, "logged", 1) as (tool, [caller]):
            await round_trip(tool, caller, "logged")
            for token in (wrong_key_token, garbage_token):
                async with peer(f"{relay.base}/mcp_endpoint/call/?token={quote(token)}") as ws:
                    assert (await expect_close(ws))[0] == 1008
            for key in (KEY, ADMIN_KEY, garbage_token):
                await http_get(relay.port, f"/mcp_endpoint/health?key={quote(key)}")
            # A token in a request the relay cannot parse, and on a path it does not serve.
            for head in [
                f"GET /mcp_endpoint/call/?token={garbage_token} {KEY} HTTP/1.1\r\n\r\n",
                f"GET / HTTP/1.1\r\nHost: x\r\n{ADMIN_KEY}\r\n\r\n",
            ]:
                async with await open_tcp(relay.port) as stream:
                    await stream.send_all(head.encode())
                    assert (await read_until_closed(stream)).startswith(b"HTTP/1.1 400")
            upgrade = await http_get(
                relay.port, f"/elsewhere/?token={quote(garbage_token)}", UPGRADE
            )
            assert upgrade.status == 404
        del good_tool, good_caller
    # The relay's records only: trio-websocket, the test's own client, logs the URLs it dials.
    messages = [
        logging.Formatter().format(record)
        for record in caplog.records
        if record.name.startswith("trio_mcp_relay")
    ]
    assert any("1008" in m or "refused" in m for m in messages), "the session was not logged"
    for message in messages:
        for secret in secrets:
            assert secret not in message, (secret, message)


# ----------------------------------------------------------------------------- 9. hostile input


@attrs.frozen
class Arena:
    """A relay with a bystander agent (tool and caller) and a victim agent's tool."""

    relay: RunningRelay
    bystander_tool: WebSocketConnection
    bystander: WebSocketConnection
    victim_tool: WebSocketConnection

    def hostile(self, **kwargs: Any) -> Any:
        """A raw caller of the victim agent."""
        return raw_client(self.relay.port, target_of(self.relay.caller_url("victim")), **kwargs)


@asynccontextmanager
async def arena(nursery: trio.Nursery, **overrides: Any) -> AsyncIterator[Arena]:
    """Yield an :class:`Arena`; afterwards check that everyone is still served."""
    relay = await start_relay(nursery, **overrides)
    async with (
        tool_and_callers(relay, "bystander", 1) as (bystander_tool, [bystander]),
        tool_peer(relay.tool_url("victim")) as victim_tool,
    ):
        await wait_for_counts(relay, tools=2, callers=1)
        yield Arena(relay, bystander_tool, bystander, victim_tool)
        await round_trip(bystander_tool, bystander, "bystander after")
        async with peer(relay.caller_url("victim")) as newcomer:
            await round_trip(victim_tool, newcomer, "victim after")
        counts = await health(relay)
        assert counts["tool_connections"] == 2


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(256)) + b"\r\n\r\n",
        b"NOT HTTP AT ALL\r\n\r\n",
        b"GET / HTTP/1.1\r\n" + b"X" * 20000,  # a head that never ends
    ],
    ids=["tls-hello", "not-http", "endless-head"],
)
async def test_garbage_before_the_handshake_gets_400(nursery: trio.Nursery, garbage: bytes) -> None:
    with trio.fail_after(TIMEOUT):
        async with arena(nursery) as a, await open_tcp(a.relay.port) as stream:
            with _suppress_broken():
                await stream.send_all(garbage)
            answer = await read_until_closed(stream)
            # A head over the size limit may be cut off by a reset; otherwise the answer is 400.
            assert answer.startswith(b"HTTP/1.1 400") or (answer == b"" and len(garbage) > 16384)
            await round_trip(a.bystander_tool, a.bystander, "during")


async def test_invalid_utf8_in_a_text_frame_closes_with_1007(nursery: trio.Nursery) -> None:
    with trio.fail_after(TIMEOUT):
        async with arena(nursery) as a, a.hostile() as hostile:
            await hostile.send_raw(masked_frame(OP_TEXT, b'{"jsonrpc":"2.0","method":"\xff\xfe"}'))
            assert (await hostile.expect_close()).code == 1007
            # The frame was not forwarded: the victim's tool sees only the probe next.


@pytest.mark.parametrize(
    "payload",
    [
        '{"jsonrpc":"2.0","id":1,"method":"x","params":' + "[" * 100_000 + "]" * 100_000 + "}",
        '{"jsonrpc":"2.0","id":1,"method":"x","params":' + '{"a":' * 300 + "0" + "}" * 301,
        "[" * 1_000_000,
    ],
    ids=["100k-arrays", "300-objects", "unclosed-1M"],
)
async def test_deeply_nested_json_is_a_parse_error(nursery: trio.Nursery, payload: str) -> None:
    with trio.fail_after(TIMEOUT):
        async with arena(nursery) as a, a.hostile() as hostile:
            await hostile.send_raw(masked_frame(OP_TEXT, payload.encode()))
            answer = await hostile.receive_json()
            assert answer["error"]["code"] == -32700
            assert answer["id"] is None
            # The connection is still usable.
            await hostile.send_json(request("next", CUSTOM, params={"ok": True}))
            frame = await recv(a.victim_tool)
            assert frame["params"] == {"ok": True}
            await send(a.victim_tool, result(frame["id"], "fine"))
            assert await hostile.receive_json() == result("next", "fine")


async def test_huge_integer_ids_round_trip_exactly(nursery: trio.Nursery) -> None:
    ids = [10**100, -(10**40), 2**64, 2**63, -(2**63) - 1, 2**63 - 1]
    with trio.fail_after(TIMEOUT):
        async with arena(nursery) as a, a.hostile() as hostile:
            for rid in ids:
                await hostile.send_json(
                    request(rid, CUSTOM, params={"big": 7 * 10**60, "rid": str(rid)})
                )
            frames = [await recv(a.victim_tool) for _ in ids]
            assert len({f["id"] for f in frames}) == len(ids)
            for frame in frames:
                assert frame["params"]["big"] == 7 * 10**60
                await send(a.victim_tool, result(frame["id"], {"echo": 10**80}))
            for rid in ids:
                raw = await hostile.receive()
                assert isinstance(raw, str)
                answer = json.loads(raw)
                assert type(answer["id"]) is int
                assert answer["id"] == rid
                assert str(rid) in raw
                assert answer["result"] == {"echo": 10**80}


async def test_binary_frame_that_is_not_utf8_is_a_parse_error(nursery: trio.Nursery) -> None:
    with trio.fail_after(TIMEOUT):
        async with arena(nursery) as a, a.hostile() as hostile:
            await hostile.send_raw(masked_frame(OP_BINARY, b"\xff\xfe\x00\x01 not utf-8 \xc3"))
            answer = await hostile.receive_json()
            assert answer["error"]["code"] == -32700
            assert answer["id"] is None
            await hostile.send_json(request("after-binary", CUSTOM))
            frame = await recv(a.victim_tool)
            await send(a.victim_tool, result(frame["id"], "ok"))
            assert await hostile.receive_json() == result("after-binary", "ok")


async def test_a_burst_of_10000_notifications(nursery: trio.Nursery) -> None:
    n = 10_000
    with trio.fail_after(20):
        async with arena(nursery, outbox_size=4) as a, a.hostile() as hostile:
            burst = b"".join(
                masked_frame(
                    OP_TEXT, b'{"jsonrpc":"2.0","method":"notifications/n","params":[%d]}' % i
                )
                for i in range(n)
            )
            seen: list[int] = []
            async with trio.open_nursery() as bursting:
                bursting.start_soon(hostile.send_raw, burst)
                # The tool gets what fits its 4-frame queue, in order; the rest is dropped,
                # never buffered without bound...
                seen.append((await recv(a.victim_tool))["params"][0])
                # ...and another agent's round trip completes while the burst goes on.
                await round_trip(a.bystander_tool, a.bystander, "during")
                while seen[-1] != n - 1:
                    with trio.move_on_after(1) as quiet:  # what was dropped never comes
                        seen.append((await recv(a.victim_tool))["params"][0])
                    if quiet.cancelled_caught:
                        break
            assert seen == sorted(set(seen)) and seen, seen[:10]
            # The same 10,000 as one JSON batch: one error, as batches are not supported.
            batch = json.dumps([notification("notifications/n", [i]) for i in range(n)])
            await hostile.send_raw(masked_frame(OP_TEXT, batch.encode()))
            answer = await hostile.receive_json()
            assert answer["error"]["code"] == -32600
            await hostile.send_json(request("after-burst", CUSTOM))
            frame = await recv(a.victim_tool)
            while "id" not in frame:
                frame = await recv(a.victim_tool)
            await send(a.victim_tool, result(frame["id"], "ok"))
            assert await hostile.receive_json() == result("after-burst", "ok")


# ----------------------------------------------------------------------------- batches


async def test_messages_read_together_leave_together_and_in_order(
    relay: RunningRelay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Requests that reach the relay in one read are routed, then leave for their tool in
    one write (one system call there, one wake-up at the tool), in the order they came; the
    tool's answers reach the caller in order, each with its own id."""
    writes: list[bytes] = []
    real_write = os.write

    def recording_write(fd: int, data: Any) -> int:
        writes.append(bytes(data))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", recording_write)
    with trio.fail_after(10):
        async with (
            tool_and_callers(relay, "batches", 0) as (tool, _),
            raw_client(relay.port, target_of(relay.caller_url("batches"))) as caller,
        ):
            batch = [request(rid, CUSTOM, params={"n": n}) for n, rid in enumerate(["a", 7, 2**70])]
            writes.clear()
            frames = [masked_frame(OP_TEXT, json.dumps(f).encode()) for f in batch]
            await caller.send_raw(b"".join(frames))  # one write: the relay reads them at once
            forwarded = [await recv(tool) for _ in batch]
            assert [f["params"]["n"] for f in forwarded] == [0, 1, 2]
            assert len([w for w in writes if b'"n":' in w]) == 1, writes
            for f in forwarded:
                await send(tool, result(f["id"], {"n": f["params"]["n"]}))
            answers = [await caller.receive_json() for _ in batch]
            assert answers == [result(f["id"], {"n": f["params"]["n"]}) for f in batch]
