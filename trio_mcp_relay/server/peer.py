"""One WebSocket connection's life on the relay side: outbox, writer, fast path, close state.

Theory of operation
-------------------
A :class:`Peer` is created for a connection that has authenticated, *before* its handshake
answer (the 101) leaves, so that the router knows it as soon as the client does. Its state
moves one way::

    HANDSHAKE --(101 written)--> OPEN --(close asked)--> CLOSING --(task ended)--> CLOSED
        \\_____________________________(close asked)___/^

* ``HANDSHAKE``: frames routed to it are queued; no ping, no direct write.
* ``OPEN``: a frame goes straight to the socket when nothing is queued and the writer holds
  no batch (the *fast path*, which keeps the order only under that condition: see
  :attr:`Outbox.idle`); otherwise it is queued for the writer task, which is started when
  something is queued and ends when nothing is (an idle connection costs no task for it).
  The watchdog (the dispatcher's policy for frames queued too long) lives the same way.
* ``CLOSING``: nothing more is accepted. The writer sends what is queued (or, when the peer is
  dropped for not reading, abandons it: see :meth:`Peer.close`), then the close frame.
* ``CLOSED``: the connection task has ended.

What is queued is bounded in frames and bytes (:class:`~.outbox.Outbox`); what a full outbox
means is the dispatcher's business, not the peer's. Keepalive state (when the last ping was
sent, whether one is owed) lives here too; the keepalive loop that reads it is in
:mod:`.lifecycle`.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from typing import Final

import attrs
import trio

from .. import _wsframes as wsframes
from .._routing import Role
from .._transport import ConnectionClosed, ServerWebSocket, WebSocket, encode_text_frame
from .outbox import PING, Encoded, Outbox

__all__ = ["Peer", "PeerState"]

_MAX_BATCH: Final = 256
_PING_FRAME: Final = wsframes.frame(wsframes.OP_PING)


class PeerState(enum.Enum):
    """Where a connection is in its life (see the module docstring)."""

    HANDSHAKE = "handshake"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


@attrs.define(eq=False, slots=True)
class Peer:
    """A connection the router knows, and everything the relay holds for it.

    Attributes:
        conn: the router's name for this connection.
        role: tool or caller.
        agent: the agent id from its token.
        ws: the WebSocket.
        outbox: frames waiting for the writer.
        nursery: the connection's nursery (writer and watchdog run there while something is
            queued).
        last_ping: ``trio.current_time()`` of the last ping queued (or of the connection).
        ping_sent: when the ping whose pong is awaited was queued; None when none is owed.
    """

    conn: int
    role: Role
    agent: str
    ws: WebSocket
    outbox: Outbox
    nursery: trio.Nursery
    last_ping: float
    ping_sent: float | None = None
    state: PeerState = PeerState.HANDSHAKE
    close_with: tuple[int, str] | None = None
    #: Whether the writer task runs (or is started): from a frame queued until the outbox
    #: is empty again, and for good once closing.
    writer_started: bool = False
    #: Set when the connection task has ended (state CLOSED); created when first awaited.
    _done: trio.Event | None = None
    #: Set once the close frame has been written (or could not be).
    close_sent: trio.Event | None = None
    #: Started with the writer: watches how long frames stay queued (the dispatcher's policy),
    #: and returns when nothing is (it is started again with the writer).
    watchdog: Callable[[Peer], Awaitable[None]] | None = None
    _write_scope: trio.CancelScope | None = None
    #: The running watchdog's scope (None: no watchdog runs).
    _watch_scope: trio.CancelScope | None = None
    #: JSON frames received from it and sent (or queued) to it, for the access log.
    frames_in: int = 0
    frames_out: int = 0
    #: The close code the peer sent, if it closed (or answered our close).
    received_close: int | None = None

    # ------------------------------------------------------------------ sending

    def send_nowait(self, data: bytes, request: int | None = None) -> None:
        """Queue a JSON frame, or write it at once when that keeps the order.

        Raises:
            trio.WouldBlock: the outbox is full (in frames or bytes).
            trio.ClosedResourceError: the peer is closing.
        """
        # may_write_now(), inlined: this runs for every frame the relay sends.
        if (
            self.state is PeerState.OPEN
            and type(self.ws) is ServerWebSocket
            and self.outbox.idle
            and self._write_now(encode_text_frame(data))
        ):
            self.frames_out += 1
            return
        self.outbox.put_nowait(data, request=request)
        self.frames_out += 1
        self.start_writer()

    def ping_nowait(self) -> None:
        """Send a ping now, or queue it ahead of every queued frame (it never counts against
        the bounds). An idle connection's ping is written at once: no writer task for it."""
        if self.may_write_now() and self._write_now(_PING_FRAME):
            return
        self.outbox.put_control(PING)
        self.start_writer()

    def write_now_many(self, frames: list[bytes]) -> int:
        """Write encoded frames straight to the socket, in one write, as far as it takes
        them: how many it began (the rest of a begun one is the writer's, as with
        :meth:`send_nowait`). 0 when the fast path is not open; the others are the caller's
        to send the ordinary way (:meth:`send_nowait`), in order, after these."""
        ws = self.ws
        if not self.may_write_now():
            return 0
        assert type(ws) is ServerWebSocket
        begun = ws.send_now_many(frames)
        if begun is None:
            return 0
        if ws.unsent:
            # The socket keeps the rest of one frame: the writer's next write sends it.
            self.outbox.put_nowait(Encoded(b""), size=ws.unsent)
            self.start_writer()
        self.frames_out += begun
        return begun

    def may_write_now(self) -> bool:
        """The fast path keeps the order only when nothing is queued or being written."""
        ws = self.ws
        return self.state is PeerState.OPEN and self.outbox.idle and type(ws) is ServerWebSocket

    def _write_now(self, frame: bytes) -> bool:
        """Write an encoded frame straight to the socket; True when it is taken care of
        (written whole, or its rest queued for the writer), False when it was not tried."""
        assert type(self.ws) is ServerWebSocket
        rest = self.ws.send_now(frame)
        if rest is None:
            return False
        if rest:
            # The socket keeps the rest: the writer's next write sends it.
            self.outbox.put_nowait(Encoded(b""), size=len(rest))
            self.start_writer()
        return True

    def start_writer(self) -> None:
        """Start the writer and the watchdog unless they run (never before the 101 has left)."""
        if self.state is PeerState.HANDSHAKE:
            return
        if not self.writer_started:
            self.writer_started = True
            self.nursery.start_soon(self._writer)
        if self._watch_scope is None and self.watchdog is not None:
            self._watch_scope = scope = trio.CancelScope()
            self.nursery.start_soon(self._watch, self.watchdog, scope)

    async def _watch(
        self, watchdog: Callable[[Peer], Awaitable[None]], scope: trio.CancelScope
    ) -> None:
        try:
            with scope:
                await watchdog(self)
        finally:
            if self._watch_scope is scope:  # not already stopped (and maybe started again)
                self._watch_scope = None

    def opened(self) -> None:
        """The 101 has been written: frames queued meanwhile may go."""
        if self.state is PeerState.HANDSHAKE:
            self.state = PeerState.OPEN
            if len(self.outbox):
                self.start_writer()

    # ------------------------------------------------------------------ closing

    def close(self, code: int, reason: str, *, abandon: bool = False) -> list[int]:
        """Stop accepting frames and send the close frame after what is queued.

        Args:
            code: the close code.
            reason: the close reason (cut to fit a close frame).
            abandon: drop what is queued and cut short the write in progress (its unsent
                rest still goes first, so no frame is left half written), so that a peer
                that stopped reading gets the close frame as soon as it reads again.

        Returns:
            The request tags of frames dropped without being sent (empty unless
            ``abandon``), so the dispatcher can answer them.
        """
        if self.state in (PeerState.CLOSING, PeerState.CLOSED):
            return []
        handshake = self.state is PeerState.HANDSHAKE
        self.state = PeerState.CLOSING
        self.close_with = (code, reason)
        self.close_sent = trio.Event()
        dropped: list[int] = []
        if abandon:
            dropped = self.outbox.clear()
            if self._write_scope is not None:
                self._write_scope.cancel()
        self.outbox.close()
        if handshake:
            self.close_sent.set()  # no 101 left yet: nothing to close politely
            self.nursery.cancel_scope.cancel()
        elif not self.writer_started:
            self.writer_started = True
            self.nursery.start_soon(self._writer)
        return dropped

    def ended(self) -> None:
        """The connection task has ended."""
        self.state = PeerState.CLOSED
        if self.close_sent is not None:
            self.close_sent.set()
        if self._done is not None:
            self._done.set()

    async def wait_done(self) -> None:
        """Wait until the connection task has ended."""
        if self.state is PeerState.CLOSED:
            await trio.lowlevel.checkpoint()
            return
        if self._done is None:
            self._done = trio.Event()  # an open connection holds none until it is awaited
        await self._done.wait()

    # ------------------------------------------------------------------ writer

    async def _writer(self) -> None:
        """Write what the outbox holds, in batches, until it is empty; once it is closed,
        the close frame after what it holds."""
        ws, outbox = self.ws, self.outbox
        try:
            while (batch := outbox.take_nowait(_MAX_BATCH)) is not None:
                try:
                    with trio.CancelScope() as self._write_scope:
                        await _write_batch(ws, batch)
                finally:
                    self._write_scope = None
                    outbox.written()
                    # Not held past the write (orjson's bytes take 4 KB each, whatever their
                    # length).
                    del batch
            if not outbox.closed:
                # Nothing queued: the writer ends, and the next frame that cannot go straight
                # to the socket starts it again (an idle connection holds no task for it),
                # with the watchdog, which has nothing left to watch until then.
                self.writer_started = False
                if self._watch_scope is not None:
                    self._watch_scope.cancel()
                    self._watch_scope = None
                return
            # The outbox was closed: everything queued is sent; now the close frame.
            if self.close_with is not None:
                await ws.close(*self.close_with)
        except ConnectionClosed:
            self.nursery.cancel_scope.cancel()
        finally:
            if self.close_sent is not None:
                self.close_sent.set()


async def _write_batch(ws: WebSocket, batch: list[bytes]) -> None:
    """Send a batch of outbox items in order: one write on a socket WebSocket."""
    if type(ws) is ServerWebSocket:
        parts = [
            item if type(item) is Encoded else encode_text_frame(item) if item else _PING_FRAME
            for item in batch
        ]
        await ws.send_encoded(parts)
        return
    frames: list[bytes] = []
    for item in batch:
        if item is not PING and item:
            frames.append(item)
            continue
        if frames:
            await ws.send_many(frames)
            frames = []
        await ws.ping()
    if frames:
        await ws.send_many(frames)
