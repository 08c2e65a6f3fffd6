"""The HTTP front's request checks and security, over real sockets (issue #12).

A relay on port 0, a WebSocket tool behind it, httpx (under Trio) as the HTTP client. Each
refusal is checked for its status *and* its JSON-RPC error (code, id null): missing or unknown
sessions, Origin, MCP-Protocol-Version, batches, non-JSON, Content-Type, Accept, the body
limit, tokens (query, Bearer, scoped roles, the failure limiter). Then what must hold around
them: the caller's credentials never reach the tool, JSON or SSE answers as the client
accepts, 202 for notifications and responses, duplicate ids, keep-alive, the health count of
sessions, and a client sending garbage not slowing anyone else down.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import trio
from trio_websocket import WebSocketConnection

from trio_mcp_relay import scoped_token
from trio_mcp_relay._auth import TokenRole, encrypt_token
from trio_mcp_relay.core.catalog import SUPPORTED_PROTOCOL_VERSIONS

from .helpers import (
    KEY,
    RunningRelay,
    complete_initialization,
    health,
    open_tcp_from,
    peer,
    recv,
    request,
    send,
    start_relay,
)
from .httpclient import (
    ACCEPT_BOTH,
    JSON,
    SSE,
    McpHttp,
    answer_of,
    call_message,
    call_url,
    check_error,
    http_client,
    initialize_message,
    legacy_session,
    parse_sse,
)

GUARD = 20
INVALID_REQUEST = -32600
PARSE_ERROR = -32700
AUTHENTICATION_ERROR = -32004
UNSUPPORTED_VERSION = -32022
GOOD_ORIGIN = "https://good.example"
EVIL_ORIGIN = "https://evil.example"
#: Another client's address (Linux routes all of 127/8 locally): its failures and pending
#: connections are its own, as a stranger's would be.
STRANGER = "127.0.0.2"


class Tool:
    """A WebSocket tool server of one agent: ``echo`` answers its arguments (with a progress
    notification first when the call has a progress token), ``slow`` waits for its gate."""

    def __init__(self, ws: WebSocketConnection, frames: list[str]) -> None:
        self.ws = ws
        #: Every message the tool received, raw, its initialization included.
        self.frames = frames
        self.calls: list[dict[str, Any]] = []
        self.gates: dict[str, trio.Event] = {}
        self._called = trio.Event()

    def gate(self, name: str) -> trio.Event:
        return self.gates.setdefault(name, trio.Event())

    async def until_calls(self, count: int) -> None:
        while len(self.calls) < count:
            await self._called.wait()

    async def serve(self) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                raw = await self.ws.get_message()
                self.frames.append(raw if isinstance(raw, str) else raw.decode())
                message = json.loads(raw)
                if message.get("method") != "tools/call":
                    continue
                self.calls.append(message)
                self._called.set()
                self._called = trio.Event()
                nursery.start_soon(self._answer, message)

    async def _answer(self, message: dict[str, Any]) -> None:
        params = message["params"]
        arguments = params.get("arguments") or {}
        if params["name"] == "slow":
            await self.gate(arguments["gate"]).wait()
        token = (params.get("_meta") or {}).get("progressToken")
        if token is not None:
            progress = {"progressToken": token, "progress": 1, "total": 2}
            await send(
                self.ws, {"jsonrpc": "2.0", "method": "notifications/progress", "params": progress}
            )
        text = json.dumps(arguments, sort_keys=True)
        content = {"content": [{"type": "text", "text": text}]}
        await send(self.ws, {"jsonrpc": "2.0", "id": message["id"], "result": content})


@asynccontextmanager
async def running_tool(relay: RunningRelay, agent: str) -> AsyncIterator[Tool]:
    """A :class:`Tool` of ``agent``, initialized by the relay and serving."""
    frames: list[str] = []
    async with peer(relay.tool_url(agent)) as ws:

        async def receive() -> Any:
            raw = await ws.get_message()
            frames.append(raw if isinstance(raw, str) else raw.decode())
            return json.loads(raw)

        await complete_initialization(
            lambda frame: send(ws, frame), receive, tools=["echo", "slow"]
        )
        tool = Tool(ws, frames)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(tool.serve)
            yield tool
            nursery.cancel_scope.cancel()


async def serve_tool(
    relay: RunningRelay, agent: str, *, task_status: trio.TaskStatus[Tool]
) -> None:
    async with running_tool(relay, agent) as tool:
        task_status.started(tool)
        await trio.sleep_forever()


async def start(
    nursery: trio.Nursery, *agents: str, **overrides: Any
) -> tuple[RunningRelay, dict[str, Tool]]:
    """A relay (``overrides`` for :func:`start_relay`) with a :class:`Tool` for each agent."""
    relay = await start_relay(nursery, **overrides)
    tools = {agent: await nursery.start(serve_tool, relay, agent) for agent in agents}
    return relay, tools


def echoed(answer: Any, rid: Any) -> Any:
    """The arguments an ``echo`` answer carries (after checking it answers ``rid``)."""
    assert answer.get("id") == rid and "result" in answer, answer
    return json.loads(answer["result"]["content"][0]["text"])


async def ws_call(ws: WebSocketConnection, rid: int, arguments: dict[str, Any]) -> Any:
    """``echo`` from a WebSocket caller: its answer's arguments."""
    await send(ws, request(rid, "tools/call", {"name": "echo", "arguments": arguments}))
    while True:
        message = await recv(ws)
        if message.get("id") == rid and "method" not in message:
            return echoed(message, rid)


