"""Caller-side MCP clients, for people and scripts (``trio-mcp-relay call``).

Two transports, one interface (:class:`Caller`):

* :func:`open_caller`, over WebSocket: any MCP endpoint's caller side (this relay, the
  reference server) and any MCP server reachable over a plain WebSocket::

    async with open_caller("ws://127.0.0.1:8004/mcp_endpoint/call/?token=...") as caller:
        tools = await caller.list_tools()
        result = await caller.call_tool("add", {"a": 1, "b": 2})

* :func:`open_http_caller`, over MCP Streamable HTTP (2025-03-26 and later): this relay's
  HTTP caller endpoint (the same URL with ``http://``) and any Streamable HTTP MCP server::

    async with open_http_caller("http://127.0.0.1:8004/mcp_endpoint/call/?token=...") as caller:
        tools = await caller.list_tools()

Both perform the MCP handshake (``initialize`` then ``notifications/initialized``). Requests
may run concurrently; each response is matched to its request by id. Server-to-client
requests (``ping``, ``roots/list``) are answered; others get ``-32601``. Notifications are
kept in :attr:`Caller.notifications` (the last 100). Over HTTP, what the server sends while a
request runs (progress, its own requests) comes on that request's SSE stream; the standalone
``GET`` stream is not opened, and the session is ended with ``DELETE`` on exit.
"""

from __future__ import annotations

import abc
import contextlib
import itertools
import json
import math
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import attrs
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from . import __version__
from ._sse import SseParser

if TYPE_CHECKING:
    import httpx  # imported where used: every command imports this module, few need httpx

__all__ = [
    "Caller",
    "HttpProtocolError",
    "HttpRefused",
    "McpCaller",
    "McpHttpCaller",
    "RpcError",
    "connect_websocket",
    "open_caller",
    "open_http_caller",
]

PROTOCOL_VERSION = "2025-06-18"
#: The revision asked for over Streamable HTTP (the server may answer an earlier one).
HTTP_PROTOCOL_VERSION = "2025-11-25"


@attrs.define
class RpcError(Exception):
    """The server answered a request with a JSON-RPC error."""

    code: int
    message: str
    data: Any = None

    def __str__(self) -> str:
        extra = "" if self.data is None else f" ({json.dumps(self.data, ensure_ascii=False)})"
        return f"{self.code} {self.message}{extra}"


def _server_request_answer(frame: dict[str, Any]) -> dict[str, Any]:
    """A caller's answer to a request the server sent it."""
    if frame["method"] == "ping":
        return {"jsonrpc": "2.0", "id": frame["id"], "result": {}}
    if frame["method"] == "roots/list":
        return {"jsonrpc": "2.0", "id": frame["id"], "result": {"roots": []}}
    error = {"code": -32601, "message": f"{frame['method']} is not supported"}
    return {"jsonrpc": "2.0", "id": frame["id"], "error": error}


def _result_of(answer: dict[str, Any]) -> Any:
    """A response's ``result``, or :class:`RpcError` for its ``error``."""
    if "error" in answer:
        error = answer["error"] if isinstance(answer["error"], dict) else {}
        raise RpcError(error.get("code", 0), error.get("message", ""), error.get("data"))
    return answer.get("result")


def _frame(method: str, params: Any, rid: int | None = None) -> dict[str, Any]:
    frame: dict[str, Any] = {"jsonrpc": "2.0"}
    if rid is not None:
        frame["id"] = rid
    frame["method"] = method
    if params is not None:
        frame["params"] = params
    return frame


class Caller(abc.ABC):
    """What every caller offers, whatever its transport: the MCP methods over
    :meth:`request` and :meth:`notify`, which each transport implements."""

    def __init__(self, *, timeout: float) -> None:
        self._timeout = timeout
        self._ids = itertools.count(1)
        self.notifications: deque[dict[str, Any]] = deque(maxlen=100)
        self.server_info: dict[str, Any] = {}

    @abc.abstractmethod
    async def request(self, method: str, params: Any = None) -> Any:
        """Send a request and return its ``result`` (:class:`RpcError` for an error)."""

    @abc.abstractmethod
    async def notify(self, method: str, params: Any = None) -> None:
        """Send a notification."""

    @property
    def _asked_version(self) -> str:
        return PROTOCOL_VERSION

    async def initialize(self) -> dict[str, Any]:
        """The MCP handshake; returns the server's ``initialize`` result."""
        result = await self.request(
            "initialize",
            {
                "protocolVersion": self._asked_version,
                "capabilities": {},
                "clientInfo": {"name": "trio-mcp-relay", "version": __version__},
            },
        )
        self.server_info = result if isinstance(result, dict) else {}
        await self.notify("notifications/initialized")
        return self.server_info

    async def list_tools(self) -> list[dict[str, Any]]:
        """Every tool, following ``nextCursor`` pages."""
        tools: list[dict[str, Any]] = []
        cursor: str | None = None
        while True:
            result = await self.request("tools/list", {"cursor": cursor} if cursor else None)
            tools.extend(result.get("tools", []))
            cursor = result.get("nextCursor")
            if not cursor:
                return tools

    async def call_tool(self, name: str, arguments: dict[str, Any] | None = None) -> Any:
        """Call a tool; returns the ``tools/call`` result (check its ``isError``)."""
        return await self.request("tools/call", {"name": name, "arguments": arguments or {}})


