"""A caller-side MCP client over WebSocket, for people and scripts (``trio-mcp-relay call``).

Works against any MCP endpoint's caller side (this relay, the reference server) and any MCP
server reachable over a plain WebSocket::

    async with open_caller("ws://127.0.0.1:8004/mcp_endpoint/call/?token=...") as caller:
        tools = await caller.list_tools()
        result = await caller.call_tool("add", {"a": 1, "b": 2})

:func:`open_caller` performs the MCP handshake (``initialize`` then
``notifications/initialized``). Requests may run concurrently; each response is matched to
its request by id. Server-to-client requests (``ping``, ``roots/list``) are answered; others
get ``-32601``. Notifications are kept in :attr:`McpCaller.notifications` (the last 100).
"""

from __future__ import annotations

import itertools
import json
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from . import __version__

__all__ = ["McpCaller", "RpcError", "connect_websocket", "open_caller"]

PROTOCOL_VERSION = "2025-06-18"


@attrs.define
class RpcError(Exception):
    """The server answered a request with a JSON-RPC error."""

    code: int
    message: str
    data: Any = None

    def __str__(self) -> str:
        extra = "" if self.data is None else f" ({json.dumps(self.data, ensure_ascii=False)})"
        return f"{self.code} {self.message}{extra}"


class McpCaller:
    """One caller connection. Use :func:`open_caller` to make one."""

    def __init__(self, ws: WebSocketConnection, *, timeout: float) -> None:
        self._ws = ws
        self._timeout = timeout
        self._ids = itertools.count(1)
        self._waiting: dict[int, trio.MemorySendChannel[dict[str, Any]]] = {}
        self.notifications: deque[dict[str, Any]] = deque(maxlen=100)
        self.server_info: dict[str, Any] = {}
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
        if frame["method"] == "ping":
            answer: dict[str, Any] = {"jsonrpc": "2.0", "id": frame["id"], "result": {}}
        elif frame["method"] == "roots/list":
            answer = {"jsonrpc": "2.0", "id": frame["id"], "result": {"roots": []}}
        else:
            error = {"code": -32601, "message": f"{frame['method']} is not supported"}
            answer = {"jsonrpc": "2.0", "id": frame["id"], "error": error}
        await self._ws.send_message(json.dumps(answer))

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
        frame: dict[str, Any] = {"jsonrpc": "2.0", "id": rid, "method": method}
        if params is not None:
            frame["params"] = params
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
        if "error" in answer:
            error = answer["error"]
            raise RpcError(error.get("code", 0), error.get("message", ""), error.get("data"))
        return answer.get("result")

    async def notify(self, method: str, params: Any = None) -> None:
        """Send a notification."""
        frame: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            frame["params"] = params
        await self._ws.send_message(json.dumps(frame, ensure_ascii=False))

    async def initialize(self) -> dict[str, Any]:
        """The MCP handshake; returns the server's ``initialize`` result."""
        result = await self.request(
            "initialize",
            {
                "protocolVersion": PROTOCOL_VERSION,
                "capabilities": {},
                "clientInfo": {"name": "trio-mcp-relay", "version": __version__},
            },
        )
        await self.notify("notifications/initialized")
        self.server_info = result if isinstance(result, dict) else {}
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