async def session_count(relay: RunningRelay, expected: int) -> None:
    """Until the health check counts ``expected`` HTTP sessions."""
    while True:
        if (await health(relay))["http_sessions"] == expected:
            return
        await trio.sleep(0.01)


# ---------------------------------------------------------------------------- sessions


async def test_a_request_without_a_session_id_is_400() -> None:
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery, http_client() as client:
            relay = await start_relay(nursery)
            mcp = McpHttp(client, call_url(relay, "a"))
            for message in (
                call_message(1, "echo"),
                {"jsonrpc": "2.0", "id": 2, "method": "tools/list"},
                {"jsonrpc": "2.0", "method": "notifications/initialized"},
            ):
                response = await mcp.post(message)
                error = check_error(response, 400, INVALID_REQUEST)
                assert "Mcp-Session-Id" in error["message"], error
                assert "mcp-session-id" not in response.headers
            assert (await health(relay))["http_sessions"] == 0
            nursery.cancel_scope.cancel()


async def test_an_unknown_session_id_is_404() -> None:
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery, http_client() as client:
            relay, _ = await start(nursery, "a")
            mcp = McpHttp(client, call_url(relay, "a"))
            real = await mcp.initialize()
            for bogus in ("no-such-session", real + "x", real[:-1], ""):
                response = await mcp.post(call_message(1, "echo"), session=bogus)
                check_error(response, 404, INVALID_REQUEST)
                check_error(await mcp.request("GET", bogus, accept=SSE), 404, INVALID_REQUEST)
                check_error(await mcp.request("DELETE", bogus), 404, INVALID_REQUEST)
            nursery.cancel_scope.cancel()


async def test_a_session_is_only_found_with_its_agents_token() -> None:
    with trio.fail_after(GUARD):
        async with (
            trio.open_nursery() as nursery,
            http_client() as client,
        ):
            relay = await start_relay(nursery)
            async with running_tool(relay, "a") as tool:
                mine = McpHttp(client, call_url(relay, "a"))
                theirs = McpHttp(client, call_url(relay, "b"))
                session = await mine.initialize()
                response = await theirs.post(call_message(1, "echo"), session=session)
                check_error(response, 404, INVALID_REQUEST)
                check_error(await theirs.request("GET", session, accept=SSE), 404, INVALID_REQUEST)
                check_error(await theirs.request("DELETE", session), 404, INVALID_REQUEST)
                assert tool.calls == []
                # The session is untouched: its own agent still uses it.
                assert echoed(await mine.call(session, 2, "echo", {"n": 2}), 2) == {"n": 2}
            nursery.cancel_scope.cancel()


async def test_a_legacy_session_id_is_no_streamable_session() -> None:
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery, http_client() as client:
            relay = await start_relay(nursery)
            mcp = McpHttp(client, call_url(relay, "a"))
            async with legacy_session(relay, "a") as legacy:
                response = await mcp.post(call_message(1, "echo"), session=legacy)
                check_error(response, 404, INVALID_REQUEST)
            nursery.cancel_scope.cancel()


async def test_a_deleted_session_is_404() -> None:
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery, http_client() as client:
            relay = await start_relay(nursery)
            async with running_tool(relay, "a"):
                mcp = McpHttp(client, call_url(relay, "a"))
                session = await mcp.initialize()
                other = await mcp.initialize()
                deleted = await mcp.request("DELETE", session)
                assert deleted.status_code == 204 and deleted.content == b""
                check_error(await mcp.post(call_message(1, "echo"), session=session), 404, -32600)
                check_error(await mcp.request("GET", session, accept=SSE), 404, INVALID_REQUEST)
                check_error(await mcp.request("DELETE", session), 404, INVALID_REQUEST)
                # Only that session ended.
                assert echoed(await mcp.call(other, 2, "echo"), 2) == {}
            nursery.cancel_scope.cancel()


async def test_a_failed_initialize_leaves_no_session() -> None:
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery, http_client() as client:
            relay = await start_relay(nursery, max_callers_per_agent=3)
            mcp = McpHttp(client, call_url(relay, "a"))
            for accept in (JSON, SSE, ACCEPT_BOTH):
                response = await mcp.post(initialize_message(), accept=accept)
                answer = answer_of(response)
                assert answer["error"]["code"] == -32001, answer  # no tool connected
            # MCP gives a session with an InitializeResult only; an agent's client retrying
            # while its tool is away must not use up the agent's callers.
            with trio.move_on_after(2):
                await session_count(relay, 0)
            assert (await health(relay))["http_sessions"] == 0
            async with running_tool(relay, "a"):
                await mcp.initialize()
            nursery.cancel_scope.cancel()


async def test_get_and_delete_without_a_session_id_are_400() -> None:
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery, http_client() as client:
            relay, _ = await start(nursery, "a")
            mcp = McpHttp(client, call_url(relay, "a"))
            session = await mcp.initialize()
            for method in ("GET", "DELETE"):
                response = await mcp.request(method, None, accept=SSE)
                error = check_error(response, 400, INVALID_REQUEST)
                assert "Mcp-Session-Id" in error["message"], error
            # The GET stream is SSE: a GET accepting only JSON is not acceptable.
            check_error(await mcp.request("GET", session, accept=JSON), 406, INVALID_REQUEST)
            assert (await health(relay))["http_sessions"] == 1  # the DELETE ended nothing
            nursery.cancel_scope.cancel()


