"""The HTTP sessions of a relay, by id."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

from .session import HttpSession

__all__ = ["SessionStore", "mint_session_id"]


def mint_session_id() -> str:
    """A new session id: 192 random bits, URL-safe (visible ASCII, as MCP requires)."""
    return secrets.token_urlsafe(24)


class SessionStore:
    """Every HTTP session that has not ended, by id."""

    def __init__(self) -> None:
        self._sessions: dict[str, HttpSession] = {}

    def add(self, session: HttpSession) -> None:
        """Keep ``session`` (its id is fresh: see :func:`mint_session_id`)."""
        assert session.id not in self._sessions
        self._sessions[session.id] = session

    def get(self, session_id: str) -> HttpSession | None:
        """The live session of this id, or None (unknown, ended, expired)."""
        session = self._sessions.get(session_id)
        if session is None or session.closed is not None:
            return None
        return session

    def remove(self, session: HttpSession) -> None:
        """Forget ``session`` (it has ended)."""
        if self._sessions.get(session.id) is session:
            del self._sessions[session.id]

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self) -> Iterator[HttpSession]:
        return iter(list(self._sessions.values()))
