"""Remote MCP servers for the pipe: Streamable HTTP and the older HTTP+SSE, over ``httpx``.

:func:`run_remote` takes the place of a child process for a config entry of type ``http`` or
``sse``: lines the bridge writes (JSON-RPC frames, the bridge's own ids) are sent to the
server, and every JSON-RPC message the server sends back is handed to ``deliver``, compact,
one at a time. It returns only by raising :class:`RemoteError` (the server is unreachable,
ended the session, or closed its stream); the bridge then reconnects with backoff and replays
the endpoint's ``initialize``, as it restarts a child.

Streamable HTTP (MCP 2025-03-26 and later): every frame is a POST; the answer is JSON, an
SSE stream (progress, then the response), or 202. The ``Mcp-Session-Id`` the server gives on
``initialize`` and the negotiated ``MCP-Protocol-Version`` go on every later request; a 404
for the session means it is gone (reconnect). A GET stream, when the server offers one,
carries its own requests and notifications.

HTTP+SSE (MCP 2024-11-05): a GET opens the event stream, whose first ``endpoint`` event names
the URL to POST frames to; messages arrive as ``message`` events.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final
from urllib.parse import urljoin

import httpx
import trio

from ._frames import FrameError, _loads, dumps
from ._sse import SseParser

__all__ = ["RemoteError", "run_remote"]

log = logging.getLogger("trio_mcp_relay.pipe")

Deliver = Callable[[bytes], Awaitable[None]]

#: Seconds to connect and to send; a response may take as long as the tool does.
CONNECT_TIMEOUT: Final = 10.0
#: ... except the answer to ``initialize``, which everything else waits for.
INITIALIZE_TIMEOUT: Final = 30.0


class RemoteError(Exception):
    """The remote server cannot be used now; the message (one line) says why."""


def _messages(body: bytes) -> list[Any]:
    if not body.strip():
        return []
    try:
        parsed = _loads(body)
    except FrameError:
        log.warning("the remote MCP server sent something that is not JSON: %r", body[:200])
        return []
    return parsed if isinstance(parsed, list) else [parsed]


def _describe(exc: httpx.HTTPError) -> str:
    cause = exc.__cause__ or exc.__context__
    detail = str(exc) or (str(cause) if cause else "") or type(exc).__name__
    return f"{type(exc).__name__}: {detail}"


async def run_remote(
    transport: str,
    url: str,
    headers: dict[str, str],
    lines: trio.MemoryReceiveChannel[bytes],
    deliver: Deliver,
) -> None:
    """Bridge ``lines`` to the remote server at ``url`` until it fails.

    Raises:
        RemoteError: Always, eventually; the message says what went wrong.
    """
    timeout = httpx.Timeout(CONNECT_TIMEOUT, read=None)
    failure: RemoteError | None = None
    try:
        async with httpx.AsyncClient(headers=headers, timeout=timeout) as client:
            if transport == "sse":
                await _run_sse(client, url, lines, deliver)
            else:
                await _StreamableHttp(client, url, deliver).run(lines)
    except* RemoteError as group:
        failure = group.exceptions[0]  # type: ignore[assignment]
    except* httpx.HTTPError as group:
        failure = RemoteError(_describe(group.exceptions[0]))  # type: ignore[arg-type]
    raise failure or RemoteError("the remote MCP server stopped answering")


def _error_for(frame: Any, message: str) -> bytes | None:
    """A JSON-RPC error answering ``frame``, if it is a request."""
    if not (isinstance(frame, dict) and "method" in frame and "id" in frame):
        return None
    error = {"code": -32603, "message": message}
    return dumps({"jsonrpc": "2.0", "id": frame["id"], "error": error})


class _StreamableHttp:
    def __init__(self, client: httpx.AsyncClient, url: str, deliver: Deliver) -> None:
        self.client = client
        self.url = url
        self.deliver = deliver
        self.session_id: str | None = None
        self.version: str | None = None
        self.listening = False

    def _headers(self, accept: str) -> dict[str, str]:
        headers = {"accept": accept}
        if self.session_id is not None:
            headers["mcp-session-id"] = self.session_id
        if self.version is not None:
            headers["mcp-protocol-version"] = self.version
        return headers

    async def run(self, lines: trio.MemoryReceiveChannel[bytes]) -> None:
        async with trio.open_nursery() as nursery:
            async for line in lines:
                try:
                    frame = _loads(line)
                except FrameError:
                    frame = None
                if isinstance(frame, dict) and frame.get("method") == "initialize":
                    # Inline: its answer carries the session id every later request needs.
                    await self._post(line, frame)
                    if self.session_id is not None and not self.listening:
                        self.listening = True
                        nursery.start_soon(self._listen)
                else:
                    nursery.start_soon(self._post, line, frame)

    async def _post(self, line: bytes, frame: Any) -> None:
        headers = self._headers("application/json, text/event-stream")
        headers["content-type"] = "application/json"
        initialize = isinstance(frame, dict) and frame.get("method") == "initialize"
        timeout = httpx.Timeout(CONNECT_TIMEOUT, read=INITIALIZE_TIMEOUT if initialize else None)
        try:
            async with self.client.stream(
                "POST", self.url, content=line, headers=headers, timeout=timeout
            ) as r:
                if r.status_code == 404 and self.session_id is not None:
                    raise RemoteError("the remote MCP server ended the session (HTTP 404)")
                if r.status_code >= 400:
                    await r.aread()
                    hint = " (check the entry's headers)" if r.status_code in (401, 403) else ""
                    log.warning("the remote MCP server answered HTTP %d%s", r.status_code, hint)
                    error = _error_for(
                        frame, f"the remote MCP server answered HTTP {r.status_code}"
                    )
                    if error is not None:
                        await self.deliver(error)
                    return
                session = r.headers.get("mcp-session-id")
                if session:
                    self.session_id = session
                kind = r.headers.get("content-type", "").split(";")[0].strip().lower()
                if r.status_code == 202:  # a notification or response, accepted
                    await r.aread()
                elif kind == "application/json":
                    await self._hand_over(await r.aread(), frame)
                elif kind == "text/event-stream":
                    parser = SseParser()
                    async for text in r.aiter_lines():
                        event = parser.feed(text)
                        if event is not None and event[0] == "message" and event[1]:
                            await self._hand_over(event[1].encode(), frame)
        except httpx.HTTPError as exc:
            error = _error_for(frame, f"the remote MCP server is unreachable: {_describe(exc)}")
            if error is not None:
                await self.deliver(error)
            raise RemoteError(_describe(exc)) from None

    async def _hand_over(self, body: bytes, frame: Any) -> None:
        for message in _messages(body):
            if (
                isinstance(frame, dict)
                and frame.get("method") == "initialize"
                and isinstance(message, dict)
                and isinstance(message.get("result"), dict)
            ):
                version = message["result"].get("protocolVersion")
                self.version = version if isinstance(version, str) else None
            await self.deliver(dumps(message))

    async def _listen(self) -> None:
        """The server's own stream (its requests and notifications), if it offers one."""
        try:
            async with self.client.stream(
                "GET", self.url, headers=self._headers("text/event-stream")
            ) as r:
                if r.status_code != 200:
                    return  # 405: the server offers no such stream
                parser = SseParser()
                async for text in r.aiter_lines():
                    event = parser.feed(text)
                    if event is not None and event[0] == "message" and event[1]:
                        await self._hand_over(event[1].encode(), None)
        except httpx.HTTPError as exc:
            log.debug("the remote MCP server's GET stream ended: %s", _describe(exc))


