"""The access log: one line per WebSocket connection, when it ends.

Logger ``trio_mcp_relay.access``, level INFO. The text says it all for a reader::

    127.0.0.1:50312 tool agent=single_module server=calculator duration=2.314s close=1000 \
by=client frames_in=5 frames_out=4

and the same values travel as the record's extras (``role``, ``agent``, ``server``,
``remote``, ``duration``, ``close_code``, ``closed_by``, ``frames_in``, ``frames_out``), which
the JSON log format writes as fields of their own. No token or key is ever part of it: the
connection is named by its address, agent and server identity.

``closed_by`` is ``relay`` when the relay sent the close frame first (its code is then the
relay's), ``client`` when the other side did (1006: the connection dropped without a close
frame), and ``shutdown`` when the relay stopped without a close handshake.
"""

from __future__ import annotations

import logging

from .._routing import Role
from .peer import Peer

__all__ = ["log_access"]

access_log = logging.getLogger("trio_mcp_relay.access")


def log_access(peer: Peer, remote: str, server: str | None, duration: float) -> None:
    """Write the access line of a connection that has ended.

    Args:
        peer: the connection, with its counters and close state.
        remote: the client's address as the relay names it in logs.
        server: a tool connection's server identity (its ``serverInfo`` name or
            ``server_id``), if known.
        duration: seconds from its handshake to its end.
    """
    if not access_log.isEnabledFor(logging.INFO):
        return
    if peer.close_with is not None:
        code: int | None = peer.close_with[0]
        closed_by = "relay"
    elif peer.received_close is not None:
        code, closed_by = peer.received_close, "client"
    else:
        code, closed_by = None, "shutdown"
    tool = peer.role is Role.TOOL
    access_log.info(
        "%s %s agent=%s%s duration=%.3fs close=%s by=%s frames_in=%d frames_out=%d",
        remote,
        peer.role.value,
        peer.agent,
        f" server={server}" if tool else "",
        duration,
        "-" if code is None else code,
        closed_by,
        peer.frames_in,
        peer.frames_out,
        extra={
            "role": peer.role.value,
            "agent": peer.agent,
            "server": server if tool else None,
            "remote": remote,
            "duration": round(duration, 3),
            "close_code": code,
            "closed_by": closed_by,
            "frames_in": peer.frames_in,
            "frames_out": peer.frames_out,
        },
    )
