"""A connection's outbox: a bounded FIFO of outgoing frames with one writer task.

Why not a memory channel: the relay's fast path writes a frame straight to the socket from
the task that routed it, skipping the writer task, and that is only correct when nothing is
queued *and* the writer holds no batch it has taken but not yet written. A channel cannot
tell the second; this outbox can (:attr:`Outbox.idle`).

Items are ``bytes`` (a JSON text frame's payload, to be framed by the writer), :class:`Encoded`
(bytes already framed; empty: flush the rest of a direct write the socket kept), or :data:`PING`.
"""

from __future__ import annotations

from collections import deque
from typing import Final

import trio

__all__ = ["PING", "Encoded", "Outbox"]


class Encoded(bytes):
    """Bytes already framed for the wire, to be written as they are."""


#: Ask the writer to send a WebSocket ping (a JSON payload is never empty).
PING: Final = b""


class Outbox:
    """Frames waiting for one connection's writer.

    Args:
        capacity: items queued at most; :meth:`put_nowait` raises ``trio.WouldBlock`` beyond.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        # Created on first use: most connections are idle, and idle ones should cost little.
        self._items: deque[bytes] | None = None
        self._closed = False
        self._writing = False
        self._wake_writer: trio.Event | None = None
        self._space: trio.Event | None = None

    def __len__(self) -> int:
        return len(self._items) if self._items else 0

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called (the writer still drains what is queued)."""
        return self._closed

    @property
    def idle(self) -> bool:
        """Nothing queued and the writer holds no batch: a direct write keeps the order."""
        return not (self._items or self._writing or self._closed)

    def put_nowait(self, item: bytes) -> None:
        """Queue an item.

        Raises:
            trio.ClosedResourceError: the outbox is closed.
            trio.WouldBlock: it is full.
        """
        if self._closed:
            raise trio.ClosedResourceError("outbox closed")
        if self._items is None:
            self._items = deque()
        elif len(self._items) >= self.capacity:
            raise trio.WouldBlock
        self._items.append(item)
        if self._wake_writer is not None:
            self._wake_writer.set()

    async def put(self, item: bytes) -> None:
        """Queue an item, waiting for room (cancel the wait to give up)."""
        while True:
            try:
                self.put_nowait(item)
            except trio.WouldBlock:
                if self._space is None:
                    self._space = trio.Event()
                await self._space.wait()
            else:
                # Queued: a cancellation now must not make the caller think it was not.
                await trio.lowlevel.cancel_shielded_checkpoint()
                return

    def close(self) -> None:
        """No more items; the writer finishes what is queued, then sees the end."""
        self._closed = True
        if self._wake_writer is not None:
            self._wake_writer.set()
        if self._space is not None:
            self._space.set()  # waiting producers see the closed outbox

    async def take(self, limit: int) -> list[bytes] | None:
        """The writer's next batch (at most ``limit`` items), or None once closed and empty.

        The writer must call :meth:`written` when the batch is on the wire.
        """
        while not self._items:
            if self._closed:
                return None
            self._wake_writer = trio.Event()
            await self._wake_writer.wait()
        count = min(limit, len(self._items))
        batch = [self._items.popleft() for _ in range(count)]
        if not self._items:
            self._items = None  # an empty deque still holds a block of memory
        self._writing = True
        if self._space is not None:
            self._space.set()
            self._space = None
        return batch

    def written(self) -> None:
        """The batch from :meth:`take` has been written."""
        self._writing = False
