"""What the shell counts for the metrics: traffic, closes, failed authentications.

Plain integers, bumped where the event happens (the dispatcher, the handshake, the routes)
and read when ``/metrics`` is scraped (:mod:`.metrics`). Every key comes from a small fixed
set, so nothing here grows with the traffic.
"""

from __future__ import annotations

from typing import Final

from .. import _auth, _scoped

__all__ = ["AUTH_REASONS", "CALLER", "TOOL", "ShellCounts", "auth_reason"]

#: Index of each role in the per-role lists.
TOOL: Final = 0
CALLER: Final = 1

#: A failed authentication's category, from the reason the authenticator gave (free text:
#: a custom authenticator may say anything, which is then ``other``).
_CATEGORIES: Final = {
    _auth.REASON_MISSING: "missing_token",
    _auth.REASON_NOT_BASE64: "malformed_token",
    _auth.REASON_NOT_JSON: "malformed_token",
    _auth.REASON_NO_AGENT_ID: "malformed_token",
    _auth.REASON_AGENT_ID_NOT_STRING: "malformed_token",
    _scoped.REASON_MALFORMED: "malformed_token",
    _auth.REASON_WRONG_KEY: "wrong_key",
    _scoped.REASON_UNKNOWN_KEY: "wrong_key",
    _scoped.REASON_FORGED: "wrong_key",
    _scoped.REASON_EXPIRED: "expired_token",
    _auth.REASON_CALLER_ON_TOOL: "wrong_endpoint",
    _auth.REASON_TOOL_ON_CALLER: "wrong_endpoint",
    _auth.REASON_REFERENCE_REFUSED: "reference_token_refused",
}
#: Every category :func:`auth_reason` gives, and those the HTTP endpoints count.
AUTH_REASONS: Final = (
    *sorted(set(_CATEGORIES.values())),
    "bad_server_id",
    "admin_key",
    "other",
)


def auth_reason(reason: str) -> str:
    """The category of an :class:`~trio_mcp_relay.AuthError` reason."""
    return _CATEGORIES.get(reason, "other")


class ShellCounts:
    """Counters of one relay's shell.

    Attributes:
        frames_in: messages received, per role (index :data:`TOOL`, :data:`CALLER`).
        bytes_in: their payload bytes (UTF-8), per role.
        frames_out: JSON frames sent (written or queued), per role.
        bytes_out: their payload bytes, per role.
        closes: connections the relay closed, by close code.
        auth_failures: failed authentications, by category (see :data:`AUTH_REASONS`).
    """

    __slots__ = ("auth_failures", "bytes_in", "bytes_out", "closes", "frames_in", "frames_out")

    def __init__(self) -> None:
        self.frames_in = [0, 0]
        self.bytes_in = [0, 0]
        self.frames_out = [0, 0]
        self.bytes_out = [0, 0]
        self.closes: dict[int, int] = {}
        self.auth_failures: dict[str, int] = {}

    def closed(self, code: int) -> None:
        """The relay closed a connection with ``code``."""
        self.closes[code] = self.closes.get(code, 0) + 1

    def auth_failed(self, category: str) -> None:
        """An authentication failed (``category`` from :data:`AUTH_REASONS`)."""
        self.auth_failures[category] = self.auth_failures.get(category, 0) + 1
