"""The registry of agents and connections, and the :class:`Router` the shell talks to.

Theory of operation
-------------------
The :class:`Router` is told what happened (a peer connected, sent a message, went away, a
deadline passed) and answers with a list of actions for the I/O layer to carry out:
:class:`~trio_mcp_relay.core.actions.Send` and :class:`~trio_mcp_relay.core.actions.Close`.
Connections are named by integers the caller of the router picks.

The router itself decides nothing about frames. It keeps two maps: agents by name, each with
its :class:`~trio_mcp_relay.core.session.Session` (created when the agent's first connection
arrives, forgotten once nothing is connected and nothing in flight), and connections by id,
each to its :class:`~trio_mcp_relay.core.session.Caller` or
:class:`~trio_mcp_relay.core.session.Server` record, which names its session and so its agent
and role. A frame is parsed once, its connection looked up once, and the frame handed to that
connection's session, which holds every routing rule (see :mod:`trio_mcp_relay.core.session`).
A connection that a newer one replaced is unregistered at once: whatever it still sends is
ignored.

Deadlines cross sessions because the shell has a single timer: every session appends to one
:class:`~trio_mcp_relay.core.session.Deadlines`, and :meth:`Router.next_deadline` and
:meth:`Router.expire` walk its queues in order, handing each deadline back to its session.

Looking ahead, the inputs stay the same when an agent gains several tool connections (each
pending entry already names its server) or when a peer lives on another relay node (a
connection id is all the router knows of a peer, and a session knows nothing of the router).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from .._frames import FrameError, dumps, parse_frame
from .actions import Action, Role, Send
from .catalog import Kind
from .middleware import Middleware
from .session import AgentFilters, Caller, Deadlines, Policy, Server, Session
from .tally import Tally

__all__ = ["Router", "reference_counts"]

log = logging.getLogger("trio_mcp_relay.routing")


def reference_counts(tools: int, callers_by_agent: dict[str, int]) -> dict[str, Any]:
    """Connection counts in the reference server's health-check shape."""
    callers = sum(callers_by_agent.values())
    return {
        "tool_connections": tools,
        "robot_connections": callers,
        "total_connections": tools + callers,
        "robot_connections_by_agent": callers_by_agent,
    }


def _own_callers(session: Session) -> int:
    return sum(1 for c in session.callers.values() if c.target is None)


