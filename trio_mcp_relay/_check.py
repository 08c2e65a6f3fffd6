"""``trio-mcp-relay check``: does an MCP endpoint at this address work, and if not, why?

Runs against any endpoint speaking the mcp-endpoint-server protocol (this relay, the
reference server, behind a proxy or not). Each step yields a :class:`CheckResult` with a hint
that names the likely cause when it fails.

The check's own tool is a small MCP server (:class:`_CheckTool`) with one tool, ``check``: an
aggregating relay (trio-mcp-relay since #9) initializes and lists every tool connection itself
and routes ``tools/call`` by tool name, while the reference server forwards every frame as is;
the tool answers both. The servers step reports what a caller of the agent sees: its servers
(from the health endpoint, when it lists them per agent) and its tools.

Where the endpoint serves MCP Streamable HTTP on the caller path (trio-mcp-relay since #12),
a caller over it (:func:`~trio_mcp_relay.client.open_http_caller`) opens a session, lists the
tools and calls the check's tool, then ends the session (``DELETE``). An endpoint that
answers that ``POST`` with 404, 405 or 501 (the reference server) does not serve it: the step
is skipped, with that reason, and is no failure.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import secrets
import ssl
from collections.abc import Awaitable, Callable
from typing import Final, Literal
from urllib.parse import quote, urlsplit

import attrs
import h11
import httpx
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
)

from ._auth import encrypt_token
from ._endpoint import describe_connect_failure, http_refusal_hint
from .client import HttpProtocolError, HttpRefused, RpcError, connect_websocket, open_http_caller

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

    def url(self, path: str, agent: str, *, token: str | None = None, http: bool = False) -> str:
        """The ``path`` endpoint's URL for ``agent`` (ws(s)://, or http(s):// with ``http``)."""
        if token is None:
            token = encrypt_token(self.key, agent) if self.key is not None else self.token
        assert token is not None
        base = self.base if http else self.ws_base
        return f"{base}/mcp_endpoint/{path}/?token={quote(token, safe='')}"


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
    except _Skip as exc:
        return _skipped(name, exc.detail)
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


