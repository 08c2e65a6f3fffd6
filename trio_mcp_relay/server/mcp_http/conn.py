"""HTTP/1.1 for the MCP transports: requests with bodies, keep-alive, streamed answers (h11).

The relay's probes (health, status) answer one request and close; MCP clients instead keep a
connection for many requests and hold some answers open as SSE streams. :class:`HttpConnection`
does that on one Trio stream with h11: :meth:`~HttpConnection.next_request` reads a request
and its body (bounded), :meth:`~HttpConnection.respond` sends a whole answer,
:meth:`~HttpConnection.open_stream` starts a chunked one whose parts go with
:meth:`~HttpConnection.send`. While a stream is written, :meth:`~HttpConnection.until_closed`
reads the socket so that a client that goes away is noticed at once.

Errors: a peer that breaks HTTP, closes, or sends a body over the limit surfaces as
:class:`HttpClosed` or :class:`BodyTooLarge`; every Trio transport error is mapped here.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import AsyncIterator, Iterable
from http import HTTPStatus
from typing import Final

import attrs
import h11
import trio

from ..._http import MAX_HEAD_SIZE, Target

__all__ = ["BodyTooLarge", "HttpClosed", "HttpConnection", "Request", "Watch"]

_READ_SIZE: Final = 65536


@attrs.define
class Watch:
    """Whether the client of a :meth:`HttpConnection.watched` block went away."""

    gone: bool = False


class HttpClosed(Exception):
    """The connection cannot carry another request or answer (closed, reset, broken HTTP)."""


class BodyTooLarge(Exception):
    """The request's body is over the limit (answer 413; the connection cannot be reused)."""


@attrs.frozen
class Request(Target):
    """One HTTP request, with its body."""

    method: str
    target: str
    headers: dict[str, str]
    body: bytes = b""


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Unknown"