class Router:
    """Routing state of every agent, and the decisions that change it.

    Args:
        tool_request_timeout: seconds a caller has to answer a request the tool sent it.
        request_timeout: seconds a caller request may wait for the tool's answer before the
            relay answers ``-32006`` itself and cancels it at the tool; 0 waits forever.
        max_inflight_per_caller: requests one caller may have in flight; more get ``-32007``
            (0: no limit).
        max_tool_requests: tool-initiated requests awaiting a caller per agent; more get
            ``-32007`` (0: no limit).
        init_timeout: seconds each step of a server's initialization may take before it is
            closed ``4003``.
        list_changed_delay: catalog changes within this many seconds reach callers as one
            ``list_changed``.
        filters: tool filters per agent; ``default_filters`` for the agents not named.
        middleware: see :mod:`trio_mcp_relay.core.middleware`.
        tally: where the sessions count outcomes (see :mod:`trio_mcp_relay.core.tally`).
    """

    def __init__(
        self,
        *,
        tool_request_timeout: float = 30.0,
        request_timeout: float = 0.0,
        max_inflight_per_caller: int = 0,
        max_tool_requests: int = 0,
        init_timeout: float = 10.0,
        list_changed_delay: float = 0.2,
        filters: Mapping[str, AgentFilters] | None = None,
        default_filters: AgentFilters | None = None,
        middleware: Sequence[Middleware] = (),
        tally: Tally | None = None,
    ) -> None:
        self._policy = Policy(
            tool_request_timeout=tool_request_timeout,
            request_timeout=request_timeout,
            max_inflight_per_caller=max_inflight_per_caller,
            max_tool_requests=max_tool_requests,
            init_timeout=init_timeout,
            list_changed_delay=list_changed_delay,
            filters=dict(filters or {}),
            default_filters=default_filters or AgentFilters(),
            middleware=tuple(middleware),
            tally=Tally() if tally is None else tally,
        )
        self._deadlines = Deadlines()
        self._sessions: dict[str, Session] = {}
        self._connections: dict[int, Caller | Server] = {}

    # ------------------------------------------------------------------ settings

    # The settings live in the Policy every session shares, so a change reaches them all.

    @property
    def draining(self) -> bool:
        """Set during a graceful shutdown: new caller requests are refused with -32003."""
        return self._policy.draining

    @draining.setter
    def draining(self, value: bool) -> None:
        self._policy.draining = value

    @property
    def watch(self) -> Callable[[str, str], None] | None:
        """Told ``(agent, identity)`` when a server's part of the catalog may have changed
        (see :attr:`~trio_mcp_relay.core.session.Policy.watch`)."""
        return self._policy.watch

    @watch.setter
    def watch(self, value: Callable[[str, str], None] | None) -> None:
        self._policy.watch = value

    @property
    def elsewhere(self) -> Callable[[str], int] | None:
        """Per agent, tool requests awaiting a caller on other relay nodes (cluster mode)."""
        return self._policy.elsewhere

    @elsewhere.setter
    def elsewhere(self, value: Callable[[str], int] | None) -> None:
        self._policy.elsewhere = value

    @property
    def tool_request_timeout(self) -> float:
        return self._policy.tool_request_timeout

    @tool_request_timeout.setter
    def tool_request_timeout(self, value: float) -> None:
        self._policy.tool_request_timeout = value

    @property
    def request_timeout(self) -> float:
        return self._policy.request_timeout

    @request_timeout.setter
    def request_timeout(self, value: float) -> None:
        self._policy.request_timeout = value

    @property
    def max_inflight_per_caller(self) -> int:
        return self._policy.max_inflight_per_caller

    @max_inflight_per_caller.setter
    def max_inflight_per_caller(self, value: int) -> None:
        self._policy.max_inflight_per_caller = value

    @property
    def max_tool_requests(self) -> int:
        return self._policy.max_tool_requests

    @max_tool_requests.setter
    def max_tool_requests(self, value: int) -> None:
        self._policy.max_tool_requests = value

    @property
    def init_timeout(self) -> float:
        return self._policy.init_timeout

    @init_timeout.setter
    def init_timeout(self, value: float) -> None:
        self._policy.init_timeout = value

    def set_filters(
        self,
        filters: Mapping[str, AgentFilters],
        default_filters: AgentFilters | None = None,
        now: float = 0.0,
    ) -> None:
        """Replace the tool filters (arguments as for the constructor), for the agents
        connected now and those to come. Callers whose view of the tools changes get
        ``notifications/tools/list_changed`` after ``list_changed_delay``, from
        :meth:`expire`, as for any other change to the catalog."""
        self._policy.filters = dict(filters)
        self._policy.default_filters = default_filters or AgentFilters()
        for name, session in self._sessions.items():
            session.set_filters(self._policy.filters.get(name, self._policy.default_filters), now)

    # ------------------------------------------------------------------ introspection

    def role(self, conn: int) -> Role | None:
        """The role of a registered connection, or None."""
        link = self._connections.get(conn)
        if link is None:
            return None
        return Role.CALLER if isinstance(link, Caller) else Role.TOOL

    def tool_of(self, agent: str) -> int | None:
        """A tool connection serving ``agent`` (its default server), or None."""
        session = self._sessions.get(agent)
        server = session.default_server() if session else None
        return server.conn if server else None

    def stats(self) -> dict[str, Any]:
        """Connection counts in the reference server's health-check shape."""
        sessions = self._sessions.values()
        by_agent = {s.name: n for s in sessions if (n := _own_callers(s))}
        tools = sum(1 for s in sessions for server in s.servers.values() if not server.remote)
        return reference_counts(tools, by_agent)

    def servers(self) -> dict[str, list[dict[str, Any]]]:
        """Per agent that has servers, each server's identity (None while unknown), ready,
        tool count, and the time (on the router's clock) it connected: :meth:`agents`,
        reduced to what the health check and the metrics show."""
        return {
            agent: [
                {
                    "identity": server["identity"],
                    "ready": server["ready"],
                    "tools": len(server["tools"]),
                    "connected_at": server["connected_at"],
                }
                for server in row["servers"]
            ]
            for agent, row in self.agents().items()
            if row["servers"]
        }

    def agents(self) -> dict[str, dict[str, Any]]:
        """Per agent, what a status page shows (read-only; nothing here changes state).

        Each agent maps to ``callers`` (connected), ``in_flight`` (caller requests at a
        server), ``tool_requests`` (server requests awaiting a caller), ``parked`` (caller
        requests waiting for an initialization) and ``servers``: per server in connection
        order its ``identity`` (None while unknown), ``server_id`` (from its URL or token),
        ``ready``, ``tools`` (the names it listed, as it spelled them; empty until ready) and
        ``connected_at`` (on the router's clock).
        """
        out: dict[str, dict[str, Any]] = {}
        for session in self._sessions.values():
            servers = []
            for server in session.servers.values():
                view = session.catalog.server(server.identity) if server.identity else None
                tools = view.items[Kind.TOOLS] if view is not None and server.ready else ()
                servers.append(
                    {
                        "identity": server.identity,
                        "server_id": server.server_id,
                        "ready": server.ready,
                        "tools": [str(tool.get("name", "")) for tool in tools],
                        "connected_at": server.connected_at,
                    }
                )
            out[session.name] = {
                "callers": len(session.callers),
                "in_flight": len(session.pending),
                "tool_requests": len(session.tool_requests),
                "parked": len(session.parked),
                "servers": servers,
            }
        return out

    def identity_of(self, conn: int) -> str | None:
        """The identity of a tool connection (None until it is known, or for no tool)."""
        link = self._connections.get(conn)
        return link.identity if isinstance(link, Server) else None

    def has_server(self, agent: str, identity: str) -> bool:
        """Whether ``agent`` has a server of this identity connected."""
        session = self._sessions.get(agent)
        return session is not None and identity in session.by_identity

    @property
    def tally(self) -> Tally:
        """What the sessions counted (for the metrics)."""
        return self._policy.tally

    def session(self, agent: str) -> Session | None:
        """The session of ``agent``, if it has one (for status pages and tests)."""
        return self._sessions.get(agent)

    def pending_count(self) -> int:
        """Requests in flight in either direction, over all agents."""
        return sum(
            len(s.pending) + len(s.tool_requests) + len(s.parked) for s in self._sessions.values()
        )

    def tool_requests_by_agent(self) -> dict[str, int]:
        """Per agent, requests of its servers on this node awaiting a caller."""
        out: dict[str, int] = {}
        for session in self._sessions.values():
            if session.tool_requests:
                servers = session.servers
                count = sum(
                    1 for r in session.tool_requests.values() if not servers[r.server].remote
                )
                if count:
                    out[session.name] = count
        return out

    def caller_count(self, agent: str) -> int:
        """How many callers ``agent`` has connected (not counting those standing for
        another relay node's callers)."""
        session = self._sessions.get(agent)
        return _own_callers(session) if session else 0

    def take_deadline_change(self) -> bool:
        """Whether a deadline was added since the last call (then wake the timer)."""
        deadlines = self._deadlines
        added, deadlines.added = deadlines.added, False
        return added

    def next_deadline(self) -> float | None:
        """The earliest deadline :meth:`expire` acts on, or None if there is none."""
        deadlines = self._deadlines
        requests, tool_requests = deadlines.requests, deadlines.tool_requests
        relay, notify = deadlines.relay, deadlines.notify
        # Drop entries of requests answered in time (amortized O(1): each goes once).
        while requests and not requests[0][1].awaits_request(requests[0][2], requests[0][3]):
            requests.popleft()
        while tool_requests and not (
            tool_requests[0][1].awaits_tool_request(tool_requests[0][2], tool_requests[0][3])
        ):
            tool_requests.popleft()
        while relay and not relay[0][1].awaits_relay(relay[0][2], relay[0][3]):
            relay.popleft()
        fronts = [q[0][0] for q in (requests, tool_requests, relay, notify) if q]
        return min(fronts, default=None)

    # ------------------------------------------------------------------ connections

    def _session(self, agent: str) -> Session:
        session = self._sessions.get(agent)
        if session is None:
            session = self._sessions[agent] = Session(agent, self._policy, self._deadlines)
        return session

    def _maybe_forget(self, session: Session) -> None:
        if session.idle and self._sessions.get(session.name) is session:
            del self._sessions[session.name]

    def tool_connected(
        self,
        conn: int,
        agent: str,
        server_id: str | None = None,
        now: float = 0.0,
        *,
        remote: bool = False,
    ) -> list[Action]:
        """A tool connection for ``agent`` is up: a server of the agent, initialized by the
        relay. With the ``server_id`` of a connected server, it replaces (and closes) it.
        ``remote``: it stands for a server on another relay node (cluster mode)."""
        session = self._session(agent)
        server = Server(conn, session, server_id, remote=remote)
        self._connections[conn] = server
        actions = session.server_connected(server, now)
        self._drop(session)
        return actions

    def tool_disconnected(self, conn: int, now: float = 0.0) -> list[Action]:
        """A tool connection went away. Unknown or already replaced connections are a no-op."""
        server = self._connections.get(conn)
        if not isinstance(server, Server):
            return []
        del self._connections[conn]
        session = server.session
        actions = session.server_disconnected(server, now)
        self._drop(session)
        self._maybe_forget(session)
        return actions

    def _drop(self, session: Session) -> None:
        """Unregister the server connections the session closed or replaced."""
        if session.dropped:
            for conn in session.dropped:
                self._connections.pop(conn, None)
            session.dropped.clear()

    def caller_connected(self, conn: int, agent: str, target: str | None = None) -> list[Action]:
        """A caller connection for ``agent`` is up. With ``target``, it stands for another
        relay node's callers of that server (see :attr:`Caller.target`)."""
        session = self._session(agent)
        caller = Caller(conn, session, target=target)
        self._connections[conn] = caller
        return session.caller_connected(caller)

    def caller_disconnected(self, conn: int) -> list[Action]:
        """A caller went away: cancel its requests at the tool, fail what it owed the tool."""
        caller = self._connections.get(conn)
        if not isinstance(caller, Caller):
            return []
        del self._connections[conn]
        session = caller.session
        actions = session.caller_disconnected(caller)
        self._maybe_forget(session)
        return actions

    # ------------------------------------------------------------------ frames

    def received(self, conn: int, data: str | bytes, now: float) -> list[Action]:
        """A connection sent one WebSocket message.

        Args:
            conn: the registered connection it came from.
            data: the message (text, or binary holding UTF-8 JSON).
            now: the current time, for deadlines.
        """
        try:
            frame = parse_frame(data)
        except FrameError as exc:
            log.debug("connection %d sent an invalid frame: %s", conn, exc.reason)
            return [Send(conn, dumps(exc.to_response().to_json()))]
        link = self._connections.get(conn)
        if link is None:
            return []
        session = link.session
        if isinstance(link, Caller):
            actions = session.from_caller(link, frame, now)
        else:
            actions = session.from_server(link, frame, now)
        if session.dropped:
            self._drop(session)
            self._maybe_forget(session)
        return actions

    # ------------------------------------------------------------------ failures and time

    def forward_failed(
        self,
        tool: int,
        tool_id: int,
        why: str = "the tool is not reading",
        now: float | None = None,
    ) -> list[Action]:
        """A forwarded caller request could not be delivered to the tool: answer ``-32002``."""
        server = self._connections.get(tool)
        if not isinstance(server, Server):
            return []
        return server.session.forward_failed(server, tool_id, why, now)

    def expire(self, now: float) -> list[Action]:
        """Act on every deadline that has passed.

        Tool requests no caller answered in time: the tool gets ``-32006``, the caller
        ``notifications/cancelled``. Caller requests past ``request_timeout``: the caller gets
        ``-32006`` with its id, the tool ``notifications/cancelled``.
        """
        actions: list[Action] = []
        tool_requests = self._deadlines.tool_requests
        while tool_requests and tool_requests[0][0] <= now:
            _, session, key, req = tool_requests.popleft()
            if session.awaits_tool_request(key, req):
                actions.extend(session.expire_tool_request(key, req))
                self._maybe_forget(session)
        requests = self._deadlines.requests
        while requests and requests[0][0] <= now:
            _, session, tool_id, entry = requests.popleft()
            actions.extend(session.expire_request(tool_id, entry, now))
        relay = self._deadlines.relay
        while relay and relay[0][0] <= now:
            _, session, rid, step = relay.popleft()
            if session.awaits_relay(rid, step):
                actions.extend(session.expire_relay(rid, step, now))
                self._drop(session)
                self._maybe_forget(session)
        notify = self._deadlines.notify
        while notify and notify[0][0] <= now:
            _, session = notify.popleft()
            actions.extend(session.flush_changes())
        return actions

    def check_invariants(self) -> Iterator[str]:
        """Yield a description of every broken internal invariant (for tests)."""
        for name, session in self._sessions.items():
            if session.name != name:
                yield f"agent {name}: session of {session.name} registered under it"
            if session.idle:
                yield f"agent {name}: kept with nothing connected and nothing in flight"
            for conn, server in session.servers.items():
                if self._connections.get(conn) is not server:
                    yield f"agent {name}: tool {conn} not registered"
            for conn, caller in session.callers.items():
                if self._connections.get(conn) is not caller:
                    yield f"agent {name}: caller {conn} not registered"
            yield from session.check_invariants()
        for conn, link in self._connections.items():
            known = self._sessions.get(link.session.name)
            if known is not link.session or link.conn != conn:
                yield f"connection {conn}: registered, but its agent does not know it"