class _Skip(Exception):
    """The step cannot be run here (not a failure); ``detail`` says why."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


def _skipped(name: str, why: str) -> CheckResult:
    return CheckResult(name, True, why, skipped=True)


#: The check tool's name, as server (``serverInfo.name``) and as its only tool.
CHECK_SERVER = "trio-mcp-relay-check"
CHECK_TOOL = {
    "name": "check",
    "description": "Answers the round trip of trio-mcp-relay check.",
    "inputSchema": {"type": "object"},
}
CHECK_RESULT = {"content": [{"type": "text", "text": "trio-mcp-relay check"}]}


class _CheckTool:
    """The check's tool connection as an MCP server: it answers ``initialize``, ``ping`` and
    ``tools/list`` (the ``check`` tool) itself, and hands each ``tools/call`` to the round
    trip, which answers it."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self.initialized = False  # the endpoint sent its own initialize (an aggregator)
        self._calls_in, self.calls = trio.open_memory_channel[dict[str, object]](16)
        #: Answer each ``tools/call`` of ``check`` itself (counted in ``answered``), instead of
        #: handing it to :attr:`calls`.
        self.answer_calls = False
        self.answered = 0

    async def first_frame(self, grace: float) -> None:
        """Wait ``grace`` s for a refusal (a close) or the endpoint's ``initialize``.

        Raises:
            _Failed: closed (1008: the token), or a first frame that is no ``initialize``.
        """
        with trio.move_on_after(grace):
            try:
                message = await self.ws.get_message()
            except ConnectionClosed as exc:
                code, reason = _close_of(exc)
                hint = "the token was refused: is it a token of this endpoint's key?"
                raise _Failed(f"closed: {code} {reason}", hint if code == 1008 else "") from None
            frame = _json_object(message)
            if frame is None or frame.get("method") != "initialize" or "id" not in frame:
                raise _Failed(f"unexpected first frame {str(message)[:80]!r}")
            await self._answer(frame)

    async def serve(self) -> None:
        """Answer the endpoint until the connection ends (never raises for it)."""
        try:
            while True:
                frame = _json_object(await self.ws.get_message())
                if frame is not None and "method" in frame and "id" in frame:
                    await self._answer(frame)
        except (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def _answer(self, frame: dict[str, object]) -> None:
        method = frame.get("method")
        params = frame.get("params")
        result: object
        if method == "tools/call" and not self.answer_calls:
            await self._calls_in.send(frame)
            return
        if method == "tools/call":
            if not (isinstance(params, dict) and params.get("name") == CHECK_TOOL["name"]):
                error = {"code": -32602, "message": f"unknown tool in {params!r:.60}"}
                await self.send({"jsonrpc": "2.0", "id": frame["id"], "error": error})
                return
            self.answered += 1
            await self.send({"jsonrpc": "2.0", "id": frame["id"], "result": CHECK_RESULT})
            return
        if method == "initialize":
            self.initialized = True
            asked = params.get("protocolVersion") if isinstance(params, dict) else None
            result = {
                "protocolVersion": asked if isinstance(asked, str) else "2025-06-18",
                "capabilities": {"tools": {}},
                "serverInfo": {"name": CHECK_SERVER, "version": "1"},
            }
        elif method == "ping":
            result = {}
        elif method == "tools/list":
            result = {"tools": [CHECK_TOOL]}
        else:
            error = {"code": -32601, "message": "Method not found"}
            await self.send({"jsonrpc": "2.0", "id": frame["id"], "error": error})
            return
        await self.send({"jsonrpc": "2.0", "id": frame["id"], "result": result})

    async def send(self, frame: dict[str, object]) -> None:
        await self.ws.send_message(json.dumps(frame))

    @property
    def detail(self) -> str:
        if self.initialized:
            return "connected; the endpoint initialized it as an MCP server"
        return "connected"


def _json_object(message: str | bytes) -> dict[str, object] | None:
    try:
        frame = json.loads(message)
    except ValueError:
        return None
    return frame if isinstance(frame, dict) else None


async def _open_tool(stack: contextlib.AsyncExitStack, url: str, timeout: float) -> _CheckTool:
    """Connect the check's tool, answer the endpoint's initialize if it sends one, and keep
    serving it in the background until ``stack`` closes."""
    ws = await stack.enter_async_context(connect_websocket(url, connect_timeout=timeout))
    tool = _CheckTool(ws)
    await tool.first_frame(0.3)
    nursery = await stack.enter_async_context(trio.open_nursery())
    stack.callback(nursery.cancel_scope.cancel)  # runs first: the serve loop never ends
    nursery.start_soon(tool.serve)
    return tool


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

        http_url = endpoint.url("call", "", http=True)

        async def http_caller(tool: _CheckTool | None, mode: HttpMode) -> CheckResult:
            return await _step(HTTP_STEP, lambda: _http_caller(endpoint, http_url, tool, mode))

        caller = await _step(caller_name, connect_caller)
        if not caller.ok:
            return [
                _skipped(tool_name, "skipped"),
                caller,
                _skipped(trip_name, "skipped"),
                await http_caller(None, "probe"),
            ]
        # tools/list, not ping: an aggregating relay answers ping itself, even with no tool.
        request = {"jsonrpc": "2.0", "id": 0, "method": "tools/list"}
        first: dict[str, object] | None = None
        with trio.move_on_after(timeout):
            await caller_ws[0].send_message(json.dumps(request))
            first = json.loads(await caller_ws[0].get_message())
        error = first.get("error") if first is not None else None
        if not (isinstance(error, dict) and error.get("code") == -32001):
            # A tool is connected (or may be): never replace it with ours.
            tool = _skipped(tool_name, "skipped: the agent's own tool is connected")
            servers = await _step(
                SERVERS_STEP, lambda: _servers_seen(endpoint, None, caller_ws[0], None)
            )
            http = await http_caller(None, "list")
            return [tool, caller, _list_answer(first, timeout), servers, http]
        tools: list[_CheckTool] = []

        async def connect_tool() -> str:
            tools.append(await _open_tool(stack, endpoint.url("mcp", ""), timeout))
            return tools[0].detail + " (with the URL's token: the agent had no tool)"

        tool = await _step(tool_name, connect_tool)
        if not tool.ok:
            return [
                tool,
                caller,
                _skipped(trip_name, "skipped"),
                _skipped(SERVERS_STEP, "skipped"),
                await http_caller(None, "probe"),
            ]
        trip = await _step(
            trip_name,
            lambda: _round_trip(tools[0], caller_ws[0], timeout),
            "the relay did not answer in time: lost response?",
        )
        servers = await _step(
            SERVERS_STEP, lambda: _servers_seen(endpoint, None, caller_ws[0], CHECK_TOOL["name"])
        )
        return [tool, caller, trip, servers, await http_caller(tools[0], "call")]


def _list_answer(response: dict[str, object] | None, timeout: float) -> CheckResult:
    name = "forwarded round trip"
    if response is None:
        return CheckResult(
            name,
            False,
            f"no answer to tools/list (id 0) within {timeout:g} s",
            "a lost response: mcp-endpoint-server 0.0.6 and earlier lose every answer to id 0",
        )
    if response.get("id") == 0 and type(response.get("id")) is int:
        return CheckResult(name, True, "tools/list with id 0 answered for the agent's tool")
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
        tools: list[_CheckTool] = []
        hint = "the token was refused: is --key the server key?"

        async def connect_tool() -> str:
            try:
                tools.append(await _open_tool(stack, endpoint.url("mcp", agent), timeout))
            except _Failed as exc:
                raise _Failed(exc.detail, hint if exc.hint else "") from None
            return tools[0].detail

        async def connect_caller() -> str:
            ws = await stack.enter_async_context(
                connect_websocket(endpoint.url("call", agent), connect_timeout=timeout)
            )
            # A relay may accept, then close a connection it refuses (bad token: 1008).
            with trio.move_on_after(0.3):
                try:
                    message = await ws.get_message()
                except ConnectionClosed as exc:
                    code, reason = _close_of(exc)
                    raise _Failed(
                        f"closed: {code} {reason}", hint if code == 1008 else ""
                    ) from None
                raise _Failed(f"unexpected first frame {message[:80]!r}")
            sockets["caller"] = ws
            return "connected"

        async def http_caller() -> CheckResult:
            url = endpoint.url("call", agent, http=True)
            if tools:
                return await _step(HTTP_STEP, lambda: _http_caller(endpoint, url, tools[0], "call"))
            return await _step(HTTP_STEP, lambda: _http_caller(endpoint, url, None, "probe"))

        tool = await _step("tool connection (/mcp_endpoint/mcp/)", connect_tool)
        caller = await _step("caller connection (/mcp_endpoint/call/)", connect_caller)
        if not (tool.ok and caller.ok):
            return [
                tool,
                caller,
                CheckResult("forwarded round trip", False, "skipped"),
                CheckResult(SERVERS_STEP, False, "skipped"),
                await http_caller(),
            ]
        trip = await _step(
            "forwarded round trip",
            lambda: _round_trip(tools[0], sockets["caller"], timeout),
            "the relay did not answer in time: lost response?",
        )
        servers = await _step(
            SERVERS_STEP,
            lambda: _servers_seen(endpoint, agent, sockets["caller"], CHECK_TOOL["name"]),
        )
        return [tool, caller, trip, servers, await http_caller()]


SERVERS_STEP = "servers a caller sees"


async def _servers_seen(
    endpoint: Endpoint, agent: str | None, caller: WebSocketConnection, expected: object
) -> str:
    """What a caller of the agent is offered: its tools (tools/list through the caller), and
    its servers if the health endpoint lists them per agent (``result.servers``)."""
    request = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    with trio.fail_after(endpoint.timeout):
        await caller.send_message(json.dumps(request))
        response = json.loads(await caller.get_message())
    listed = response.get("result", {}).get("tools") if isinstance(response, dict) else None
    if response.get("id") != 1 or not isinstance(listed, list):
        raise _Failed(f"tools/list got {response!r:.80}", "a caller must be able to list tools")
    names = [t.get("name") for t in listed if isinstance(t, dict)]
    if expected is not None and expected not in names:
        raise _Failed(
            f"tools/list does not offer the check tool's {expected!r} (got {names!r:.60})",
            "the endpoint does not list its tool connections' tools to callers",
        )
    tools = _tools_text(names)
    servers = await _health_servers(endpoint, agent) if agent is not None else None
    if servers is None:
        return tools
    return f"servers: {', '.join(servers) or 'none'}; {tools}"


def _tools_text(names: list[object]) -> str:
    """``3 tools: a, b, c`` (the first eight names)."""
    shown = ", ".join(str(n) for n in names[:8]) + (", ..." if len(names) > 8 else "")
    return f"{len(names)} tool{'s' if len(names) != 1 else ''}" + (f": {shown}" if names else "")


async def _health_servers(endpoint: Endpoint, agent: str) -> list[str] | None:
    """The agent's server identities from the health endpoint, or None if it lists none.

    Read defensively: ``result.servers`` as ``{agent: [row, ...]}`` or ``[{"agent": ...,
    ...}]``, a row naming the server by ``identity``, ``server_id`` or ``name``."""
    if endpoint.key is None:
        return None
    target = f"/mcp_endpoint/health?key={quote(endpoint.key, safe='')}"
    try:
        answer = await _http_get(endpoint.base, target, endpoint.timeout)
        body = json.loads(answer.body)
    except (OSError, ValueError, trio.TooSlowError, trio.BrokenResourceError, h11.ProtocolError):
        return None
    result = body.get("result") if isinstance(body, dict) else None
    servers = result.get("servers") if isinstance(result, dict) else None
    rows: object = None
    if isinstance(servers, dict):
        rows = servers.get(agent, [])
    elif isinstance(servers, list):
        rows = [r for r in servers if isinstance(r, dict) and r.get("agent") == agent]
    if not isinstance(rows, list):
        return None
    names = []
    for row in rows:
        if isinstance(row, dict):
            name = row.get("identity") or row.get("server_id") or row.get("name")
            ready = "" if row.get("ready", True) else " (initializing)"
            names.append(f"{name}{ready}")
    return names


HTTP_STEP: Final = "Streamable HTTP caller"
#: What an endpoint that does not serve Streamable HTTP answers its ``POST`` with.
NOT_SERVED: Final = frozenset({404, 405, 501})
#: ``call``: list the tools and call the check's (ours) one; ``list``: list them only (the
#: agent's own tool is connected); ``probe``: initialize only (there is no tool to call).
HttpMode = Literal["call", "list", "probe"]


async def _http_caller(
    endpoint: Endpoint, url: str, tool: _CheckTool | None, mode: HttpMode
) -> str:
    """A caller over MCP Streamable HTTP at the caller ``url``: a session (``initialize``),
    ``tools/list``, ``tools/call`` of the check's ``tool`` (``mode``), then ``DELETE``.

    Raises:
        _Skip: the endpoint does not serve Streamable HTTP (404, 405 or 501 to the first
            ``POST``), or ``mode`` is ``probe``.
        _Failed: anything else went wrong; the detail says what, the hint what to fix.
    """
    try:
        return await _http_session(endpoint, url, tool, mode)
    except HttpRefused as exc:
        if exc.method == "initialize" and exc.status in NOT_SERVED:
            raise _Skip(
                f"skipped: the endpoint does not serve MCP Streamable HTTP (POST answered HTTP "
                f"{exc.status})"
            ) from None
        raise _Failed(str(exc), http_refusal_hint(exc, url)) from None
    except HttpProtocolError as exc:
        raise _Failed(
            str(exc), "a proxy in front may not pass POST requests and SSE answers through"
        ) from None
    except httpx.HTTPError as exc:
        raise _Failed(describe_connect_failure(exc, url)) from None
    finally:
        if tool is not None:
            tool.answer_calls = False


async def _http_session(
    endpoint: Endpoint, url: str, tool: _CheckTool | None, mode: HttpMode
) -> str:
    doing = "initialize"
    try:
        async with open_http_caller(url, timeout=endpoint.timeout) as caller:
            opened = "session opened" if caller.session_id else "initialized (no session id)"
            if mode == "probe":
                doing = "DELETE"
                ended = await caller.end_session()
                raise _Skip(
                    f"skipped: no tool connection to call (Streamable HTTP answers: {opened}, "
                    f"DELETE {ended})"
                )
            doing = "tools/list"
            listed = await caller.list_tools()
            names: list[object] = [t.get("name") for t in listed if isinstance(t, dict)]
            if mode == "list":
                doing = "DELETE"
                ended = await caller.end_session()
                return (
                    f"{opened}; tools/list: {_tools_text(names)}; DELETE {ended} (the agent's "
                    "own tool: nothing called)"
                )
            if CHECK_TOOL["name"] not in names:
                raise _Failed(
                    f"tools/list does not offer the check tool's {CHECK_TOOL['name']!r} "
                    f"(got {names!r:.60})",
                    "the endpoint does not list its tool connections' tools to HTTP callers",
                )
            assert tool is not None
            tool.answer_calls = True
            doing = "tools/call"
            result = await caller.call_tool(str(CHECK_TOOL["name"]))
            if result != CHECK_RESULT or tool.answered != 1:
                raise _Failed(f"tools/call of check got {result!r:.80}")
            doing = "DELETE"
            ended = await caller.end_session()
    except RpcError as exc:
        raise _Failed(f"{doing} answered with error {exc}") from None
    return f"{opened}; tools/list offers check; tools/call answered; DELETE {ended}"


async def _round_trip(tool: _CheckTool, caller: WebSocketConnection, timeout: float) -> str:
    request = {"jsonrpc": "2.0", "id": 0, "method": "tools/call", "params": {"name": "check"}}
    with trio.fail_after(timeout):
        await caller.send_message(json.dumps(request))
        forwarded = await tool.calls.receive()
        params = forwarded.get("params")
        if not isinstance(params, dict) or params.get("name") != "check":
            raise _Failed(f"the tool got {forwarded!r:.80}")
        await tool.send({"jsonrpc": "2.0", "id": forwarded["id"], "result": CHECK_RESULT})
        response = json.loads(await caller.get_message())
    if response.get("id") != 0 or type(response.get("id")) is not int:
        raise _Failed(
            f"answer came back with id {response.get('id')!r} instead of 0",
            "the relay does not restore request ids exactly (id 0 is lost by "
            "mcp-endpoint-server 0.0.6 and earlier)",
        )
    if response.get("result") != CHECK_RESULT:
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