class HttpConnection:
    """The server side of one HTTP/1.1 connection.

    Args:
        stream: the connection.
        initial: bytes already read from it (the first request's head, and what followed).
        max_body: the largest request body accepted, in bytes.
        write_timeout: seconds one write may wait for a client that does not read; then the
            connection counts as gone (:class:`HttpClosed`).
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        initial: bytes,
        max_body: int,
        write_timeout: float = math.inf,
    ) -> None:
        self.stream = stream
        self.max_body = max_body
        self.write_timeout = write_timeout
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_SIZE)
        self._h11.receive_data(initial)
        self._eof = False
        #: Bytes encoded but not written yet (a stream's head, until its first part).
        self._held = b""

    async def _read_more(self) -> None:
        try:
            data = await self.stream.receive_some(_READ_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        if not data:
            self._eof = True
        self._h11.receive_data(bytes(data))

    def _next_event(self) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        try:
            return self._h11.next_event()
        except h11.RemoteProtocolError as exc:
            raise HttpClosed(str(exc).split(":", 1)[0]) from None

    async def next_request(self) -> Request | None:
        """The next request, body included; None when the client closed between requests.

        Raises:
            HttpClosed: broken HTTP, or the connection ended inside a request.
            BodyTooLarge: the body is over ``max_body`` (the request head is in ``.request``).
        """
        while True:
            event = self._next_event()
            if event is h11.NEED_DATA:
                if self._eof:
                    if self._h11.their_state is h11.IDLE:
                        return None
                    raise HttpClosed("connection closed inside a request")
                await self._read_more()
                continue
            if isinstance(event, h11.ConnectionClosed):
                return None
            if isinstance(event, h11.Request):
                break
            raise HttpClosed("unexpected HTTP event")
        headers: dict[str, str] = {}
        for name, value in event.headers:
            key = name.decode("latin-1").lower()
            text = value.decode("latin-1")
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
        head = Request(
            method=event.method.decode("ascii", "replace"),
            target=event.target.decode("latin-1"),
            headers=headers,
        )
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            raise BodyTooLarge(head)
        body = bytearray()
        while True:
            event = self._next_event()
            if event is h11.NEED_DATA:
                if self._eof:
                    raise HttpClosed("connection closed inside a request body")
                await self._read_more()
                continue
            if isinstance(event, h11.Data):
                body += event.data
                if len(body) > self.max_body:
                    raise BodyTooLarge(head)
                continue
            if isinstance(event, h11.EndOfMessage):
                return attrs.evolve(head, body=bytes(body))
            raise HttpClosed("unexpected HTTP event in a request body")

    def _encode(self, event: h11.Event) -> bytes:
        try:
            return self._h11.send(event) or b""
        except h11.LocalProtocolError as exc:
            raise HttpClosed(str(exc)) from None

    async def _write(self, data: bytes) -> None:
        data, self._held = self._held + data, b""
        try:
            with trio.move_on_after(self.write_timeout) as stuck:
                await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise HttpClosed("the client went away") from exc
        if stuck.cancelled_caught:  # the connection is unusable now: half a write went
            raise HttpClosed(f"the client did not read for {self.write_timeout:g} s")

    async def respond(
        self,
        status: int,
        body: bytes = b"",
        headers: Iterable[tuple[str, str]] = (),
        *,
        content_type: str | None = "application/json",
        close: bool = False,
    ) -> None:
        """Send a whole answer, in one write (``close``: say the connection ends after it)."""
        all_headers = [("content-length", str(len(body))), ("server", "trio-mcp-relay")]
        if body and content_type is not None:
            all_headers.append(("content-type", content_type))
        if close:
            all_headers.append(("connection", "close"))
        all_headers.extend(headers)
        response = h11.Response(status_code=status, headers=all_headers, reason=_reason(status))
        data = self._encode(response)
        if body:
            data += self._encode(h11.Data(data=body))
        await self._write(data + self._encode(h11.EndOfMessage()))

    def open_stream(self, headers: Iterable[tuple[str, str]] = ()) -> None:
        """Start a 200 answer of ``text/event-stream`` whose parts follow (chunked); its head
        leaves with the first part."""
        all_headers = [
            ("content-type", "text/event-stream"),
            ("cache-control", "no-cache, no-transform"),
            ("x-accel-buffering", "no"),  # nginx: pass events on as they come
            ("server", "trio-mcp-relay"),
            *headers,
        ]
        self._held += self._encode(h11.Response(status_code=200, headers=all_headers, reason=b"OK"))

    async def send(self, data: bytes) -> None:
        """One part of the answer started by :meth:`open_stream`."""
        await self._write(self._encode(h11.Data(data=data)))

    async def flush(self) -> None:
        """Send what is held (the head of a stream with no part yet)."""
        if self._held:
            await self._write(b"")

    async def end_stream(self) -> None:
        """End the answer started by :meth:`open_stream`."""
        await self._write(self._encode(h11.EndOfMessage()))

    async def until_closed(self) -> None:
        """Read the socket until the client closes it (bytes of a next request are kept)."""
        while not self._eof:
            await self._read_more()
            if len(self._h11.trailing_data[0]) > MAX_HEAD_SIZE + self.max_body:
                return  # a client that sends without reading: treat it as gone

    async def linger(self, seconds: float) -> None:
        """Half-close, then discard what the client still sends, until it closes or
        ``seconds``: closing with unread bytes would reset the connection, and a reset can
        destroy the answer before the client reads it (RFC 9112, 9.6)."""
        with trio.move_on_after(seconds):
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                if isinstance(self.stream, trio.abc.HalfCloseableStream):
                    await self.stream.send_eof()
                while await self.stream.receive_some(_READ_SIZE):
                    pass

    @contextlib.asynccontextmanager
    async def watched(self) -> AsyncIterator[Watch]:
        """A block that is cancelled when the client closes the connection (reading it
        meanwhile: see :meth:`until_closed`); ``watch.gone`` says whether it did."""
        watch = Watch()
        async with trio.open_nursery() as nursery:

            async def run() -> None:
                await self.until_closed()
                watch.gone = True
                nursery.cancel_scope.cancel()

            nursery.start_soon(run)
            yield watch
            nursery.cancel_scope.cancel()

    def next_cycle(self) -> bool:
        """Ready the connection for another request; False when it must close instead."""
        if self._h11.our_state is h11.DONE and self._h11.their_state is h11.DONE:
            with contextlib.suppress(h11.LocalProtocolError):
                self._h11.start_next_cycle()
                return True
        return False