async def test_initialize_inside_a_session_and_unserved_methods_are_refused() -> None:
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery, http_client() as client:
            relay, _ = await start(nursery, "a")
            mcp = McpHttp(client, call_url(relay, "a"))
            session = await mcp.initialize()
            again = await mcp.post(initialize_message(5), session=session)
            check_error(again, 400, INVALID_REQUEST)
            assert "mcp-session-id" not in again.headers
            put = await client.put(mcp.url, content=b"{}", headers={"content-type": JSON})
            check_error(put, 405, INVALID_REQUEST)
            assert put.headers["allow"] == "GET, POST, DELETE"
            nursery.cancel_scope.cancel()


# ---------------------------------------------------------------------------- Origin, CORS


async def test_an_origin_not_allowed_is_403() -> None:
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery, http_client() as client:
            relay, _ = await start(nursery, "a", allowed_origins=(GOOD_ORIGIN,))
            mcp = McpHttp(client, call_url(relay, "a"))
            evil = {"origin": EVIL_ORIGIN}
            response = await mcp.post(initialize_message(), headers=evil)
            error = check_error(response, 403, INVALID_REQUEST)
            assert EVIL_ORIGIN in error["message"]
            assert "mcp-session-id" not in response.headers
            assert "access-control-allow-origin" not in response.headers
            assert response.headers["connection"] == "close"
            assert (await health(relay))["http_sessions"] == 0
            # An existing session is not reachable from that origin either.
            session = await mcp.initialize()
            for method in ("GET", "DELETE"):
                refused = await mcp.request(method, session, accept=SSE, origin=EVIL_ORIGIN)
                check_error(refused, 403, INVALID_REQUEST)
            refused = await mcp.post(call_message(1, "echo"), session=session, headers=evil)
            check_error(refused, 403, INVALID_REQUEST)
            preflight = await client.options(
                mcp.url, headers={**evil, "access-control-request-method": "POST"}
            )
            check_error(preflight, 403, INVALID_REQUEST)
            assert "access-control-allow-origin" not in preflight.headers
            assert (await health(relay))["http_sessions"] == 1
            nursery.cancel_scope.cancel()


async def test_an_allowed_origin_is_served_with_cors_headers() -> None:
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery, http_client() as client:
            relay = await start_relay(nursery, allowed_origins=(GOOD_ORIGIN,))
            async with running_tool(relay, "a"):
                mcp = McpHttp(client, call_url(relay, "a"))
                good = {"origin": GOOD_ORIGIN}
                response = await mcp.post(initialize_message(), headers=good)
                assert response.status_code == 200, response.text
                assert response.headers["access-control-allow-origin"] == GOOD_ORIGIN
                exposed = response.headers["access-control-expose-headers"].lower()
                assert "mcp-session-id" in exposed.split(", "), exposed
                session = response.headers["mcp-session-id"]
                answer = await mcp.call(session, 1, "echo", {"x": 1}, headers=good)
                assert echoed(answer, 1) == {"x": 1}
                # A browser reads refusals too: they carry the CORS headers.
                refused = await mcp.post(call_message(2, "echo"), session="nope", headers=good)
                check_error(refused, 404, INVALID_REQUEST)
                assert refused.headers["access-control-allow-origin"] == GOOD_ORIGIN
            nursery.cancel_scope.cancel()


def headers_of(response: httpx.Response, name: str) -> list[str]:
    """A comma-separated header's values."""
    return response.headers[name].split(",")


async def test_a_preflight_is_204_with_the_allowed_methods_and_headers() -> None:
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery, http_client() as client:
            relay = await start_relay(nursery, allowed_origins=(GOOD_ORIGIN,))
            # A preflight carries no credentials: no token in the URL.
            headers = {
                "origin": GOOD_ORIGIN,
                "access-control-request-method": "POST",
                "access-control-request-headers": "content-type, mcp-session-id",
            }
            response = await client.options(call_url(relay), headers=headers)
            assert response.status_code == 204, response.text
            assert response.content == b""
            assert response.headers["access-control-allow-origin"] == GOOD_ORIGIN
            methods = {
                m.strip() for m in response.headers["access-control-allow-methods"].split(",")
            }
            assert {"GET", "POST", "DELETE"} <= methods, methods
            allowed = {
                h.strip() for h in response.headers["access-control-allow-headers"].split(",")
            }
            wanted = {"content-type", "authorization", "mcp-session-id", "mcp-protocol-version"}
            assert wanted | {"last-event-id", "accept"} <= allowed, allowed
            nursery.cancel_scope.cancel()


async def test_a_request_without_origin_is_served_without_cors_headers() -> None:
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery, http_client() as client:
            relay = await start_relay(nursery, allowed_origins=(GOOD_ORIGIN,))
            async with running_tool(relay, "a"):
                mcp = McpHttp(client, call_url(relay, "a"))
                response = await mcp.post(initialize_message())
                assert response.status_code == 200, response.text
                assert "access-control-allow-origin" not in response.headers
                session = await mcp.initialize()
                assert echoed(await mcp.call(session, 1, "echo", {"y": 2}), 1) == {"y": 2}
            nursery.cancel_scope.cancel()


# ---------------------------------------------------------------------------- protocol version


