"""A connection's outbox: a FIFO of outgoing frames, bounded in frames and in bytes.

Why not a memory channel: the relay's fast path writes a frame straight to the socket from
the task that routed it, skipping the writer task, and that is only correct when nothing is
queued *and* the writer holds no batch it has taken but not yet written. A channel cannot
tell the second; this outbox can (:attr:`Outbox.idle`). A channel also cannot count bytes,
put a ping ahead of queued data, say how long its oldest item has waited, or give back what
it holds when the peer is dropped.

Items are ``bytes`` (a JSON text frame's payload, to be framed by the writer), :class:`Encoded`
(bytes already framed; empty: flush the rest of a direct write the socket kept), or :data:`PING`.
Each carries the time it was queued and an optional request tag (the tool-side id of a
forwarded caller request), so that what never left can be answered.

Every byte queued counts against the outbox's own bound and against a :class:`ByteBudget`
shared by all connections. An item is refused (``trio.WouldBlock``) when either is exceeded,
except that an empty outbox always takes one item: a single frame as large as the message
size limit can always be delivered.
"""

from __future__ import annotations

from collections import deque
from typing import Final

import trio

__all__ = ["PING", "ByteBudget", "Encoded", "Outbox"]


class Encoded(bytes):
    """Bytes already framed for the wire, to be written as they are."""


#: Ask the writer to send a WebSocket ping (a JSON payload is never empty).
PING: Final = b""
#: A writer batch stops growing past this many bytes (one item always fits).
BATCH_BYTES: Final = 256 * 1024


class ByteBudget:
    """Bytes queued across every outbox of a relay, against one limit.

    Args:
        limit: bytes that may be queued in all outboxes together.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def fits(self, size: int) -> bool:
        """Whether ``size`` more bytes stay within the limit."""
        return self.used + size <= self.limit


class Outbox:
    """Frames waiting for one connection's writer.

    Args:
        capacity: items queued at most.
        max_bytes: bytes queued at most (items already taken by the writer but not yet
            written count too).
        budget: the relay-wide budget these bytes also count against.
    """

    __slots__ = (
        "_batch_bytes",
        "_closed",
        "_items",
        "_writing",
        "budget",
        "capacity",
        "max_bytes",
        "nbytes",
    )

    def __init__(self, capacity: int, max_bytes: int, budget: ByteBudget) -> None:
        self.capacity = capacity
        self.max_bytes = max_bytes
        self.budget = budget
        #: Bytes queued or in the batch being written.
        self.nbytes = 0
        # Created on first use: most connections are idle, and idle ones should cost little.
        # Each item: (data, size counted, time queued, request tag).
        self._items: deque[tuple[bytes, int, float, int | None]] | None = None
        self._closed = False
        self._writing = False
        self._batch_bytes = 0

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

    def put_nowait(
        self, item: bytes, *, request: int | None = None, size: int | None = None
    ) -> None:
        """Queue an item at the end.

        Args:
            item: what to write.
            request: a tag given back by :meth:`expire` and :meth:`clear` if it never leaves.
            size: the bytes it stands for, when not ``len(item)`` (the part of a direct
                write the socket kept).

        Raises:
            trio.ClosedResourceError: the outbox is closed.
            trio.WouldBlock: it is full, in frames or in bytes, or the relay's budget is.
        """
        if self._closed:
            raise trio.ClosedResourceError("outbox closed")
        size = len(item) if size is None else size
        items = self._items
        if items is None:  # nothing queued: always room for one item
            items = self._items = deque()
        elif len(items) >= self.capacity or not (
            self.nbytes + size <= self.max_bytes and self.budget.fits(size)
        ):
            raise trio.WouldBlock
        items.append((item, size, trio.current_time(), None if request is None else request))
        self._count(size)

    def put_control(self, item: bytes) -> None:
        """Queue a control item (a ping) ahead of every queued frame, whatever the bounds.

        It still goes after the batch the writer holds (a frame is never split).

        Raises:
            trio.ClosedResourceError: the outbox is closed.
        """
        if self._closed:
            raise trio.ClosedResourceError("outbox closed")
        items = self._items
        if items is None:
            items = self._items = deque()
        # Stamped like the item it goes before, so the queue stays in time order.
        stamp = items[0][2] if items else trio.current_time()
        items.appendleft((item, 0, stamp, None))

    def _count(self, size: int) -> None:
        self.nbytes += size
        self.budget.used += size

    def oldest(self) -> float | None:
        """When the oldest queued item was queued (None: nothing queued)."""
        items = self._items
        return items[0][2] if items else None

    def expire(self, queued_before: float) -> list[int]:
        """Drop the items queued at or before ``queued_before``; their request tags."""
        items = self._items
        tags: list[int] = []
        while items and items[0][2] <= queued_before:
            _, size, _, tag = items.popleft()
            self._count(-size)
            if tag is not None:
                tags.append(tag)
        if not items:
            self._items = None
        return tags

    def clear(self) -> list[int]:
        """Drop everything queued (not the batch being written); the request tags dropped."""
        return self.expire(float("inf"))

    def close(self) -> None:
        """No more items; the writer finishes what is queued, then sees the end."""
        self._closed = True

    def take_nowait(self, limit: int) -> list[bytes] | None:
        """The writer's next batch (at most ``limit`` items and about :data:`BATCH_BYTES`),
        or None when nothing is queued (the writer then ends, or sends the close frame once
        :attr:`closed`: it is started again when something is queued).

        The writer must call :meth:`written` when the batch is on the wire.
        """
        items = self._items
        if not items:
            return None
        batch: list[bytes] = []
        batch_bytes = 0
        while items and len(batch) < limit and (not batch or batch_bytes < BATCH_BYTES):
            data, size, _, _ = items.popleft()
            batch.append(data)
            batch_bytes += size
        if not items:
            self._items = None  # an empty deque still holds a block of memory
        self._writing = True
        self._batch_bytes = batch_bytes
        return batch

    def written(self) -> None:
        """The batch from :meth:`take_nowait` has been written (or abandoned)."""
        self._writing = False
        self._count(-self._batch_bytes)
        self._batch_bytes = 0
