"""The HTTP sessions of a relay: by id, and each one's life as a caller of its agent.

A session runs in the relay's connections nursery (:meth:`Sessions.run`): the dispatcher runs
it as a caller peer (:mod:`.session`), and beside it a watcher ends it after
``session_idle_timeout`` seconds with no request and no open stream. However it ends
(``DELETE``, expiry, its client not reading, shutdown), it ends through the dispatcher, which
cancels its requests in flight at the tool, and it is forgotten here.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterator
from functools import partial
from typing import Final, Protocol

import trio

from ..._auth import Authenticator
from ..._config import RelayConfig
from ..._frames import CONNECTION_ERROR, INVALID_REQUEST, LIMIT_EXCEEDED
from ..._guard import FailureLimiter
from ..._routing import Role, Router
from ..dispatch import Dispatcher
from .checks import Refusal
from .session import HttpSession, SessionGone

__all__ = ["CLOSE_DELETED", "CLOSE_EXPIRED", "RelayState", "Sessions", "mint_session_id"]

log = logging.getLogger("trio_mcp_relay.server")

CLOSE_DELETED: Final = 1000
CLOSE_EXPIRED: Final = 1001


class RelayState(Protocol):
    """What the HTTP front reads of the relay (live: a reload may replace any of it)."""

    config: RelayConfig
    authenticator: Authenticator
    router: Router
    dispatcher: Dispatcher
    limiter: FailureLimiter

    def caller_count(self, agent: str) -> int:
        """Callers of ``agent`` (over the whole cluster, in cluster mode)."""
        ...


def mint_session_id() -> str:
    """A new session id: 192 random bits, URL-safe (visible ASCII, as MCP requires)."""
    return secrets.token_urlsafe(24)


class Sessions:
    """Every HTTP session that has not ended, by id, and what opens, runs and ends them.

    Args:
        relay: the relay's live state.
    """

    def __init__(self, relay: RelayState) -> None:
        self.relay = relay
        self._sessions: dict[str, HttpSession] = {}
        self._nursery: trio.Nursery | None = None

    def bind(self, nursery: trio.Nursery) -> None:
        """The nursery sessions run in (the relay's connections nursery)."""
        self._nursery = nursery

    def get(self, session_id: str) -> HttpSession | None:
        """The live session of this id, or None (unknown, ended, expired)."""
        session = self._sessions.get(session_id)
        if session is None or session.closed is not None:
            return None
        return session

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self) -> Iterator[HttpSession]:
        return iter(list(self._sessions.values()))

    async def open(self, agent: str, remote: str, *, legacy: bool) -> HttpSession:
        """A new session of ``agent``, running (refused while the relay shuts down, and over
        the per-agent caller limit or ``max_connections`` sessions)."""
        relay = self.relay
        config = relay.config
        if relay.router.draining:
            raise Refusal(
                503, CONNECTION_ERROR, "the relay is shutting down", headers=(("retry-after", "1"),)
            )
        limit = config.max_callers_per_agent
        if relay.caller_count(agent) >= limit and not self.make_room(agent):
            log.warning("%s: agent %s already has %d callers", remote, agent, limit)
            raise Refusal(429, LIMIT_EXCEEDED, f"too many callers for this agent (limit {limit})")
        if len(self._sessions) >= config.max_connections:
            raise Refusal(
                503,
                LIMIT_EXCEEDED,
                f"too many HTTP sessions (limit {config.max_connections})",
                headers=(("retry-after", "1"),),
            )
        session = HttpSession(
            mint_session_id(),
            agent,
            remote,
            legacy=legacy,
            max_events=config.outbox_size,
            max_bytes=config.outbox_bytes,
            budget=relay.dispatcher.budget,
        )
        assert session.id not in self._sessions
        self._sessions[session.id] = session
        assert self._nursery is not None
        await self._nursery.start(self.run, session)
        return session

    def make_room(self, agent: str) -> bool:
        """End ``agent``'s longest-idle Streamable HTTP session to make room for a new caller;
        False when it has none that is idle.

        Clients that never send ``DELETE`` (MCP Inspector's command line, scripts killed
        mid-way) would otherwise hold the agent's caller slots until their sessions expire,
        and lock out new callers, the device's own included. A session ended this way loses
        nothing (it had nothing under way); its client gets 404 and initializes again, as
        MCP provides for sessions a server ends.
        """
        idle = [s for s in self._sessions.values() if s.agent == agent and s.idle and not s.legacy]
        if not idle:
            return False
        oldest = min(idle, key=lambda s: s.last_active)
        log.info("agent %s: ending idle HTTP session of %s for a new caller", agent, oldest.remote)
        self.end(oldest, CLOSE_EXPIRED, "session ended to make room for a new caller")
        return True

    async def run(
        self, session: HttpSession, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run ``session`` as a caller of its agent until it ends (then forget it).

        It runs in the relay's connections nursery: an unexpected error in it is logged and
        ends this session only, never the relay.
        """
        try:
            async with trio.open_nursery() as nursery:
                run = partial(self._run_peer, session, nursery.cancel_scope)
                session.conn = await nursery.start(run)
                log.info("%s: HTTP session for agent %s opened", session.remote, session.agent)
                task_status.started()
                await self._expire(session)
        except Exception:
            log.exception("%s: HTTP session for agent %s failed", session.remote, session.agent)
            self.end(session, 1011, "internal error")
        finally:
            session.end(*(session.closed or (CLOSE_DELETED, "")))
            if not session.busy:
                session.events.clear()  # give its bytes back to the relay's budget
            if self._sessions.get(session.id) is session:
                del self._sessions[session.id]
            log.info(
                "%s: HTTP session for agent %s ended: %s",
                session.remote,
                session.agent,
                session.closed[1] if session.closed else "",
            )

    async def _run_peer(
        self, session: HttpSession, scope: trio.CancelScope, *, task_status: trio.TaskStatus[int]
    ) -> None:
        try:
            await self.relay.dispatcher.run_peer(
                session, Role.CALLER, session.agent, remote=session.remote, task_status=task_status
            )
        finally:
            scope.cancel()

    async def _expire(self, session: HttpSession) -> None:
        """End ``session`` after ``session_idle_timeout`` seconds without use."""
        while True:
            if session.busy:
                await session.wait_activity()
                continue
            idle = self.relay.config.session_idle_timeout
            deadline = session.last_active + idle
            if trio.current_time() >= deadline:
                self.end(session, CLOSE_EXPIRED, f"session expired after {idle:g} s idle")
                await trio.sleep_forever()  # until the peer has ended (it cancels this)
            with trio.move_on_at(deadline):
                await session.wait_activity()

    def end(self, session: HttpSession, code: int, reason: str) -> None:
        """Close the session's caller (its requests in flight are cancelled at the tool)."""
        dispatcher = self.relay.dispatcher
        peer = dispatcher.peers.get(session.conn) if session.conn is not None else None
        if peer is not None:
            dispatcher.close_peer(peer, code, reason)
        else:
            session.end(code, reason)

    @staticmethod
    async def deliver(session: HttpSession, body: bytes) -> None:
        """Hand a message to the session's caller (404 when the session has ended)."""
        try:
            await session.deliver(body)
        except SessionGone:
            raise Refusal(
                404, INVALID_REQUEST, "Not Found: the session has ended: send initialize again"
            ) from None
