"""``trio-mcp-relay check``: does an MCP endpoint at this address work, and if not, why?

Runs against any endpoint speaking the mcp-endpoint-server protocol (this relay, the
reference server, behind a proxy or not). Each step yields a :class:`CheckResult` with a hint
that names the likely cause when it fails.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import ssl
from collections.abc import Awaitable, Callable
from urllib.parse import quote, urlsplit

import attrs
import h11
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
)

from ._auth import encrypt_token
from .client import connect_websocket

__all__ = ["CheckResult", "Endpoint", "run_checks"]

PROXY_HINT = (
    "the WebSocket upgrade did not reach the relay: a proxy in front must forward it "
    "(nginx: proxy_http_version 1.1; proxy_set_header Upgrade $http_upgrade; "
    'proxy_set_header Connection "upgrade")'
)


@attrs.frozen
class CheckResult:
    """One step of the check."""

    name: str
    ok: bool
    detail: str = ""
    hint: str = ""


@attrs.frozen
class Endpoint:
    """Where the endpoint is: ``base`` like ``http://host:8004`` (or https)."""

    base: str
    key: str
    timeout: float = 10.0

    @property
    def ws_base(self) -> str:
        return self.base.replace("https://", "wss://", 1).replace("http://", "ws://", 1)

    def url(self, path: str, agent: str, *, token: str | None = None) -> str:
        token = token if token is not None else encrypt_token(self.key, agent)
        return f"{self.ws_base}/mcp_endpoint/{path}/?token={quote(token, safe='')}"


@attrs.frozen
class _HttpAnswer:
    status: int
    body: bytes


async def _http_get(base: str, target: str, timeout: float) -> _HttpAnswer:
    parts = urlsplit(base)
    host = parts.hostname or "127.0.0.1"
    secure = parts.scheme == "https"
    port = parts.port or (443 if secure else 80)
    with trio.fail_after(timeout):
        stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
        if secure:
            stream = trio.SSLStream(stream, ssl.create_default_context(), server_hostname=host)
        async with stream:
            conn = h11.Connection(h11.CLIENT)
            request = h11.Request(
                method="GET",
                target=target,
                headers=[("host", parts.netloc), ("connection", "close")],
            )
            await stream.send_all(conn.send(request) + (conn.send(h11.EndOfMessage()) or b""))
            status, body = 0, b""
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(bytes(await stream.receive_some(65536)))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    body += bytes(event.data)
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    return _HttpAnswer(status, body)


def _connect_hint(exc: BaseException | None) -> str:
    if isinstance(exc, ConnectionRejected):
        if exc.status_code in (200, 400, 404, 405, 426):
            return PROXY_HINT + f" (got HTTP {exc.status_code} instead of 101)"
        if exc.status_code == 429:
            return "refused after too many failed authentications from this address: wait"
        return f"the server refused the WebSocket with HTTP {exc.status_code}"
    if isinstance(exc, OSError | HandshakeError):
        return "nothing answers there: is the relay running, and are --host/--port right?"
    if isinstance(exc, ConnectionClosed) and exc.reason is not None and exc.reason.code == 1008:
        return "the token was refused: is --key the server key?"
    if exc is None or isinstance(exc, trio.TooSlowError):
        return "no answer in time: a firewall or proxy may be holding the connection"
    return ""


async def _step(
    name: str, body: Callable[[], Awaitable[str]], failure_hint: str = ""
) -> CheckResult:
    try:
        return CheckResult(name, True, await body())
    except _Failed as exc:
        return CheckResult(name, False, exc.detail, exc.hint or failure_hint)
    except trio.TooSlowError:
        return CheckResult(name, False, "no answer in time", failure_hint or _connect_hint(None))
    except (OSError, HandshakeError, ConnectionClosed, h11.ProtocolError) as exc:
        return CheckResult(name, False, describe_error(exc), _connect_hint(exc))


def describe_error(exc: BaseException) -> str:
    """A one-line description of a connection failure, never empty."""
    if isinstance(exc, ConnectionClosed):
        code, reason = _close_of(exc)
        return f"connection closed: {code} {reason}".rstrip()
    if isinstance(exc, ConnectionRejected):
        return f"WebSocket refused with HTTP {exc.status_code}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    cause = exc.__cause__ or exc.__context__
    text = str(exc) or (describe_error(cause) if cause is not None else "")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _close_of(exc: ConnectionClosed) -> tuple[int, str]:
    if exc.reason is None:
        return 1006, ""
    return exc.reason.code, exc.reason.reason or ""


class _Failed(Exception):
    def __init__(self, detail: str, hint: str = "") -> None:
        super().__init__(detail)
        self.detail = detail
        self.hint = hint


async def run_checks(endpoint: Endpoint) -> list[CheckResult]:
    """Run every check in order; returns one result per step."""
    agent = f"trio-mcp-relay-check-{secrets.token_hex(4)}"
    results = [
        await _step("HTTP status endpoint", lambda: _status(endpoint)),
        await _step("health with the key", lambda: _health(endpoint)),
        await _step("health refuses a wrong key", lambda: _health_refuses_wrong_key(endpoint)),
    ]
    results += await _websocket_checks(endpoint, agent)
    results.append(await _step("error for a missing tool", lambda: _missing_tool(endpoint, agent)))
    results.append(await _step("bad token refused", lambda: _bad_token(endpoint, agent)))
    return results


async def _status(endpoint: Endpoint) -> str:
    answer = await _http_get(endpoint.base, "/mcp_endpoint/", endpoint.timeout)
    if answer.status != 200 or b"running" not in answer.body:
        raise _Failed(
            f"HTTP {answer.status}",
            "this address does not serve an MCP endpoint at /mcp_endpoint/ "
            "(wrong port, or a proxy path prefix?)",
        )
    return "HTTP 200, status running"


