"""SSE answers: events on the wire, and a session's stream written to a connection."""

from __future__ import annotations

from typing import Any, Final

import trio

from ..._frames import INTERNAL_ERROR, error_frame
from .conn import HttpClosed, HttpConnection
from .events import Stream, event_id
from .session import HttpSession

__all__ = [
    "HEAD_WAIT",
    "PRIMING_SINCE",
    "SSE_KEEPALIVE",
    "answer_gone",
    "primes",
    "sse_event",
    "write_stream",
]

#: Seconds between SSE comments on a stream with nothing to say (proxies and dead peers).
SSE_KEEPALIVE: Final = 15.0
#: Seconds a stream's head may wait to leave with its first event.
HEAD_WAIT: Final = 0.05
#: The reconnection delay priming events suggest, in milliseconds (SSE ``retry``): a stream
#: the relay ends early (taken over, a slow client dropped) is worth resuming soon.
RETRY_MS: Final = 1000
#: The revision that introduced priming events (an id and no data at a stream's start).
PRIMING_SINCE: Final = "2025-11-25"


def sse_event(data: bytes, *, event: str = "message", eid: str | None = None) -> bytes:
    """One SSE event (each line of ``data`` behind ``data:``)."""
    head = f"id: {eid}\nevent: {event}\n" if eid is not None else f"event: {event}\n"
    lines = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    return head.encode() + b"".join(b"data: " + line + b"\n" for line in lines) + b"\n"


def primes(session: HttpSession) -> bool:
    """Whether the session's streams start with a priming event (2025-11-25 and later)."""
    return (session.version or "") >= PRIMING_SINCE


async def write_stream(
    connection: HttpConnection, session: HttpSession, stream: Stream, after: int, *, prime: bool
) -> bool:
    """Write ``stream``'s events after ``after`` as SSE (the answer's head is held by
    ``connection``) until the stream is done, the session ends, another writer takes the
    stream over, or the client goes. True when the answer ended normally (the connection can
    carry another request); False when the client went.

    Events carry ids (``<stream>-<seq>``) except on a legacy session, whose clients cannot
    resume. A stream that has nothing to say gets an SSE comment every :data:`SSE_KEEPALIVE`
    seconds.
    """
    writer = object()
    session.attach(stream, writer)
    gone = False
    try:
        async with connection.watched() as watch:
            try:
                await _pump(connection, session, stream, after, writer, prime=prime)
            except HttpClosed:  # the client went (reset, or not reading): not the relay's error
                gone = True
        gone = gone or watch.gone
    finally:
        session.detach(stream, writer)
    if gone:
        return False
    try:
        await connection.end_stream()
    except HttpClosed:
        return False
    session.events.release(stream)  # answered whole: nothing left to resume
    return True


async def _pump(
    connection: HttpConnection,
    session: HttpSession,
    stream: Stream,
    after: int,
    writer: object,
    *,
    prime: bool,
) -> None:
    number = stream.number
    legacy = session.legacy
    if prime:
        priming = f"id: {event_id(number, after)}\nretry: {RETRY_MS}\ndata: \n\n"
        await connection.send(priming.encode())
    # The head waits for the first event (one write for both) unless it is slow.
    held = not prime
    while True:
        with trio.move_on_after(HEAD_WAIT if held else SSE_KEEPALIVE) as quiet:
            events = await session.wait_events(stream, after, writer)
        if quiet.cancelled_caught:
            if held:
                await connection.flush()
            else:
                await connection.send(b": keepalive\n\n")
            held = False
            continue
        held = False
        if not events:
            return
        await connection.send(
            b"".join(
                sse_event(data, eid=None if legacy else event_id(number, seq))
                for seq, data in events
            )
        )
        after = events[-1][0]
        session.wrote(stream, after)


async def answer_gone(connection: HttpConnection, request_id: Any) -> None:
    """A resumed request stream whose answer the relay no longer holds: end it with an error
    for its request (an SSE stream that ends with no answer makes clients resume it again)."""
    answer = error_frame(
        request_id, INTERNAL_ERROR, "the answer to this request is no longer held for resumption"
    )
    await connection.send(sse_event(answer))
    await connection.end_stream()
