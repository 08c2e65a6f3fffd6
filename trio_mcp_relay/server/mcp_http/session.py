"""One MCP session over HTTP, seen by the dispatcher as a caller connection.

An :class:`HttpSession` implements the relay's :class:`~trio_mcp_relay._transport.WebSocket`
interface, so an HTTP caller is a caller like any other for the routing core and the
dispatcher: limits, progress, cancellation, tool-to-caller requests, and the cleanup when it
goes (its requests cancelled at the tool) are the same code. What differs is only the wire:

* ``receive`` returns the messages ``POST`` requests carried (:meth:`HttpSession.deliver`),
  through a bounded channel: a ``POST`` waits while the relay is busy reading, never more.
* ``send_many`` files each outgoing message as an event of one of the session's SSE streams
  (:mod:`.events` says which), where the HTTP responses streaming them pick it up. It never
  waits for a client: a client that stops reading altogether overflows the session's bounds
  and the session ends, as a WebSocket caller that stops reading is closed 1013.
* ``close`` (the dispatcher closing the caller: ``DELETE``, idle expiry, shutdown, 1013) ends
  the session: streams are written out and ended, later requests with its id get 404.
* Keepalive pings are meaningless here (``ping`` does nothing, ``last_pong`` is always now):
  an HTTP session lives while the client uses it, and expires after
  ``session_idle_timeout`` seconds without a request or an open stream.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Hashable, Iterator, Sequence
from typing import Any, Final

import trio

from ..._frames import (
    MISSING,
    ErrorResponse,
    FrameError,
    Notification,
    Result,
    error_frame,
    parse_frame,
)
from ..._transport import ConnectionClosed
from ...core.wire import progress_token
from .events import Budget, EventLog, Overflow, Stream

__all__ = ["CLOSE_NOT_READING", "HttpSession", "SessionGone", "id_key"]

log = logging.getLogger("trio_mcp_relay.server")

CLOSE_NOT_READING: Final = 1013
#: The answer to a request its client cancelled (the code the MCP SDKs use).
REQUEST_CANCELLED: Final = -32800
#: Messages a session's POSTs may have handed over before the relay reads them.
INBOX_SIZE: Final = 16


class SessionGone(Exception):
    """The session has ended: the client must start a new one."""


def id_key(value: Any) -> Hashable:
    """A request id or progress token as a dict key: ``1``, ``1.0`` and ``"1"`` differ."""
    return (type(value).__name__, value)


class HttpSession:
    """A caller of ``agent`` reached over HTTP.

    Args:
        session_id: the ``Mcp-Session-Id`` (or the legacy ``session_id``).
        agent: the agent its token named.
        remote: the client's address, for logs.
        legacy: an HTTP+SSE (2024-11-05) session: every message goes to its one stream.
        max_events: events held for the client at most (see :class:`~.events.EventLog`).
        max_bytes: bytes held for the client at most.
        budget: the relay's queued-bytes budget, which what is held counts against too.
    """

    def __init__(
        self,
        session_id: str,
        agent: str,
        remote: str,
        *,
        legacy: bool = False,
        max_events: int,
        max_bytes: int,
        budget: Budget | None = None,
    ) -> None:
        self.id = session_id
        self.agent = agent
        self.remote = remote
        self.legacy = legacy
        self.events = EventLog(max_events, max_bytes, budget)
        #: The dispatcher's connection number, once it runs.
        self.conn: int | None = None
        #: The protocol revision negotiated at ``initialize``, once answered.
        self.version: str | None = None
        self.closed: tuple[int, str] | None = None
        self._inbox_send, self._inbox = trio.open_memory_channel[bytes](INBOX_SIZE)
        self._changed = trio.Event()
        self._init_request: Hashable | None = None
        #: HTTP exchanges (requests being handled, streams being written) in progress.
        self.busy = 0
        self.last_active = trio.current_time()
        self._activity = trio.Event()

    # ---------------------------------------------------------------- WebSocket (dispatcher)

    async def receive(self) -> bytes:
        """The next message a POST carried; ConnectionClosed once the session has ended."""
        try:
            return await self._inbox.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            code, reason = self.closed or (1000, "")
            raise ConnectionClosed(code, reason) from None

    async def send_many(self, messages: Sequence[bytes]) -> None:
        """File each message as an event of its stream (never waits)."""
        if self.closed is not None:
            raise ConnectionClosed(*self.closed)
        try:
            for message in messages:
                self._file(message)
        except Overflow as exc:
            log.warning(
                "agent %s: HTTP session of %s is not reading: %s", self.agent, self.remote, exc
            )
            self.end(CLOSE_NOT_READING, "the client is not reading its streams")
            raise ConnectionClosed(CLOSE_NOT_READING, "not reading") from None
        finally:
            self._wake()

    @property
    def last_pong(self) -> float | None:
        """Always now: an HTTP session's liveness is its use, not pings."""
        return trio.current_time()

    async def ping(self, payload: bytes = b"") -> None:
        """Nothing to do: see :attr:`last_pong`."""

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """The dispatcher closes this caller: end the session."""
        self.end(code, reason)

    async def aclose(self) -> None:
        """Drop the session at once."""
        self.end(1006, "dropped")

    # ---------------------------------------------------------------- the front's side

    async def deliver(self, message: bytes) -> None:
        """Hand a message a POST carried to the relay.

        Raises:
            SessionGone: the session has ended.
        """
        try:
            await self._inbox_send.send(message)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise SessionGone from None

    def expect_initialize(self, request: Any) -> None:
        """The request with this id is the session's ``initialize``: note its answer's
        protocol revision."""
        self._init_request = id_key(request)

    def open_stream(self, request: Any, params: Any, *, sse: bool) -> Stream:
        """A stream for the response to ``request`` (and its progress, when ``sse``)."""
        token = progress_token(params)
        key = None if token is MISSING else id_key(token)
        return self.events.open(id_key(request), key, sse=sse, request_id=request)

    def cancelled(self, request: Any) -> None:
        """The client cancelled ``request``: its stream ends with the cancellation's answer
        (``-32800``), as the SDKs' servers do: a stream that ended with no answer would make
        a client resume it for ever."""
        stream = self.events.cancel(id_key(request))
        if stream is not None:
            answer = error_frame(request, REQUEST_CANCELLED, "Request cancelled")
            with contextlib.suppress(Overflow):  # no room: the stream just ends
                self.events.append(stream, answer, final=True)
            stream.done = True
        self._wake()

    def abandoned(self, request: Any) -> None:
        """The client of a plain JSON answer to ``request`` left: drop that answer."""
        self.events.abandon(id_key(request))

    def in_flight(self, request: Any) -> bool:
        """Whether a request with this id awaits its response in this session."""
        return self.events.in_flight(id_key(request))

    def end(self, code: int, reason: str) -> None:
        """End the session (once): no message is taken in any more, streams end once they
        are written out."""
        if self.closed is not None:
            return
        self.closed = (code, reason)
        self._inbox_send.close()
        self._wake()
        self.touch()

    async def wait_events(
        self, stream: Stream, after: int, writer: object
    ) -> list[tuple[int, bytes]]:
        """The events of ``stream`` after ``after``, once there are any.

        Returns an empty list when nothing more will come for ``writer``: the stream is done
        and written out, the session ended, or another writer took the stream over.
        """
        while True:
            events = stream.after(after)
            if stream.attached is not writer:
                return []
            if events:
                return events
            if stream.done or self.closed is not None:
                return []
            await self._changed.wait()

    def wrote(self, stream: Stream, seq: int) -> None:
        """``stream``'s events up to ``seq`` were written to a client (kept for resumption
        only where the client can resume)."""
        self.events.wrote(stream, seq, keep=stream.sse and not self.legacy)

    def attach(self, stream: Stream, writer: object) -> None:
        """``writer`` streams ``stream`` from now on (another writer of it stops)."""
        stream.attached = writer
        self._wake()

    def detach(self, stream: Stream, writer: object) -> None:
        """``writer`` stopped streaming ``stream`` (the connection ended or was replaced)."""
        if stream.attached is writer:
            stream.attached = None

    # ---------------------------------------------------------------- idle expiry

    @contextlib.contextmanager
    def exchange(self) -> Iterator[None]:
        """An HTTP exchange is under way: the session is not idle meanwhile."""
        self.busy += 1
        self.touch()
        try:
            yield
        finally:
            self.busy -= 1
            self.touch()
            if not self.busy and self.closed is not None:
                self.events.clear()  # the last writer of an ended session is done

    @property
    def idle(self) -> bool:
        """Nothing under way: no HTTP exchange, no open stream, no request awaiting its answer
        (a session the relay may end without losing anything)."""
        return self.closed is None and not self.busy and not self.events.awaiting

    def touch(self) -> None:
        """The client used the session now."""
        self.last_active = trio.current_time()
        self._activity.set()
        self._activity = trio.Event()

    async def wait_activity(self) -> None:
        """Until the session is next used (or ends)."""
        await self._activity.wait()

    # ---------------------------------------------------------------- internals

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _file(self, message: bytes) -> None:
        events = self.events
        if self.legacy:
            events.append(events.get_stream, message)
            return
        try:
            frame = parse_frame(message)
        except FrameError:
            events.append(events.route_other(), message)
            return
        if (
            isinstance(frame, Result | ErrorResponse)
            and frame.id is not None
            and frame.id is not MISSING
        ):
            key = id_key(frame.id)
            if key == self._init_request and isinstance(frame, Result):
                self._init_request = None
                version = (
                    frame.result.get("protocolVersion") if isinstance(frame.result, dict) else None
                )
                self.version = version if isinstance(version, str) else None
            stream = events.route_response(key)
            if stream is None:
                log.debug("agent %s: an answer no HTTP stream awaits, dropped", self.agent)
                return
            events.append(stream, message, final=True)
            return
        if isinstance(frame, Notification) and frame.method == "notifications/progress":
            params = frame.params
            token = params.get("progressToken", MISSING) if isinstance(params, dict) else MISSING
            if token is not MISSING:
                events.append(events.route_progress(id_key(token)), message)
                return
        events.append(events.route_other(), message)