async def test_an_unsupported_protocol_version_is_400_32022() -> None:
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery, http_client() as client:
            relay = await start_relay(nursery)
            async with running_tool(relay, "a") as tool:
                mcp = McpHttp(client, call_url(relay, "a"))
                session = await mcp.initialize()
                expected = {
                    "supported": list(SUPPORTED_PROTOCOL_VERSIONS),
                    "requested": "1999-01-01",
                }
                refusals = [
                    await mcp.post(call_message(1, "echo"), session=session, version="1999-01-01"),
                    await mcp.post(
                        {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {}},
                        session=session,
                        version="1999-01-01",
                    ),
                    await mcp.request(
                        "GET", session, accept=SSE, mcp_protocol_version="1999-01-01"
                    ),
                    await mcp.request("DELETE", session, mcp_protocol_version="1999-01-01"),
                ]
                for response in refusals:
                    error = check_error(response, 400, UNSUPPORTED_VERSION)
                    assert error["data"] == expected, error
                assert tool.calls == []
                # The refused DELETE ended nothing; every supported revision is served.
                for rid, version in enumerate(SUPPORTED_PROTOCOL_VERSIONS, start=10):
                    response = await mcp.post(
                        call_message(rid, "echo", {"v": version}), session=session, version=version
                    )
                    assert echoed(answer_of(response), rid) == {"v": version}
                # No header at all: the server assumes 2025-03-26, which it serves.
                response = await mcp.post(call_message(20, "echo"), session=session, version=None)
                assert echoed(answer_of(response), 20) == {}
            nursery.cancel_scope.cancel()


async def test_a_sessionless_request_of_the_next_revision_is_32022() -> None:
    """The 2026-07-28 SDKs try a stateless request first and fall back to ``initialize`` when
    it is refused with -32022."""
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery, http_client() as client:
            relay, _ = await start(nursery, "a")
            mcp = McpHttp(client, call_url(relay, "a"))
            for message in (
                {"jsonrpc": "2.0", "id": 1, "method": "server/discover"},
                {"jsonrpc": "2.0", "id": 2, "method": "tools/list"},
            ):
                response = await mcp.post(message, headers={"mcp-protocol-version": "2026-07-28"})
                error = check_error(response, 400, UNSUPPORTED_VERSION)
                assert error["data"]["requested"] == "2026-07-28", error
                assert error["data"]["supported"] == list(SUPPORTED_PROTOCOL_VERSIONS), error
                assert "mcp-session-id" not in response.headers
            assert (await health(relay))["http_sessions"] == 0
            # The fallback works.
            await mcp.initialize()
            assert (await health(relay))["http_sessions"] == 1
            nursery.cancel_scope.cancel()


# ---------------------------------------------------------------------------- bodies


async def test_a_batch_is_400_32600() -> None:
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery, http_client() as client:
            relay = await start_relay(nursery)
            async with running_tool(relay, "a") as tool:
                mcp = McpHttp(client, call_url(relay, "a"))
                response = await mcp.post([initialize_message()])
                check_error(response, 400, INVALID_REQUEST)
                assert "mcp-session-id" not in response.headers
                session = await mcp.initialize()
                batch = [call_message(1, "echo"), call_message(2, "echo")]
                check_error(await mcp.post(batch, session=session), 400, INVALID_REQUEST)
                check_error(await mcp.post([], session=session), 400, INVALID_REQUEST)
                # A malformed message is -32600 too.
                for bad in ({"id": 3, "method": "tools/call"}, {"jsonrpc": "2.0", "id": 4}, 7):
                    check_error(await mcp.post(bad, session=session), 400, INVALID_REQUEST)
                assert tool.calls == []
                assert (await health(relay))["http_sessions"] == 1
            nursery.cancel_scope.cancel()


async def test_a_body_that_is_not_json_is_400_32700() -> None:
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery, http_client() as client:
            relay, _ = await start(nursery, "a")
            mcp = McpHttp(client, call_url(relay, "a"))
            for content in (b"{not json", b"", b"\xff\xfe\x00", b'{"jsonrpc": "2.0", "id": 1'):
                response = await mcp.post(content=content)
                check_error(response, 400, PARSE_ERROR)
                assert "mcp-session-id" not in response.headers
            session = await mcp.initialize()
            check_error(await mcp.post(content=b"nope", session=session), 400, PARSE_ERROR)
            assert (await health(relay))["http_sessions"] == 1
            nursery.cancel_scope.cancel()


async def test_a_wrong_content_type_is_415_and_a_wrong_accept_406() -> None:
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery, http_client() as client:
            relay, _ = await start(nursery, "a")
            mcp = McpHttp(client, call_url(relay, "a"))
            for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
                response = await mcp.post(initialize_message(), content_type=content_type)
                check_error(response, 415, INVALID_REQUEST)
            # Parameters of the media type are fine.
            response = await mcp.post(initialize_message(), content_type=f"{JSON}; charset=utf-8")
            assert response.status_code == 200, response.text
            for accept in ("text/html", "application/xml, text/plain"):
                response = await mcp.post(initialize_message(), accept=accept)
                check_error(response, 406, INVALID_REQUEST)
            session = await mcp.initialize()
            refused = await mcp.post(call_message(1, "echo"), session=session, accept="text/html")
            check_error(refused, 406, INVALID_REQUEST)
            assert (await health(relay))["http_sessions"] == 2
            nursery.cancel_scope.cancel()


LIMIT = 2048


def padded(size: int) -> bytes:
    """A ``tools/call`` of ``echo`` exactly ``size`` bytes long."""
    bare = json.dumps(call_message(1, "echo", {"pad": ""})).encode()
    message = call_message(1, "echo", {"pad": "p" * (size - len(bare))})
    data = json.dumps(message).encode()
    assert len(data) == size
    return data