async def _health(endpoint: Endpoint) -> str:
    target = f"/mcp_endpoint/health?key={quote(endpoint.key, safe='')}"
    answer = await _http_get(endpoint.base, target, endpoint.timeout)
    if answer.status == 200 and b"success" in answer.body:
        counts = json.loads(answer.body).get("result", {}).get("connections", {})
        tools, callers = counts.get("tool_connections", "?"), counts.get("robot_connections", "?")
        return f"tool connections: {tools}, caller connections: {callers}"
    if b"-32004" in answer.body:
        raise _Failed(
            f"HTTP {answer.status}, -32004",
            "wrong key: use the server key ([server] key in data/.mcp-endpoint-server.cfg, "
            "or SERVER_KEY), or the admin key if one is set",
        )
    raise _Failed(f"HTTP {answer.status}", "the health endpoint did not answer as expected")


async def _health_refuses_wrong_key(endpoint: Endpoint) -> str:
    answer = await _http_get(endpoint.base, "/mcp_endpoint/health?key=wrong-key", endpoint.timeout)
    if b"success" in answer.body:
        raise _Failed("a wrong key was accepted", "the health endpoint is not protected")
    return f"HTTP {answer.status}, refused"


async def _websocket_checks(endpoint: Endpoint, agent: str) -> list[CheckResult]:
    timeout = endpoint.timeout
    sockets: dict[str, WebSocketConnection] = {}
    async with contextlib.AsyncExitStack() as stack:

        async def connect(name: str, path: str) -> str:
            ws = await stack.enter_async_context(
                connect_websocket(endpoint.url(path, agent), connect_timeout=timeout)
            )
            # A relay may accept, then close a connection it refuses (bad token: 1008).
            with trio.move_on_after(0.3):
                try:
                    message = await ws.get_message()
                except ConnectionClosed as exc:
                    code, reason = _close_of(exc)
                    hint = "the token was refused: is --key the server key?" if code == 1008 else ""
                    raise _Failed(f"closed: {code} {reason}", hint) from None
                raise _Failed(f"unexpected first frame {message[:80]!r}")
            sockets[name] = ws
            return "connected"

        tool = await _step("tool connection (/mcp_endpoint/mcp/)", lambda: connect("tool", "mcp"))
        caller = await _step(
            "caller connection (/mcp_endpoint/call/)", lambda: connect("caller", "call")
        )
        if not (tool.ok and caller.ok):
            return [tool, caller, CheckResult("forwarded round trip", False, "skipped")]
        trip = await _step(
            "forwarded round trip",
            lambda: _round_trip(sockets["tool"], sockets["caller"], timeout),
            "the relay did not answer in time: lost response?",
        )
        return [tool, caller, trip]


async def _round_trip(
    tool: WebSocketConnection, caller: WebSocketConnection, timeout: float
) -> str:
    request = {"jsonrpc": "2.0", "id": 0, "method": "tools/call", "params": {"name": "check"}}
    with trio.fail_after(timeout):
        await caller.send_message(json.dumps(request))
        forwarded = json.loads(await tool.get_message())
        if forwarded.get("method") != "tools/call" or "id" not in forwarded:
            raise _Failed(f"the tool got {forwarded!r:.80}")
        answer = {"jsonrpc": "2.0", "id": forwarded["id"], "result": {"ok": True}}
        await tool.send_message(json.dumps(answer))
        response = json.loads(await caller.get_message())
    if response.get("id") != 0 or type(response.get("id")) is not int:
        raise _Failed(
            f"answer came back with id {response.get('id')!r} instead of 0",
            "the relay does not restore request ids exactly (id 0 is lost by "
            "mcp-endpoint-server 0.0.6 and earlier)",
        )
    if response.get("result") != {"ok": True}:
        raise _Failed(f"unexpected answer {response!r:.80}")
    return "request id 0 forwarded and answered"


async def _missing_tool(endpoint: Endpoint, agent: str) -> str:
    url = endpoint.url("call", f"{agent}-without-tool")
    async with connect_websocket(url, connect_timeout=endpoint.timeout) as caller:
        request = {"jsonrpc": "2.0", "id": 7, "method": "tools/list"}
        with trio.fail_after(endpoint.timeout):
            await caller.send_message(json.dumps(request))
            response = json.loads(await caller.get_message())
    error = response.get("error") or {}
    if response.get("id") != 7 or not isinstance(error.get("code"), int):
        raise _Failed(
            f"got {response!r:.100}",
            "a request for an agent with no tool must get a JSON-RPC error with its id",
        )
    if error["code"] != -32001:
        return f"error {error['code']} with the request's id (trio-mcp-relay answers -32001)"
    return "-32001 Tool not connected, with the request's id"


async def _bad_token(endpoint: Endpoint, agent: str) -> str:
    url = endpoint.url("call", agent, token="not-a-valid-token")
    try:
        async with connect_websocket(url, connect_timeout=endpoint.timeout) as ws:
            with trio.fail_after(endpoint.timeout):
                await ws.get_message()
    except ConnectionClosed as exc:
        code, reason = _close_of(exc)
        if code == 1008:
            return f"closed with 1008: {reason}"
        raise _Failed(f"closed with {code}", "expected close code 1008") from None
    except ConnectionRejected as exc:
        return f"refused with HTTP {exc.status_code}"
    raise _Failed("a bad token was accepted", "the endpoint does not check tokens")
