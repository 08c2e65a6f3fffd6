"""``trio-mcp-relay check``: does an MCP endpoint at this address work, and if not, why?

Runs against any endpoint speaking the mcp-endpoint-server protocol (this relay, the
reference server, behind a proxy or not). Each step yields a :class:`CheckResult` with a hint
that names the likely cause when it fails.
"""

from __future__ import annotations

import contextlib
import contextvars
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
from ._endpoint import describe_connect_failure
from .client import connect_websocket

__all__ = ["CheckResult", "Endpoint", "run_checks"]

PROXY_HINT = (
    "the WebSocket upgrade did not reach the relay: a proxy in front must forward it "
    "(nginx: proxy_http_version 1.1; proxy_set_header Upgrade $http_upgrade; "
    'proxy_set_header Connection "upgrade")'
)


@attrs.frozen
class CheckResult:
    """One step of the check; ``skipped`` steps are neither passed nor failed."""

    name: str
    ok: bool
    detail: str = ""
    hint: str = ""
    skipped: bool = False


@attrs.frozen
class Endpoint:
    """Where the endpoint is: ``base`` like ``http://host:8004`` (or https).

    With a ``key``, every step uses fresh agents minted with it. Without one, ``token`` (from a
    tool or caller URL) is used: the steps that need the key are skipped, and the round trip
    goes through the agent's own tool when one is connected (never replacing it).
    """

    base: str
    key: str | None
    timeout: float = 10.0
    token: str | None = None

    @property
    def ws_base(self) -> str:
        return self.base.replace("https://", "wss://", 1).replace("http://", "ws://", 1)

    def url(self, path: str, agent: str, *, token: str | None = None) -> str:
        if token is None:
            token = encrypt_token(self.key, agent) if self.key is not None else self.token
        assert token is not None
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


_BASE: contextvars.ContextVar[str] = contextvars.ContextVar("_BASE", default="the endpoint")


async def _step(
    name: str, body: Callable[[], Awaitable[str]], failure_hint: str = ""
) -> CheckResult:
    try:
        return CheckResult(name, True, await body())
    except _Failed as exc:
        return CheckResult(name, False, exc.detail, exc.hint or failure_hint)
    except trio.TooSlowError:
        return CheckResult(name, False, "no answer in time", failure_hint or _connect_hint(None))
    except trio.BrokenResourceError as exc:  # TLS (or the stream) failed under h11
        return CheckResult(name, False, describe_connect_failure(exc, _BASE.get()), "")
    except (OSError, HandshakeError, ConnectionClosed, h11.ProtocolError) as exc:
        if isinstance(exc, HandshakeError) and not isinstance(exc, ConnectionRejected):
            return CheckResult(name, False, describe_connect_failure(exc, _BASE.get()), "")
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


def _skipped(name: str, why: str) -> CheckResult:
    return CheckResult(name, True, why, skipped=True)


async def run_checks(endpoint: Endpoint) -> list[CheckResult]:
    """Run every check in order; returns one result per step."""
    agent = f"trio-mcp-relay-check-{secrets.token_hex(4)}"
    _BASE.set(endpoint.base)
    no_key = "skipped: needs the server key (--key, or the health URL)"
    results = [
        await _step("HTTP status endpoint", lambda: _status(endpoint)),
        await _step("health with the key", lambda: _health(endpoint))
        if endpoint.key is not None
        else _skipped("health with the key", no_key),
        await _step("health refuses a wrong key", lambda: _health_refuses_wrong_key(endpoint)),
    ]
    if endpoint.key is not None:
        results += await _websocket_checks(endpoint, agent)
        results.append(
            await _step("error for a missing tool", lambda: _missing_tool(endpoint, agent))
        )
    else:
        results += await _token_checks(endpoint)
        results.append(_skipped("error for a missing tool", no_key))
    results.append(await _step("bad token refused", lambda: _bad_token(endpoint, agent)))
    return results


async def _token_checks(endpoint: Endpoint) -> list[CheckResult]:
    """The connection steps with the given token: the agent's own tool answers the round
    trip if one is connected; if none is, ours connects (nothing is replaced)."""
    timeout = endpoint.timeout
    tool_name, caller_name = (
        "tool connection (/mcp_endpoint/mcp/)",
        "caller connection " + ("(/mcp_endpoint/call/)"),
    )
    trip_name = "forwarded round trip"
    async with contextlib.AsyncExitStack() as stack:
        caller_ws: list[WebSocketConnection] = []

        async def connect_caller() -> str:
            caller_ws.append(await _open_checked(stack, endpoint.url("call", ""), timeout))
            return "connected with the URL's token"

        caller = await _step(caller_name, connect_caller)
        if not caller.ok:
            return [_skipped(tool_name, "skipped"), caller, _skipped(trip_name, "skipped")]
        request = {"jsonrpc": "2.0", "id": 0, "method": "ping"}
        first: dict[str, object] | None = None
        with trio.move_on_after(timeout):
            await caller_ws[0].send_message(json.dumps(request))
            first = json.loads(await caller_ws[0].get_message())
        error = first.get("error") if first is not None else None
        if not (isinstance(error, dict) and error.get("code") == -32001):
            # A tool is connected (or may be): never replace it with ours.
            tool = _skipped(tool_name, "skipped: the agent's own tool is connected")
            return [tool, caller, _ping_answer(first, timeout)]
        tool_ws: list[WebSocketConnection] = []

        async def connect_tool() -> str:
            tool_ws.append(await _open_checked(stack, endpoint.url("mcp", ""), timeout))
            return "connected with the URL's token (the agent had no tool)"

        tool = await _step(tool_name, connect_tool)
        if not tool.ok:
            return [tool, caller, _skipped(trip_name, "skipped")]
        trip = await _step(
            trip_name,
            lambda: _round_trip(tool_ws[0], caller_ws[0], timeout),
            "the relay did not answer in time: lost response?",
        )
        return [tool, caller, trip]


def _ping_answer(response: dict[str, object] | None, timeout: float) -> CheckResult:
    name = "forwarded round trip"
    if response is None:
        return CheckResult(
            name,
            False,
            f"no answer to ping (id 0) within {timeout:g} s",
            "a lost response: mcp-endpoint-server 0.0.6 and earlier lose every answer to id 0",
        )
    if response.get("id") == 0 and type(response.get("id")) is int:
        return CheckResult(name, True, "ping with id 0 answered by the agent's tool")
    return CheckResult(
        name,
        False,
        f"answer came back with id {response.get('id')!r} instead of 0",
        "the relay does not restore request ids exactly (id 0 is lost by "
        "mcp-endpoint-server 0.0.6 and earlier)",
    )


async def _open_checked(
    stack: contextlib.AsyncExitStack, url: str, timeout: float
) -> WebSocketConnection:
    ws = await stack.enter_async_context(connect_websocket(url, connect_timeout=timeout))
    with trio.move_on_after(0.3):
        try:
            message = await ws.get_message()
        except ConnectionClosed as exc:
            code, reason = _close_of(exc)
            hint = "the token was refused: is it a token of this endpoint's key?"
            raise _Failed(f"closed: {code} {reason}", hint if code == 1008 else "") from None
        raise _Failed(f"unexpected first frame {message[:80]!r}")
    return ws


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
    assert endpoint.key is not None
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
        if exc.status_code in (401, 403):
            return f"refused with HTTP {exc.status_code}"
        raise _Failed(
            f"WebSocket refused with HTTP {exc.status_code}", _connect_hint(exc)
        ) from None
    raise _Failed("a bad token was accepted", "the endpoint does not check tokens")