async def raw_exchange(
    relay: RunningRelay, framing: str, data: bytes = b"", *, session: str | None = None
) -> tuple[bytes, bool]:
    """One POST of agent ``a`` on a new connection (``framing``: its Content-Length or
    Transfer-Encoding header; ``data``: what follows the head), read until the connection
    ends: (all that came, whether it ended with a reset rather than a close)."""
    extra = f"\r\nMcp-Session-Id: {session}" if session is not None else ""
    head = (
        f"POST /mcp_endpoint/call/?token={relay.token('a')} HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{relay.port}\r\n"
        f"Content-Type: {JSON}\r\nAccept: {ACCEPT_BOTH}\r\n{framing}{extra}\r\n\r\n"
    ).encode()
    stream = await open_tcp_from("127.0.0.1", relay.port)
    received = b""
    async with stream:
        # Refused before the whole body went, the answer is still there to read.
        with contextlib.suppress(trio.BrokenResourceError):
            await stream.send_all(head + data)
        try:
            while chunk := await stream.receive_some(65536):
                received += chunk
        except trio.BrokenResourceError:
            return received, True
    return received, False


def parse_response(data: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status.split()[1]), headers, body


def chunked(*chunks: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"


def check_413(data: bytes) -> None:
    """``data`` is one 413 answer, its connection closing, and nothing after it."""
    assert data.count(b"HTTP/1.1 ") == 1, data
    status, headers, body = parse_response(data)
    assert status == 413 and headers["connection"] == "close", data
    assert len(body) == int(headers["content-length"]), data
    answer = json.loads(body)
    assert answer["id"] is None and answer["error"]["code"] == INVALID_REQUEST, answer
    assert str(LIMIT) in answer["error"]["message"], answer


async def test_a_body_over_the_limit_is_413() -> None:
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery, http_client() as client:
            relay = await start_relay(nursery, max_message_size=LIMIT)
            async with running_tool(relay, "a") as tool:
                mcp = McpHttp(client, call_url(relay, "a"))
                session = await mcp.initialize()
                # At the limit, the body is served, as one piece or in chunks.
                answer = answer_of(await mcp.post(content=padded(LIMIT), session=session))
                assert len(echoed(answer, 1)["pad"]) > LIMIT / 2
                whole = padded(LIMIT)

                async def pieces(data: bytes) -> AsyncIterator[bytes]:
                    for at in range(0, len(data), 1000):
                        yield data[at : at + 1000]

                answer = answer_of(await mcp.post(content=pieces(whole), session=session))
                assert len(echoed(answer, 1)["pad"]) > LIMIT / 2
                # Over the limit only together: the relay counts the chunks' bytes. (httpx
                # sends them all before the relay can refuse: see raw_exchange for a body
                # refused while it is being sent.)
                response = await mcp.post(content=pieces(padded(LIMIT + 1)), session=session)
                error = check_error(response, 413, INVALID_REQUEST)
                assert str(LIMIT) in error["message"], error
                assert response.headers["connection"] == "close"
                # With a Content-Length over the limit, in the session or before one.
                for data in (padded(LIMIT + 1), b"y" * 100_000):
                    framing = f"Content-Length: {len(data)}"
                    check_413((await raw_exchange(relay, framing, data, session=session))[0])
                    check_413((await raw_exchange(relay, framing, data))[0])
                # Chunked, over the limit in one chunk.
                data = chunked(b"c" * (LIMIT + 1))
                framing = "Transfer-Encoding: chunked"
                check_413((await raw_exchange(relay, framing, data, session=session))[0])
                assert len(tool.calls) == 2
                assert (await health(relay))["http_sessions"] == 1
            nursery.cancel_scope.cancel()


async def test_the_connection_closes_after_a_413() -> None:
    """After a 413 the relay reads nothing more of the connection: a request sent behind
    the refused body is not answered, and the connection ends."""
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            relay = await start_relay(nursery, max_message_size=LIMIT)
            behind = (
                f"GET /mcp_endpoint/health?key={KEY} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
            ).encode()
            # A Content-Length over the limit, the body not sent: refused on the head, and
            # closed at once (not after the handshake timeout: the relay reads no more).
            with trio.fail_after(2):
                data, reset = await raw_exchange(relay, f"Content-Length: {100 * LIMIT}")
            check_413(data)
            assert not reset  # nothing unread: a clean close
            # The body sent, and a request behind it.
            body = padded(LIMIT + 1)
            data, _ = await raw_exchange(relay, f"Content-Length: {len(body)}", body + behind)
            check_413(data)
            # Chunked, then a request behind it.
            framing = "Transfer-Encoding: chunked"
            data, _ = await raw_exchange(relay, framing, chunked(b"c" * (LIMIT + 1)) + behind)
            check_413(data)
            data, _ = await raw_exchange(relay, framing, chunked(*[b"c" * 100] * 21) + behind)
            check_413(data)
            nursery.cancel_scope.cancel()


async def test_a_413_after_a_whole_body_ends_with_a_clean_close() -> None:
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            relay = await start_relay(nursery, max_message_size=LIMIT)
            body = b"b" * (50 * LIMIT)
            data, reset = await raw_exchange(relay, f"Content-Length: {len(body)}", body)
            check_413(data)
            assert not reset, "the connection was reset after the 413"
            nursery.cancel_scope.cancel()


# ---------------------------------------------------------------------------- tokens


async def test_a_missing_or_wrong_token_is_401_with_a_challenge() -> None:
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery, http_client() as client:
            relay = await start_relay(nursery)
            cases = [
                (call_url(relay), {}),
                (call_url(relay, token="not-a-token"), {}),
                (call_url(relay, token=encrypt_token("f" * 32, "a")), {}),
                (call_url(relay), {"authorization": "Bearer not-a-token"}),
                (call_url(relay), {"authorization": f"Basic {relay.token('a')}"}),
            ]
            for url, headers in cases:
                response = await McpHttp(client, url).post(initialize_message(), headers=headers)
                error = check_error(response, 401, AUTHENTICATION_ERROR)
                assert response.headers["www-authenticate"].startswith("Bearer"), response.headers
                assert "mcp-session-id" not in response.headers
                assert "details" in error["data"], error
            missing = await McpHttp(client, call_url(relay)).post(initialize_message())
            details = check_error(missing, 401, AUTHENTICATION_ERROR)["data"]["details"]
            assert "?token=" in details and "Bearer" in details, details
            assert (await health(relay))["http_sessions"] == 0
            nursery.cancel_scope.cancel()


async def test_the_token_may_come_as_a_bearer_header() -> None:
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery, http_client() as client:
            relay = await start_relay(nursery)
            async with running_tool(relay, "a"):
                mcp = McpHttp(client, call_url(relay))
                bearer = {"authorization": f"Bearer {relay.token('a')}"}
                session = await mcp.initialize(headers=bearer)
                answer = await mcp.call(session, 1, "echo", {"b": 1}, headers=bearer)
                assert echoed(answer, 1) == {"b": 1}
                # The session id is no credential: without the token it is 401.
                response = await mcp.post(call_message(2, "echo"), session=session)
                check_error(response, 401, AUTHENTICATION_ERROR)
                ok = await mcp.request("DELETE", session, authorization=bearer["authorization"])
                assert ok.status_code == 204
            nursery.cancel_scope.cancel()


async def test_scoped_tokens_are_honoured_by_role() -> None:
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery, http_client() as client:
            relay = await start_relay(nursery)
            async with running_tool(relay, "a"):
                tool_token = scoped_token(KEY, "a", TokenRole.TOOL)
                for url, headers in (
                    (call_url(relay, token=tool_token), {}),
                    (call_url(relay), {"authorization": f"Bearer {tool_token}"}),
                ):
                    response = await McpHttp(client, url).post(
                        initialize_message(), headers=headers
                    )
                    error = check_error(response, 403, AUTHENTICATION_ERROR)
                    assert "tool token" in error["data"]["details"], error
                    assert "www-authenticate" not in response.headers
                    assert "mcp-session-id" not in response.headers
                assert (await health(relay))["http_sessions"] == 0
                for rid, role in enumerate((TokenRole.CALLER, TokenRole.BOTH), start=1):
                    mcp = McpHttp(client, call_url(relay, token=scoped_token(KEY, "a", role)))
                    session = await mcp.initialize()
                    assert echoed(await mcp.call(session, rid, "echo"), rid) == {}
            nursery.cancel_scope.cancel()


async def test_an_address_that_keeps_failing_gets_429() -> None:
    with trio.fail_after(GUARD):
        async with (
            trio.open_nursery() as nursery,
            http_client(local_address=STRANGER) as stranger,
            http_client() as client,
        ):
            relay, _ = await start(nursery, "a", auth_delay=0, auth_failures=3)
            bad = McpHttp(stranger, call_url(relay, token="wrong"))
            statuses = [(await bad.post(initialize_message())).status_code for _ in range(3)]
            assert statuses == [401, 401, 401]
            response = await bad.post(initialize_message())
            error = check_error(response, 429, AUTHENTICATION_ERROR)
            assert int(response.headers["retry-after"]) >= 1
            assert error["data"]["retry_after"] == int(response.headers["retry-after"])
            # The address is refused, whoever's token it tries...
            check_error(
                await McpHttp(stranger, call_url(relay)).post(initialize_message()),
                429,
                AUTHENTICATION_ERROR,
            )
            # ...but a good token from it is served, and so is everyone else.
            await McpHttp(stranger, call_url(relay, "a")).initialize()
            await McpHttp(client, call_url(relay, "a")).initialize()
            nursery.cancel_scope.cancel()


async def test_the_callers_credentials_never_reach_the_tool() -> None:
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery, http_client() as client:
            relay = await start_relay(nursery)
            async with running_tool(relay, "a") as tool:
                secrets = [relay.token("a")]
                # The token in the query.
                mcp = McpHttp(client, call_url(relay, "a"))
                session = await mcp.initialize()
                assert echoed(await mcp.call(session, 1, "echo", {"q": 1}), 1) == {"q": 1}
                response = await mcp.post(call_message(2, "echo"), session=session, accept=JSON)
                assert echoed(answer_of(response), 2) == {}
                secrets.append(session)
                # A scoped token in an Authorization header.
                scoped = scoped_token(KEY, "a", TokenRole.CALLER)
                bearer = {"authorization": f"Bearer {scoped}"}
                mcp = McpHttp(client, call_url(relay))
                session = await mcp.initialize(headers=bearer)
                answer = await mcp.call(session, 3, "echo", {"h": 1}, headers=bearer)
                assert echoed(answer, 3) == {"h": 1}
                secrets += [scoped, session]
                await mcp.request("DELETE", session, authorization=bearer["authorization"])
                await session_count(relay, 1)
                assert len(tool.calls) == 3
                seen = "\n".join(tool.frames)
                assert '"method":"initialize"' in seen.replace(" ", "")  # all was recorded
                for secret in secrets:
                    assert secret not in seen
                for word in ("authorization", "bearer", "token=", "mcp-session-id"):
                    assert word not in seen.lower(), word
            nursery.cancel_scope.cancel()


# ---------------------------------------------------------------------------- answers

EVENT_ID = re.compile(r"^(\d+)-(\d+)$")


async def test_the_answer_is_json_or_sse_as_the_client_accepts() -> None:
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery, http_client() as client:
            relay = await start_relay(nursery)
            async with running_tool(relay, "a"):
                mcp = McpHttp(client, call_url(relay, "a"))
                session = await mcp.initialize()
                with_progress = {
                    "jsonrpc": "2.0",
                    "id": 1,
                    "method": "tools/call",
                    "params": {
                        "name": "echo",
                        "arguments": {"j": 1},
                        "_meta": {"progressToken": 9},
                    },
                }
                response = await mcp.post(with_progress, session=session, accept=JSON)
                assert response.status_code == 200
                assert response.headers["content-type"] == JSON
                assert echoed(response.json(), 1) == {"j": 1}  # the response alone
                for accept in (SSE, ACCEPT_BOTH):
                    response = await mcp.post(
                        {**with_progress, "id": accept}, session=session, accept=accept
                    )
                    assert response.status_code == 200
                    assert response.headers["content-type"] == SSE
                    events = parse_sse(response.text)
                    ids = [EVENT_ID.match(e.id or "") for e in events]
                    assert all(ids), events
                    streams = {m.group(1) for m in ids if m}
                    assert len(streams) == 1, events  # one stream, the POST's
                    numbers = [int(m.group(2)) for m in ids if m]
                    assert numbers == sorted(set(numbers)), events
                    messages = [e for e in events if e.data]
                    assert [e.event for e in messages] == ["message", "message"], events
                    progress, answer = (e.json() for e in messages)
                    assert progress["method"] == "notifications/progress", progress
                    assert progress["params"]["progressToken"] == 9
                    assert echoed(answer, accept) == {"j": 1}
            nursery.cancel_scope.cancel()


async def test_notifications_and_responses_get_202_without_a_body() -> None:
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery, http_client() as client:
            relay, _ = await start(nursery, "a")
            mcp = McpHttp(client, call_url(relay, "a"))
            session = await mcp.initialize()
            for message in (
                {"jsonrpc": "2.0", "method": "notifications/roots/list_changed"},
                {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 5}},
                {"jsonrpc": "2.0", "id": "r1", "result": {}},
                {"jsonrpc": "2.0", "id": "r2", "error": {"code": -1, "message": "no"}},
            ):
                for accept in (JSON, SSE, ACCEPT_BOTH):
                    response = await mcp.post(message, session=session, accept=accept)
                    assert response.status_code == 202, (message, response.text)
                    assert response.content == b""
                    assert "content-type" not in response.headers
            nursery.cancel_scope.cancel()


