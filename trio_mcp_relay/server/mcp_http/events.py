"""One HTTP session's outgoing messages, as SSE streams that can be resumed (pure, no I/O).

Theory of operation
-------------------
Everything the relay sends to an HTTP caller is an *event* of exactly one *stream*, numbered
per session: stream 0 is the standalone stream a ``GET`` opens (messages the relay sends on
its own), streams 1, 2, ... belong each to one ``POST`` that carried a request (its progress,
the requests a tool makes meanwhile, and last its response, which ends the stream). An event
is numbered in its stream; its SSE id is ``"<stream>-<seq>"``, unique in the session, so a
client that comes back with ``Last-Event-ID`` names both the stream to resume and where: it
gets that stream's later events, never another stream's (MCP 2025-11-25, "Resumability").

Which stream a message goes to (:meth:`EventLog.route`):

* a response: the stream of the ``POST`` that carried its request (found by the request id,
  then forgotten: the stream is *done* once its response is in); a response no stream awaits
  (its client cancelled, or left a plain JSON answer) is dropped, never sent on the ``GET``
  stream;
* ``notifications/progress``: the stream of the request whose progress token it carries, while
  that stream is open and is an SSE stream (a ``POST`` answered with plain JSON can carry
  nothing but its response);
* anything else (notifications, requests a tool makes to the caller): the ``GET`` stream when
  one is attached, else the newest open ``POST`` stream a client is reading (its request is the
  likeliest cause), else the ``GET`` stream, to be delivered when the client opens it.

Events stay after they are written, for a client that lost them in a dropped connection: at
most :data:`KEEP_WRITTEN_EVENTS` of them (:data:`KEEP_WRITTEN_BYTES`), and a request stream
whose HTTP answer ended whole is forgotten at once (its request id is remembered, so that a
late resumption is answered). Events that cannot be resumed (plain JSON answers, the legacy
transport) go as soon as they are written. Within the session's bounds (events and bytes),
written events make room first, then unwritten events of stream 0 (notifications nobody
listens for; each dropped one is counted). When unwritten events of request streams alone
exceed the bounds, the client has stopped reading: :class:`Overflow` tells the session to end,
as a WebSocket caller that stops reading is closed 1013. One event is always taken, however
large, when nothing else is held.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable
from typing import Any, Final, Protocol

import attrs

__all__ = [
    "GET_STREAM",
    "EventLog",
    "Overflow",
    "Stream",
    "event_id",
    "parse_event_id",
]

#: The number of the standalone stream (``GET``).
GET_STREAM: Final = 0
#: Done request streams kept for resumption at most, besides the bounds in bytes and events.
MAX_DONE_STREAMS: Final = 64
#: Events already written that are kept for a client that may resume (and their bytes), at
#: most, all streams together: what a dropped connection may have lost, not a history.
KEEP_WRITTEN_EVENTS: Final = 64
KEEP_WRITTEN_BYTES: Final = 1024 * 1024
#: Request streams forgotten whose request id is remembered (to answer a late resumption).
MAX_FORGOTTEN: Final = 256


class Budget(Protocol):
    """Bytes held across many holders against one limit (the relay's ``ByteBudget``)."""

    used: int

    def fits(self, size: int) -> bool:
        """Whether ``size`` more bytes stay within the limit."""
        ...


class Overflow(Exception):
    """The session's client is not reading: its unwritten events exceed the bounds."""


@attrs.define(eq=False, slots=True)
class Stream:
    """One SSE stream of a session.

    Attributes:
        number: its number in the session (0: the ``GET`` stream).
        sse: whether it can carry messages besides a response (False for a ``POST`` answered
            with ``application/json``).
        events: ``(seq, data)`` pairs held, oldest first.
        last: the seq of the newest event (0: none yet).
        written: the highest seq handed to a writer so far.
        done: its response is in; no event follows it.
        attached: the writer streaming it now (any object), or None.
        request_id: the id of the request whose stream it is (None for stream 0), to answer
            a client that resumes it once its own answer is gone.
    """

    number: int
    sse: bool = True
    events: deque[tuple[int, bytes]] = attrs.Factory(deque)
    last: int = 0
    written: int = 0
    done: bool = False
    attached: object | None = None
    request_id: Any = None

    def after(self, seq: int) -> list[tuple[int, bytes]]:
        """The events held with a seq above ``seq``, in order."""
        return [event for event in self.events if event[0] > seq]


def event_id(stream: int, seq: int) -> str:
    """The SSE id of event ``seq`` of ``stream``."""
    return f"{stream}-{seq}"


def parse_event_id(text: str) -> tuple[int, int] | None:
    """``(stream, seq)`` of an id made by :func:`event_id`, or None for anything else."""
    stream, sep, seq = text.strip().partition("-")
    if not sep or not (stream.isdigit() and seq.isdigit()) or len(stream) + len(seq) > 36:
        return None
    if not (stream.isascii() and seq.isascii()):
        return None
    return int(stream), int(seq)


class EventLog:
    """A session's streams and what they hold.

    Args:
        max_events: events held at most, all streams together.
        max_bytes: bytes of event data held at most, all streams together.
        budget: a budget shared with other holders (the relay's queued bytes) that every byte
            held also counts against; :meth:`clear` gives them back.
    """

    def __init__(self, max_events: int, max_bytes: int, budget: Budget | None = None) -> None:
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.budget = budget
        self.streams: dict[int, Stream] = {GET_STREAM: Stream(GET_STREAM)}
        self.nevents = 0
        self.nbytes = 0
        #: Unwritten events of stream 0 dropped for room.
        self.dropped = 0
        self._next = 1
        self._by_request: dict[Hashable, Stream] = {}
        self._by_token: dict[Hashable, Stream] = {}
        self._token_of: dict[int, Hashable] = {}
        #: Request streams forgotten: their request ids, oldest first.
        self.forgotten: dict[int, Any] = {}

    # ------------------------------------------------------------------ streams

    def open(
        self, request: Hashable, token: Hashable | None, *, sse: bool, request_id: Any = None
    ) -> Stream:
        """A new stream for the request keyed ``request`` (its progress token ``token``; its
        id as the client sent it, ``request_id``)."""
        stream = Stream(self._next, sse=sse, request_id=request_id)
        self._next += 1
        self.streams[stream.number] = stream
        self._by_request[request] = stream
        if token is not None:
            self._by_token[token] = stream
            self._token_of[stream.number] = token
        return stream

    def in_flight(self, request: Hashable) -> bool:
        """Whether a request of this key awaits its response on a stream."""
        return request in self._by_request

    @property
    def awaiting(self) -> int:
        """Requests whose response has not come yet."""
        return len(self._by_request)

    def known(self, number: int) -> bool:
        """Whether a stream of this number was ever opened in the session."""
        return number < self._next

    @property
    def get_stream(self) -> Stream:
        """Stream 0."""
        return self.streams[GET_STREAM]

    # ------------------------------------------------------------------ routing

    def route_response(self, request: Hashable) -> Stream | None:
        """The stream a response to ``request`` goes to (the request is forgotten); None
        when no stream awaits it (its client cancelled or left): a response never goes to
        the ``GET`` stream."""
        stream = self._by_request.pop(request, None)
        if stream is None:
            return None
        token = self._token_of.pop(stream.number, None)
        if token is not None:
            self._by_token.pop(token, None)
        return stream

    def cancel(self, request: Hashable) -> Stream | None:
        """The client cancelled ``request``: the stream that awaited its response (to end
        with the cancellation's answer), or None."""
        return self.route_response(request)

    def abandon(self, request: Hashable) -> None:
        """The client of a plain JSON answer left: its response, when it comes, is dropped
        (such an answer cannot be resumed)."""
        stream = self.route_response(request)
        if stream is not None:
            stream.done = True
            self._forget(stream)

    def route_progress(self, token: Hashable) -> Stream:
        """The stream a progress notification with ``token`` goes to."""
        stream = self._by_token.get(token)
        if stream is not None and stream.sse and not stream.done:
            return stream
        return self.route_other()

    def route_other(self) -> Stream:
        """The stream of a message that answers no request (see the module docstring)."""
        get = self.get_stream
        if get.attached is not None:
            return get
        open_streams = [
            s for s in self._by_request.values() if s.sse and not s.done and s.attached is not None
        ]
        if not open_streams:
            return get
        return max(open_streams, key=lambda s: s.number)

    # ------------------------------------------------------------------ events

    def append(self, stream: Stream, data: bytes, *, final: bool = False) -> int:
        """Add an event to ``stream``; ``final`` marks it done. Returns its seq.

        Raises:
            Overflow: the bounds cannot be kept without dropping an unwritten event of a
                request stream (the event is not added).
        """
        self._make_room(len(data))
        stream.last += 1
        stream.events.append((stream.last, data))
        self.nevents += 1
        self.nbytes += len(data)
        if self.budget is not None:
            self.budget.used += len(data)
        if final:
            stream.done = True
            self._forget_done()
        return stream.last

    def wrote(self, stream: Stream, seq: int, *, keep: bool = True) -> None:
        """Events of ``stream`` up to ``seq`` were handed to a writer; without ``keep`` they
        go at once (nobody can resume that stream), else they stay for a client that may
        resume, within :data:`KEEP_WRITTEN_EVENTS` and :data:`KEEP_WRITTEN_BYTES`."""
        if seq > stream.written:
            stream.written = seq
        if not keep:
            while stream.events and stream.events[0][0] <= seq:
                self._drop(stream)
            return
        written = [(s, e) for s in self.streams.values() for e in s.events if e[0] <= s.written]
        excess_events = len(written) - KEEP_WRITTEN_EVENTS
        excess_bytes = sum(len(e[1]) for _, e in written) - KEEP_WRITTEN_BYTES
        for owner, (_, data) in written:  # oldest streams first, oldest events first
            if excess_events <= 0 and excess_bytes <= 0:
                break
            self._drop(owner)
            excess_events -= 1
            excess_bytes -= len(data)

    def release(self, stream: Stream) -> None:
        """A request stream's whole answer was written and its HTTP answer ended: forget it
        (a client resuming it later is told its answer is gone)."""
        if stream.number != GET_STREAM and stream.done and stream.attached is None:
            self._forget(stream)

    def _forget(self, stream: Stream) -> None:
        while stream.events:
            self._drop(stream)
        if self.streams.get(stream.number) is stream:
            del self.streams[stream.number]
            if stream.request_id is not None:
                self.forgotten[stream.number] = stream.request_id
                while len(self.forgotten) > MAX_FORGOTTEN:
                    del self.forgotten[next(iter(self.forgotten))]

    def _over(self, size: int) -> bool:
        if not self.nevents:
            return False  # one event is always taken
        if self.nevents + 1 > self.max_events or self.nbytes + size > self.max_bytes:
            return True
        return self.budget is not None and not self.budget.fits(size)

    def _drop(self, stream: Stream) -> None:
        _, data = stream.events.popleft()
        self.nevents -= 1
        self.nbytes -= len(data)
        if self.budget is not None:
            self.budget.used -= len(data)

    def clear(self) -> None:
        """Drop every event (the session has ended and its streams are done with them)."""
        for stream in self.streams.values():
            while stream.events:
                self._drop(stream)

    def _make_room(self, size: int) -> None:
        if not self._over(size):
            return
        # Written events first, oldest stream first.
        for stream in list(self.streams.values()):
            while stream.events and stream.events[0][0] <= stream.written and self._over(size):
                self._drop(stream)
            if not self._over(size):
                break
        self._forget_done()
        # Then notifications nobody has opened the GET stream for.
        get = self.get_stream
        while get.events and self._over(size):
            self._drop(get)
            self.dropped += 1
        if self._over(size):
            raise Overflow(
                f"{self.nevents} events ({self.nbytes} bytes) held for the client, "
                f"the bounds are {self.max_events} events and {self.max_bytes} bytes"
            )

    def _forget_done(self) -> None:
        """Forget done streams with nothing left to replay, and the oldest done streams
        beyond :data:`MAX_DONE_STREAMS`."""
        done = [s for s in self.streams.values() if s.done and s.attached is None]
        extra = len(done) - MAX_DONE_STREAMS
        for stream in done:
            if extra > 0 or not stream.events:
                self._forget(stream)
                extra -= 1
