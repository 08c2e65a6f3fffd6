"""What the core and the shell say to each other: the roles of connections and the actions.

Theory of operation
-------------------
The shell tells the core what happened, naming each connection by an integer it picked and,
when it connects, its :class:`Role`. The core answers with a list of actions, which the shell
carries out in order: :class:`Send` (deliver these bytes to that connection) and
:class:`Close` (close that connection with this code). Nothing else crosses the boundary.
"""

from __future__ import annotations

import enum
from typing import Final, TypeAlias

import attrs

__all__ = ["CLOSE_REPLACED", "Action", "Close", "Role", "Send"]

#: Close code sent to a tool connection that a newer one for the same agent replaced.
CLOSE_REPLACED: Final = 4001


class Role(enum.Enum):
    """Which side of the relay a connection is on."""

    TOOL = "tool"
    CALLER = "caller"


class Send:
    """Deliver ``data`` (one JSON text frame) to connection ``conn``.

    ``request`` is set on a caller request forwarded to a tool: if the frame cannot be
    delivered, tell the router with :meth:`~trio_mcp_relay.core.registry.Router.forward_failed`
    so the caller is answered.

    A plain class, not attrs: every frame the relay sends is one, and this ``__init__`` costs
    a third of a frozen attrs one. Treat it as immutable.
    """

    __slots__ = ("conn", "data", "request")

    def __init__(self, conn: int, data: bytes, request: int | None = None) -> None:
        self.conn = conn
        self.data = data
        self.request = request

    def __eq__(self, other: object) -> bool:
        if type(other) is not Send:
            return NotImplemented
        return (self.conn, self.data, self.request) == (other.conn, other.data, other.request)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Send(conn={self.conn!r}, data={self.data!r}, request={self.request!r})"


@attrs.frozen
class Close:
    """Close connection ``conn`` with a WebSocket close code and reason."""

    conn: int
    code: int
    reason: str


Action: TypeAlias = Send | Close