async def test_a_request_id_in_flight_in_the_session_is_400() -> None:
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery, http_client() as client:
            relay = await start_relay(nursery)
            async with running_tool(relay, "a") as tool:
                mcp = McpHttp(client, call_url(relay, "a"))
                session = await mcp.initialize()
                other = await mcp.initialize()
                answers: dict[str, Any] = {}

                async def slow(key: str, session: str, accept: str) -> None:
                    message = call_message(7, "slow", {"gate": key})
                    answers[key] = answer_of(
                        await mcp.post(message, session=session, accept=accept)
                    )

                async with trio.open_nursery() as calls:
                    calls.start_soon(slow, "first", session, JSON)
                    await tool.until_calls(1)
                    for accept in (JSON, SSE):
                        again = await mcp.post(
                            call_message(7, "echo"), session=session, accept=accept
                        )
                        error = check_error(again, 400, INVALID_REQUEST)
                        assert "in flight" in error["message"], error
                    # Another id in the session, and the same id in another session, are fine.
                    assert echoed(await mcp.call(session, 8, "echo"), 8) == {}
                    calls.start_soon(slow, "second", other, SSE)
                    await tool.until_calls(3)
                    tool.gate("first").set()
                    tool.gate("second").set()
                assert echoed(answers["first"], 7) == {"gate": "first"}
                assert echoed(answers["second"], 7) == {"gate": "second"}
                assert len(tool.calls) == 3  # the refused duplicates never reached it
                # Answered, the id may be used again.
                assert echoed(await mcp.call(session, 7, "echo"), 7) == {}
            nursery.cancel_scope.cancel()


