"""A small bounded ring of the relay's recent errors and closes, for the status page.

The dispatcher feeds it two things, both cheap to notice on its path:

* every close the relay itself starts (:meth:`~.dispatch.Dispatcher.close_peer`: a replaced
  server 4001, a caller not reading 1013, a missed pong 1011, an initialization timeout,
  shutdown 1001...), with its code and reason;
* every error frame it delivers carrying one of the relay's own codes (``-32001`` to
  ``-32007``: no tool, forward failed, connection error, no caller, timeout, limit), to a
  caller or to a tool. A tool that answers with one of these codes itself is counted too:
  the codes are the relay's, whoever wrote them.

Nothing secret goes in: agent ids, codes, and the reasons the relay writes (which name tools
and limits, never tokens or keys). Reasons are cut to :data:`MAX_REASON` characters. The ring
holds :data:`CAPACITY` events; older ones fall off, so memory stays bounded whatever happens.
"""

from __future__ import annotations

import collections
import json
import time
from collections.abc import Callable
from typing import Final

import attrs

__all__ = ["CAPACITY", "ERROR_MARK", "RecentErrors", "RelayEvent"]

#: Events kept at most.
CAPACITY: Final = 64
#: Characters of a reason kept at most.
MAX_REASON: Final = 200
#: What an error frame with one of the relay's codes holds (``-32001`` to ``-32007`` follow
#: with their last digit), as ``dumps`` writes it.
ERROR_MARK: Final = b',"error":{"code":-3200'
_LAST_DIGITS: Final = frozenset(f"{digit},".encode() for digit in range(1, 8))
#: How far into a frame the mark is looked for: an error frame's id comes first, and ids
#: longer than this are not worth scanning a large result for.
MARK_WINDOW: Final = 256


@attrs.frozen
class RelayEvent:
    """One error or close.

    Attributes:
        at: Unix time it happened.
        agent: the agent of the connection.
        role: ``tool`` or ``caller``, the side of the connection it went to.
        kind: ``close`` (a WebSocket close code) or ``error`` (a JSON-RPC error code).
        code: the close code or the error code.
        reason: the close reason, or the error's message and data.
    """

    at: float
    agent: str
    role: str
    kind: str
    code: int
    reason: str


class RecentErrors:
    """The ring. ``clock`` gives Unix time (tests replace it)."""

    def __init__(self, capacity: int = CAPACITY, clock: Callable[[], float] = time.time) -> None:
        self._events: collections.deque[RelayEvent] = collections.deque(maxlen=capacity)
        self._clock = clock

    def closed(self, agent: str, role: str, code: int, reason: str) -> None:
        """The relay closed a connection of ``agent`` with ``code`` and ``reason``."""
        self._events.append(
            RelayEvent(self._clock(), agent, role, "close", code, reason[:MAX_REASON])
        )

    def sent(self, agent: str, role: str, data: bytes) -> None:
        """A frame is going to a connection of ``agent``: remember it if it is an error
        with one of the relay's codes. Costs one bounded substring search otherwise."""
        at = data.find(ERROR_MARK, 0, MARK_WINDOW)
        if at < 0 or data[at + len(ERROR_MARK) : at + len(ERROR_MARK) + 2] not in _LAST_DIGITS:
            return
        try:
            error = json.loads(data)["error"]
            code = int(error["code"])
            reason = str(error.get("message", ""))
            if "data" in error:
                detail = error["data"]
                reason += ": " + (detail if isinstance(detail, str) else json.dumps(detail))
        except (ValueError, TypeError, KeyError, AttributeError):
            return
        self._events.append(
            RelayEvent(self._clock(), agent, role, "error", code, reason[:MAX_REASON])
        )

    def since(self, start: float) -> list[RelayEvent]:
        """The events at or after Unix time ``start``, newest first."""
        return [event for event in reversed(self._events) if event.at >= start]