class McpCaller(Caller):
    """One caller connection over WebSocket. Use :func:`open_caller` to make one."""

    def __init__(self, ws: WebSocketConnection, *, timeout: float) -> None:
        super().__init__(timeout=timeout)
        self._ws = ws
        self._waiting: dict[int, trio.MemorySendChannel[dict[str, Any]]] = {}
        self.closed: ConnectionClosed | None = None

    async def _reader(self) -> None:
        try:
            while True:
                frame = json.loads(await self._ws.get_message())
                if not isinstance(frame, dict):
                    continue
                if "method" in frame and "id" in frame:
                    await self._answer_server_request(frame)
                elif "method" in frame:
                    self.notifications.append(frame)
                elif type(frame.get("id")) is int and frame["id"] in self._waiting:
                    self._waiting.pop(frame["id"]).send_nowait(frame)
        except ConnectionClosed as exc:
            self.closed = exc
            for channel in self._waiting.values():
                channel.close()

    async def _answer_server_request(self, frame: dict[str, Any]) -> None:
        await self._ws.send_message(json.dumps(_server_request_answer(frame)))

    async def request(self, method: str, params: Any = None) -> Any:
        """Send a request and return its ``result``.

        Raises:
            RpcError: the server answered with an error.
            trio.TooSlowError: no answer within the client's timeout.
            ConnectionClosed: the connection ended first.
        """
        rid = next(self._ids)
        send, receive = trio.open_memory_channel[dict[str, Any]](1)
        self._waiting[rid] = send
        frame = _frame(method, params, rid)
        try:
            await self._ws.send_message(json.dumps(frame, ensure_ascii=False))
            with trio.fail_after(self._timeout):
                try:
                    answer = await receive.receive()
                except trio.EndOfChannel:
                    assert self.closed is not None
                    raise self.closed from None
        finally:
            self._waiting.pop(rid, None)
        return _result_of(answer)

    async def notify(self, method: str, params: Any = None) -> None:
        """Send a notification."""
        await self._ws.send_message(json.dumps(_frame(method, params), ensure_ascii=False))


@asynccontextmanager
async def connect_websocket(url: str, **kwargs: Any) -> AsyncIterator[WebSocketConnection]:
    """A trio-websocket client connection whose socket is always released on exit.

    trio-websocket 0.12 leaves a client's socket open when the server started the close
    handshake (its reader stops at EOF and ``aclose`` returns early); it is closed here.
    ``kwargs`` go to ``open_websocket_url`` (e.g. ``connect_timeout``, ``subprotocols``).
    """
    ws: WebSocketConnection | None = None
    try:
        async with open_websocket_url(url, **kwargs) as ws:
            yield ws
    finally:
        if ws is not None:
            await trio.aclose_forcefully(ws._stream)


@asynccontextmanager
async def open_caller(
    url: str, *, timeout: float = 30.0, handshake: bool = True
) -> AsyncIterator[McpCaller]:
    """Connect as a caller and (unless ``handshake`` is False) perform the MCP handshake.

    Args:
        url: the caller WebSocket URL, e.g. ``ws://host:8004/mcp_endpoint/call/?token=...``.
        timeout: seconds each request may take.
        handshake: send ``initialize`` / ``notifications/initialized`` first.
    """
    async with (
        connect_websocket(url, connect_timeout=timeout) as ws,
        trio.open_nursery() as nursery,
    ):
        caller = McpCaller(ws, timeout=timeout)
        nursery.start_soon(caller._reader)
        if handshake:
            await caller.initialize()
        yield caller
        nursery.cancel_scope.cancel()


# ------------------------------------------------------------------------- Streamable HTTP