# ---------------------------------------------------------------------------- connections


async def test_one_kept_alive_connection_carries_many_requests() -> None:
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery, http_client() as client:
            relay = await start_relay(nursery)
            async with running_tool(relay, "a"):
                connects = []

                async def trace(name: str, info: dict[str, Any]) -> None:
                    if name == "connection.connect_tcp.complete":
                        connects.append(info)

                mcp = McpHttp(client, call_url(relay, "a"))
                traced = {"trace": trace}
                response = await mcp.post(initialize_message(), extensions=traced)
                session = response.headers["mcp-session-id"]
                for rid in range(1, 6):
                    accept = JSON if rid % 2 else ACCEPT_BOTH
                    message = call_message(rid, "echo", {"n": rid})
                    response = await mcp.post(
                        message, session=session, accept=accept, extensions=traced
                    )
                    assert echoed(answer_of(response), rid) == {"n": rid}
                    # Refusals that leave the connection usable keep it.
                    refused = await mcp.post(
                        call_message(rid, "echo"), session="gone", extensions=traced
                    )
                    check_error(refused, 404, INVALID_REQUEST)
                    batch = await mcp.post([], session=session, extensions=traced)
                    check_error(batch, 400, INVALID_REQUEST)
                    note = {"jsonrpc": "2.0", "method": "notifications/roots/list_changed"}
                    response = await mcp.post(note, session=session, extensions=traced)
                    assert response.status_code == 202
                assert len(connects) == 1, connects
            nursery.cancel_scope.cancel()