async def _run_sse(
    client: httpx.AsyncClient,
    url: str,
    lines: trio.MemoryReceiveChannel[bytes],
    deliver: Deliver,
) -> None:
    async with (
        client.stream("GET", url, headers={"accept": "text/event-stream"}) as r,
        trio.open_nursery() as nursery,
    ):
        if r.status_code != 200:
            hint = " (check the entry's headers)" if r.status_code in (401, 403) else ""
            raise RemoteError(f"GET {url} answered HTTP {r.status_code}{hint}")
        parser = SseParser()
        endpoint: str | None = None
        async for text in r.aiter_lines():
            event = parser.feed(text)
            if event is None:
                continue
            if endpoint is None:
                if event[0] == "endpoint":
                    endpoint = urljoin(url, event[1].strip())
                    nursery.start_soon(_post_each, client, endpoint, lines, deliver)
                continue
            if event[0] == "message" and event[1]:
                for message in _messages(event[1].encode()):
                    await deliver(dumps(message))
        nursery.cancel_scope.cancel()
    raise RemoteError("the remote MCP server closed its SSE stream")


async def _post_each(
    client: httpx.AsyncClient,
    endpoint: str,
    lines: trio.MemoryReceiveChannel[bytes],
    deliver: Deliver,
) -> None:
    async for line in lines:
        r = await client.post(endpoint, content=line, headers={"content-type": "application/json"})
        if r.status_code >= 400:
            log.warning("the remote MCP server answered HTTP %d to a message", r.status_code)
            try:
                frame = _loads(line)
            except FrameError:
                continue
            error = _error_for(frame, f"the remote MCP server answered HTTP {r.status_code}")
            if error is not None:
                await deliver(error)