@attrs.define
class HttpRefused(Exception):
    """The server answered an HTTP request with an error status (4xx, 5xx).

    Attributes:
        status: the HTTP status.
        method: what was sent: the JSON-RPC method, or ``DELETE`` (ending the session).
        error: the JSON-RPC error of the body, when it has one.
        session: a session was open (so a 404 means it ended, not that nothing is there).
        body: the start of the body, when it is no JSON-RPC error.
        retry_after: the ``Retry-After`` header, if any.
    """

    status: int
    method: str
    error: RpcError | None = None
    session: bool = False
    body: str = ""
    retry_after: str | None = None

    def __str__(self) -> str:
        said = self.error if self.error is not None else self.body
        return f"HTTP {self.status} to {self.method}" + (f": {said}" if said else "")


class HttpProtocolError(Exception):
    """The server's HTTP answer is no MCP answer (not JSON, not SSE, or no response in it)."""


def _json_messages(body: bytes | str) -> list[Any]:
    """The JSON-RPC messages of a body (one message, or a batch); nothing if not JSON."""
    if not body.strip():
        return []
    try:
        parsed = json.loads(body)
    except ValueError:
        return []
    return parsed if isinstance(parsed, list) else [parsed]


def _content_type(response: httpx.Response) -> str:
    return str(response.headers.get("content-type", "")).split(";")[0].strip().lower()


async def _read_sse(response: httpx.Response, messages: trio.MemorySendChannel[Any]) -> None:
    """Send the JSON-RPC messages of an SSE stream's ``message`` events (an unbounded
    channel: this task only ever waits for the stream)."""
    with messages:
        parser = SseParser()
        async for line in response.aiter_lines():
            event = parser.feed(line)
            if event is not None and event[0] == "message" and event[1]:
                for message in _json_messages(event[1]):
                    messages.send_nowait(message)