async def test_health_counts_the_open_http_sessions() -> None:
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery, http_client() as client:
            relay, _ = await start(nursery, "a", "b")
            assert (await health(relay))["http_sessions"] == 0
            mcp = McpHttp(client, call_url(relay, "a"))
            sessions = [await mcp.initialize() for _ in range(3)]
            await McpHttp(client, call_url(relay, "b")).initialize()
            assert (await health(relay))["http_sessions"] == 4
            await mcp.request("DELETE", sessions[0])
            await session_count(relay, 3)
            async with legacy_session(relay, "a"):
                assert (await health(relay))["http_sessions"] == 4
            await session_count(relay, 3)
            nursery.cancel_scope.cancel()


# ---------------------------------------------------------------------------- everyone else


Case = tuple[set[int], int | None, dict[str, Any]]


def garbage_requests(relay: RunningRelay, victim: str) -> list[Case]:
    """Requests that must each be refused: (the statuses it may get, the JSON-RPC error code,
    the arguments of :meth:`McpHttp.post`, and ``token``)."""

    async def big() -> AsyncIterator[bytes]:
        # Chunked, over the limit with its last chunk: httpx has sent it all when the relay
        # refuses it (see raw_exchange for why that matters to a test under Trio).
        for _ in range(3):
            yield b"[" * 1000

    evil = {"origin": EVIL_ORIGIN}

    def case(statuses: set[int], code: int | None, **kwargs: Any) -> Case:
        return statuses, code, kwargs

    return [
        case({400}, INVALID_REQUEST, message=call_message(1, "echo")),
        case({404}, INVALID_REQUEST, message=call_message(1, "echo"), session="unknown"),
        case({404}, INVALID_REQUEST, message=call_message(1, "echo"), session=victim),
        case({403}, INVALID_REQUEST, message=initialize_message(), headers=evil),
        case(
            {400},
            UNSUPPORTED_VERSION,
            message=call_message(1, "echo"),
            session=victim,
            version="1999-01-01",
            token=relay.token("b"),
        ),
        case({400}, INVALID_REQUEST, message=[initialize_message()]),
        case({400}, PARSE_ERROR, content=b"{{{{"),
        case({415}, INVALID_REQUEST, message=initialize_message(), content_type="text/plain"),
        case({406}, INVALID_REQUEST, message=initialize_message(), accept="text/html"),
        case({413}, INVALID_REQUEST, content=big),  # called for each request
        case({401, 429}, AUTHENTICATION_ERROR, message=initialize_message(), token="wrong"),
        case(
            {403, 429},
            AUTHENTICATION_ERROR,
            message=initialize_message(),
            token=scoped_token(KEY, "g", TokenRole.TOOL),
        ),
    ]


async def test_the_relay_serves_everyone_else_while_a_client_sends_garbage() -> None:
    with trio.fail_after(GUARD):
        async with (
            trio.open_nursery() as nursery,
            http_client() as client,
            http_client(local_address=STRANGER) as stranger,
        ):
            relay = await start_relay(
                nursery, allowed_origins=(GOOD_ORIGIN,), max_message_size=LIMIT
            )
            async with (
                running_tool(relay, "a") as tool_a,
                running_tool(relay, "b") as tool_b,
                peer(relay.caller_url("a")) as ws_caller,
            ):
                http_b = McpHttp(client, call_url(relay, "b"))
                victim = await http_b.initialize()
                cases = garbage_requests(relay, victim)
                wrong: list[Any] = []
                sent = Counter[int]()
                done = trio.Event()

                async def garbage(worker: int) -> None:
                    for n in range(len(cases) * 2):
                        statuses, code, kwargs = cases[(worker + n) % len(cases)]
                        kwargs = dict(kwargs)
                        token = kwargs.pop("token", relay.token("g"))
                        if callable(kwargs.get("content")):
                            kwargs["content"] = kwargs["content"]()
                        mcp = McpHttp(stranger, call_url(relay, token=token))
                        response = await mcp.post(kwargs.pop("message", None), **kwargs)
                        sent[response.status_code] += 1
                        if response.status_code not in statuses:
                            wrong.append((kwargs, response.status_code, response.text))
                            continue
                        if response.status_code != 429:
                            check_error(response, response.status_code, code)

                latencies: dict[str, list[float]] = {"ws": [], "http": []}

                async def serve_ws() -> None:
                    rid = 0
                    while not done.is_set() or rid < 5:
                        rid += 1
                        started = trio.current_time()
                        assert await ws_call(ws_caller, rid, {"ws": rid}) == {"ws": rid}
                        latencies["ws"].append(trio.current_time() - started)

                async def serve_http() -> None:
                    rid = 0
                    while not done.is_set() or rid < 5:
                        rid += 1
                        started = trio.current_time()
                        answer = await http_b.call(victim, rid, "echo", {"http": rid})
                        assert echoed(answer, rid) == {"http": rid}
                        latencies["http"].append(trio.current_time() - started)

                async with trio.open_nursery() as users:
                    users.start_soon(serve_ws)
                    users.start_soon(serve_http)
                    async with trio.open_nursery() as attackers:
                        for worker in range(16):
                            attackers.start_soon(garbage, worker)
                    done.set()
                assert wrong == [], wrong[:5]
                assert sum(sent.values()) == 16 * len(cases) * 2, sent
                for who, times in latencies.items():
                    assert len(times) >= 5, (who, times)
                    assert max(times) < 2.0, (who, max(times))
                assert len(tool_a.calls) == len(latencies["ws"])
                assert len(tool_b.calls) == len(latencies["http"])
                # The garbage opened no session; the victim's is intact.
                assert (await health(relay))["http_sessions"] == 1
                assert echoed(await http_b.call(victim, "last", "echo"), "last") == {}
            nursery.cancel_scope.cancel()