class McpHttpCaller(Caller):
    """One caller session over MCP Streamable HTTP. Use :func:`open_http_caller` to make one.

    Every message is a ``POST`` to the URL; the ``Mcp-Session-Id`` the server gives at
    ``initialize`` and the negotiated ``MCP-Protocol-Version`` go on every later one. A
    request's answer is JSON, or an SSE stream whose other messages (progress, the server's
    requests) are handled as they come; :meth:`end_session` sends ``DELETE``.
    """

    def __init__(self, client: httpx.AsyncClient, url: str, *, timeout: float) -> None:
        super().__init__(timeout=timeout)
        self._client = client
        self.url = url
        self.session_id: str | None = None

    @property
    def _asked_version(self) -> str:
        return HTTP_PROTOCOL_VERSION

    @property
    def protocol_version(self) -> str | None:
        """The revision the server answered ``initialize`` with (None before)."""
        version = self.server_info.get("protocolVersion")
        return version if isinstance(version, str) else None

    def _headers(self) -> dict[str, str]:
        headers: dict[str, str] = {}
        if self.session_id is not None:
            headers["mcp-session-id"] = self.session_id
        if self.protocol_version is not None:
            headers["mcp-protocol-version"] = self.protocol_version
        return headers

    async def request(self, method: str, params: Any = None) -> Any:
        """Send a request and return its ``result``.

        Raises:
            RpcError: the server answered with a JSON-RPC error.
            HttpRefused: the server answered the POST with an HTTP error status.
            HttpProtocolError: its answer held no response to the request.
            trio.TooSlowError: no answer within the client's timeout.
            httpx.HTTPError: the connection failed.
        """
        rid = next(self._ids)
        with trio.fail_after(self._timeout):
            answer = await self._post(_frame(method, params, rid), rid)
        assert answer is not None
        return _result_of(answer)

    async def notify(self, method: str, params: Any = None) -> None:
        """Send a notification (answered 202)."""
        with trio.fail_after(self._timeout):
            await self._post(_frame(method, params), None)

    async def _post(self, frame: dict[str, Any], rid: int | None) -> dict[str, Any] | None:
        """POST ``frame``; for a request (``rid``), read the answer until its response."""
        what = str(frame.get("method", "a response"))
        headers = self._headers()
        headers["accept"] = "application/json, text/event-stream"
        headers["content-type"] = "application/json"
        content = json.dumps(frame, ensure_ascii=False).encode()
        async with self._client.stream("POST", self.url, content=content, headers=headers) as r:
            if r.status_code >= 400:
                raise await self._refused(r, what)
            session = r.headers.get("mcp-session-id")
            if session and self.session_id is None:
                self.session_id = session
            if rid is None:
                await r.aread()
                return None
            kind = _content_type(r)
            if kind == "application/json":
                for message in _json_messages(await r.aread()):
                    answer = await self._take(message, rid)
                    if answer is not None:
                        return answer
            elif kind == "text/event-stream":
                answer = await self._answer_on_stream(r, rid)
                if answer is not None:
                    return answer
            else:
                raise HttpProtocolError(
                    f"the answer to {what} is HTTP {r.status_code} with "
                    f"{kind or 'no Content-Type'}, neither JSON nor an SSE stream: is this an "
                    "MCP Streamable HTTP endpoint?"
                )
        raise HttpProtocolError(
            f"the server's answer to {what} (HTTP {r.status_code}) ended without a response to it"
        )

    async def _answer_on_stream(self, r: httpx.Response, rid: int) -> dict[str, Any] | None:
        """Handle the messages of an SSE answer until the response to ``rid`` (None: the
        stream ended without it).

        A task of its own reads the stream, and is cancelled once the response is in: the
        generators under ``aiter_lines`` then end by that exception, never left suspended
        (trio warns of an async generator collected before it was exhausted)."""
        send, receive = trio.open_memory_channel[Any](math.inf)
        answer: dict[str, Any] | None = None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_read_sse, r, send)
                async for message in receive:
                    answer = await self._take(message, rid)
                    if answer is not None:
                        nursery.cancel_scope.cancel()
                        break
        except BaseExceptionGroup as group:
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None  # a read error, as a request raises it
            raise
        return answer

    async def _take(self, message: Any, rid: int) -> dict[str, Any] | None:
        """``message`` if it is the response to ``rid``; else handle it and return None."""
        if not isinstance(message, dict):
            return None
        if "method" in message and "id" in message:
            await self._post(_server_request_answer(message), None)
        elif "method" in message:
            self.notifications.append(message)
        elif type(message.get("id")) is int and message["id"] == rid:
            return message
        return None

    async def _refused(self, response: httpx.Response, what: str) -> HttpRefused:
        body = await response.aread()
        error: RpcError | None = None
        messages = _json_messages(body)
        found = messages[0].get("error") if messages and isinstance(messages[0], dict) else None
        if isinstance(found, dict):
            error = RpcError(found.get("code", 0), found.get("message", ""), found.get("data"))
        text = "" if error is not None else body.decode("utf-8", "replace").strip()[:200]
        return HttpRefused(
            response.status_code,
            what,
            error,
            session=self.session_id is not None,
            body=text,
            retry_after=response.headers.get("retry-after"),
        )

    async def end_session(self) -> int | None:
        """End the session with ``DELETE``; returns the status (None: there was none).

        A 405 (the server does not let clients end sessions) is returned, not raised.

        Raises:
            HttpRefused: any other error status (404: the session had ended already).
            trio.TooSlowError: no answer within the client's timeout.
            httpx.HTTPError: the connection failed.
        """
        if self.session_id is None:
            return None
        headers = self._headers()
        self.session_id = None
        with trio.fail_after(self._timeout):
            async with self._client.stream("DELETE", self.url, headers=headers) as r:
                if r.status_code >= 400 and r.status_code != 405:
                    raise await self._refused(r, "DELETE")
                await r.aread()
        return r.status_code


@asynccontextmanager
async def open_http_caller(
    url: str,
    *,
    timeout: float = 30.0,
    handshake: bool = True,
    headers: dict[str, str] | None = None,
) -> AsyncIterator[McpHttpCaller]:
    """Open a caller session over MCP Streamable HTTP; its interface is :func:`open_caller`'s.

    On exit, the session is ended (``DELETE``, at most 5 s, errors ignored) unless
    :meth:`McpHttpCaller.end_session` ended it already.

    Args:
        url: the Streamable HTTP endpoint, e.g. this relay's caller URL with ``http://``:
            ``http://host:8004/mcp_endpoint/call/?token=...``.
        timeout: seconds each request may take (connecting included).
        handshake: send ``initialize`` / ``notifications/initialized`` first.
        headers: sent with every request (e.g. ``{"authorization": "Bearer TOKEN"}``).
    """
    import httpx

    limits = httpx.Timeout(timeout, read=None)  # a request's deadline is the caller's
    async with httpx.AsyncClient(headers=headers, timeout=limits) as client:
        caller = McpHttpCaller(client, url, timeout=timeout)
        try:
            if handshake:
                await caller.initialize()
            yield caller
        finally:
            if caller.session_id is not None:
                with trio.move_on_after(min(timeout, 5.0), shield=True):
                    with contextlib.suppress(httpx.HTTPError, HttpRefused, trio.TooSlowError):
                        await caller.end_session()
