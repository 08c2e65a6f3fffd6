"""One agent's session: its server, its callers, and every request in flight between them.

Theory of operation
-------------------
A :class:`Session` holds all the routing state of one agent (the id inside the token) and makes
every forwarding decision about it, with no I/O and no Trio. The
:class:`~trio_mcp_relay.core.registry.Router` finds the session of a connection and tells it
what happened (a frame arrived, a connection came or went, a deadline passed); the session
answers with actions (:class:`~trio_mcp_relay.core.actions.Send`,
:class:`~trio_mcp_relay.core.actions.Close`). A session refers to no other session and to
no registry: it is the unit later work can place on any node.

Its connections are its *server* (the agent's tool connection: one at most for now, and a
newer one replaces it) and any number of *callers*. Three tables, all keyed by values the
session chose itself, never parsed back from the wire:

``pending``
    caller requests in flight to a server, keyed by the id the server saw. Those ids are
    integers from a per-session counter that never repeats, so they are unique among a
    server's in-flight requests whatever the callers chose (``0``, ``""``, duplicates, huge
    integers). An entry remembers the caller, its original id (restored exactly on the
    response), its original progress token, the server connection it went to and the method.
    The rewritten progress token is the server-side id itself. A response, progress or a
    failed forward counts only from (or for) the server the entry names, and a server that
    leaves fails only the entries that name it: that is what lets an agent have several
    servers next.
``tool_requests``
    requests a server sent to the caller side (``sampling/createMessage``, ``roots/list``,
    ``elicitation/create``...), keyed by the id the chosen caller saw (another per-session
    counter), remembering the server, its own id, the method and a deadline.
``callers``
    per caller: its in-flight server-side ids (to cancel them when it leaves), the tool
    requests it owes an answer to, and when it was last active.

Every request gets exactly one answer: the server's response, or an error from the relay when
the request cannot complete (no tool ``-32001``, forward failed ``-32002``, tool gone
``-32003``, timeout ``-32006``, over a limit ``-32007``). A request the caller cancelled, or
whose caller left, is forgotten, and the server's late answer to it is dropped.

Rule for tool-initiated requests: they go to the most recently active caller among those with
requests in flight (the tool is most likely asking on behalf of one of those), and when no
caller has any in flight, to the most recently active caller. ``ping`` from the tool is
answered by the session itself.

Deadlines: the shell has one timer for all agents, so a session appends each deadline it sets
to the :class:`Deadlines` it shares with the other sessions of its router. The router pops them
in order and hands each back to its session (:meth:`Session.expire_request`,
:meth:`Session.expire_tool_request`), which acts only if that request is still waiting.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator
from typing import Any

import attrs

from .._frames import (
    CONNECTION_ERROR,
    FORWARD_FAILED,
    LIMIT_EXCEEDED,
    MISSING,
    NO_CALLER,
    REQUEST_TIMEOUT,
    TOOL_NOT_CONNECTED,
    ErrorResponse,
    Id,
    Notification,
    Request,
    Result,
    dumps,
    error_frame,
)
from .actions import CLOSE_REPLACED, Action, Close, Send

__all__ = ["Caller", "Deadlines", "Pending", "Policy", "Server", "Session", "ToolRequest"]

log = logging.getLogger("trio_mcp_relay.routing")

CANCELLED = "notifications/cancelled"


@attrs.define(slots=True)
class Policy:
    """The settings every session of a router obeys (see the Router's arguments)."""

    tool_request_timeout: float = 30.0
    request_timeout: float = 0.0
    max_inflight_per_caller: int = 0
    max_tool_requests: int = 0
    #: Set during a graceful shutdown: new caller requests are refused with -32003.
    draining: bool = False


@attrs.define(slots=True)
class Deadlines:
    """The deadlines sessions set, each queue in the order they were set.

    Each timeout is a constant, so each queue is sorted; entries whose request completed
    first are skipped when they come up.
    """

    requests: deque[tuple[float, Session, int, Pending]] = attrs.Factory(deque)
    tool_requests: deque[tuple[float, Session, int, ToolRequest]] = attrs.Factory(deque)
    #: A queue went from empty to not empty since the timer last looked.
    added: bool = False


@attrs.define(slots=True, eq=False)
class Server:
    """A tool connection serving a session."""

    conn: int
    session: Session


@attrs.define(slots=True, eq=False)
class Caller:
    """A caller connection of a session."""

    conn: int
    session: Session
    last_active: int = 0
    inflight: dict[int, None] = attrs.Factory(dict)  # server-side ids, insertion ordered
    owes: set[int] = attrs.Factory(set)  # tool_requests keys this caller must answer


@attrs.define(slots=True, eq=False)
class Pending:
    """A caller request in flight to a server."""

    caller: Caller
    caller_id: Id
    token: Any  # the caller's progress token, or MISSING
    server: int  # the server connection it went to
    method: str
    deadline: float | None = None


@attrs.define(slots=True, eq=False)
class ToolRequest:
    """A server's request awaiting a caller's answer."""

    caller: Caller
    server: int  # the server connection that sent it
    tool_id: Id
    method: str
    deadline: float


def _same_id(a: object, b: object) -> bool:
    return type(a) is type(b) and a == b


def _notification(method: str, params: dict[str, Any]) -> bytes:
    return dumps({"jsonrpc": "2.0", "method": method, "params": params})


def _progress_token(params: Any) -> Any:
    if isinstance(params, dict):
        meta = params.get("_meta")
        if isinstance(meta, dict):
            return meta.get("progressToken", MISSING)
    return MISSING


def _with_progress_token(params: dict[str, Any], token: Any) -> dict[str, Any]:
    return {**params, "_meta": {**params["_meta"], "progressToken": token}}


class Session:
    """One agent's routing state, and the decisions that change it.

    Args:
        name: the agent.
        policy: the settings it obeys, shared with the other sessions of its router.
        deadlines: where it puts the deadlines it sets, likewise shared.
    """

    __slots__ = (
        "activity",
        "callers",
        "deadlines",
        "name",
        "next_id",
        "next_tool_request",
        "pending",
        "policy",
        "server",
        "tool_requests",
    )

    def __init__(
        self, name: str, policy: Policy | None = None, deadlines: Deadlines | None = None
    ) -> None:
        self.name = name
        self.policy = Policy() if policy is None else policy
        self.deadlines = Deadlines() if deadlines is None else deadlines
        self.server: Server | None = None
        self.callers: dict[int, Caller] = {}
        self.pending: dict[int, Pending] = {}
        self.tool_requests: dict[int, ToolRequest] = {}
        self.next_id = 1
        self.next_tool_request = 1
        self.activity = 0  # a clock that ticks on each caller event, for the choose-caller rule

    @property
    def idle(self) -> bool:
        """Nothing connected and nothing in flight: its router may forget it."""
        return self.server is None and not (self.callers or self.pending or self.tool_requests)

    # ------------------------------------------------------------------ connections

    def server_connected(self, server: Server) -> list[Action]:
        """``server`` serves this agent now. It replaces (and closes) the previous one."""
        old = self.server
        actions: list[Action] = []
        if old is not None:
            log.info("agent %s: tool connection %d replaces %d", self.name, server.conn, old.conn)
            actions = self._server_gone(old, "tool connection was replaced")
            actions.append(Close(old.conn, CLOSE_REPLACED, "replaced by a newer tool connection"))
        self.server = server
        return actions

    def server_disconnected(self, server: Server) -> list[Action]:
        """``server`` went away. A server this session no longer has is a no-op."""
        if self.server is not server:
            return []
        return self._server_gone(server, "tool disconnected")

    def _server_gone(self, server: Server, why: str) -> list[Action]:
        """Fail what is in flight on ``server``: ``-32003`` to callers, cancel its requests."""
        self.server = None
        conn = server.conn
        actions: list[Action] = []
        gone = [(k, e) for k, e in self.pending.items() if e.server == conn]
        for tool_id, entry in gone:
            del self.pending[tool_id]
            del entry.caller.inflight[tool_id]
            error = error_frame(entry.caller_id, CONNECTION_ERROR, "Connection error", why)
            actions.append(Send(entry.caller.conn, error))
        asked = [(k, r) for k, r in self.tool_requests.items() if r.server == conn]
        for key, req in asked:
            del self.tool_requests[key]
            req.caller.owes.discard(key)
            params = {"requestId": key, "reason": why}
            actions.append(Send(req.caller.conn, _notification(CANCELLED, params)))
        return actions

    def caller_connected(self, caller: Caller) -> list[Action]:
        """``caller`` joins this agent."""
        self.activity += 1
        caller.last_active = self.activity
        self.callers[caller.conn] = caller
        return []

    def caller_disconnected(self, caller: Caller) -> list[Action]:
        """``caller`` went away: cancel its requests at their servers, fail what it owed."""
        if self.callers.get(caller.conn) is not caller:
            return []
        del self.callers[caller.conn]
        actions: list[Action] = []
        for tool_id in caller.inflight:
            entry = self.pending.pop(tool_id)
            params = {"requestId": tool_id, "reason": "caller disconnected"}
            actions.append(Send(entry.server, _notification(CANCELLED, params)))
        for key in caller.owes:
            req = self.tool_requests.pop(key)
            why = "caller disconnected"
            error = error_frame(req.tool_id, CONNECTION_ERROR, "Connection error", why)
            actions.append(Send(req.server, error))
        return actions

    # ------------------------------------------------------------------ caller to server

    def from_caller(
        self, caller: Caller, frame: Request | Notification | Result | ErrorResponse, now: float
    ) -> list[Action]:
        """A caller of this agent sent ``frame`` (parsed) at time ``now``."""
        self.activity += 1
        caller.last_active = self.activity
        server = self.server
        if isinstance(frame, Request):
            if server is None:
                error = error_frame(frame.id, TOOL_NOT_CONNECTED, "Tool not connected")
                return [Send(caller.conn, error)]
            policy = self.policy
            if policy.draining:
                why = "the relay is shutting down"
                error = error_frame(frame.id, CONNECTION_ERROR, "Connection error", why)
                return [Send(caller.conn, error)]
            limit = policy.max_inflight_per_caller
            if limit and len(caller.inflight) >= limit:
                why = f"max_inflight_per_caller: at most {limit} requests in flight per caller"
                error = error_frame(frame.id, LIMIT_EXCEEDED, "Limit exceeded", why)
                return [Send(caller.conn, error)]
            tool_id = self.next_id
            self.next_id += 1
            token = _progress_token(frame.params)
            params = frame.params
            if token is not MISSING:
                params = _with_progress_token(params, tool_id)
            conn = server.conn
            entry = Pending(caller, frame.id, token, conn, frame.method)
            self.pending[tool_id] = entry
            if policy.request_timeout:
                entry.deadline = now + policy.request_timeout
                queue = self.deadlines.requests
                queue.append((entry.deadline, self, tool_id, entry))
                if len(queue) == 1:
                    self.deadlines.added = True
            caller.inflight[tool_id] = None
            out = Request(id=tool_id, method=frame.method, params=params, extra=frame.extra)
            return [Send(conn, dumps(out.to_json()), request=tool_id)]
        if isinstance(frame, Notification):
            if server is None:
                log.debug("agent %s: no tool; dropped %s", self.name, frame.method)
                return []
            if frame.method == CANCELLED:
                return self._cancel_from_caller(caller, frame)
            return [Send(server.conn, dumps(frame.to_json()))]
        return self._response_from_caller(caller, frame)

    def _cancel_from_caller(self, caller: Caller, frame: Notification) -> list[Action]:
        params = frame.params
        wanted = params.get("requestId", MISSING) if isinstance(params, dict) else MISSING
        # The most recent in-flight request of this caller with that id (a caller that
        # reuses an id while it is in flight can only mean the latest one).
        for tool_id in reversed(caller.inflight):
            if _same_id(self.pending[tool_id].caller_id, wanted):
                break
        else:
            log.debug("agent %s: cancellation of unknown request %r dropped", self.name, wanted)
            return []
        entry = self.pending.pop(tool_id)
        del caller.inflight[tool_id]
        out = Notification(
            method=frame.method, params={**params, "requestId": tool_id}, extra=frame.extra
        )
        return [Send(entry.server, dumps(out.to_json()))]

    def _response_from_caller(self, caller: Caller, frame: Result | ErrorResponse) -> list[Action]:
        key = frame.id
        req = self.tool_requests.get(key) if type(key) is int else None
        if req is None or req.caller is not caller:
            log.debug("agent %s: caller response to unknown id %r dropped", self.name, key)
            return []
        assert type(key) is int
        del self.tool_requests[key]
        caller.owes.discard(key)
        out = attrs.evolve(frame, id=req.tool_id)
        return [Send(req.server, dumps(out.to_json()))]

    # ------------------------------------------------------------------ server to callers

    def from_server(
        self, server: Server, frame: Request | Notification | Result | ErrorResponse, now: float
    ) -> list[Action]:
        """A server of this agent sent ``frame`` (parsed) at time ``now``."""
        if isinstance(frame, Result | ErrorResponse):
            return self._response_from_server(server, frame)
        if isinstance(frame, Notification):
            return self._notification_from_server(server, frame)
        conn = server.conn
        if frame.method == "ping":
            return [Send(conn, dumps(Result(id=frame.id, result={}).to_json()))]
        limit = self.policy.max_tool_requests
        if limit and len(self.tool_requests) >= limit:
            why = f"max_tool_requests: at most {limit} tool requests await callers per agent"
            return [Send(conn, error_frame(frame.id, LIMIT_EXCEEDED, "Limit exceeded", why))]
        caller = self.choose_caller()
        if caller is None:
            why = f"cannot route {frame.method}"
            return [Send(conn, error_frame(frame.id, NO_CALLER, "No caller connected", why))]
        key = self.next_tool_request
        self.next_tool_request += 1
        deadline = now + self.policy.tool_request_timeout
        req = ToolRequest(caller, conn, frame.id, frame.method, deadline)
        self.tool_requests[key] = req
        queue = self.deadlines.tool_requests
        queue.append((deadline, self, key, req))
        if len(queue) == 1:
            self.deadlines.added = True
        caller.owes.add(key)
        return [Send(caller.conn, dumps(attrs.evolve(frame, id=key).to_json()))]

    def choose_caller(self) -> Caller | None:
        """The caller a tool-initiated request goes to (see the rule above), or None."""
        busy = [c for c in self.callers.values() if c.inflight]
        candidates = busy or list(self.callers.values())
        return max(candidates, key=lambda c: c.last_active, default=None)

    def _response_from_server(self, server: Server, frame: Result | ErrorResponse) -> list[Action]:
        tool_id = frame.id
        entry = self.pending.pop(tool_id, None) if type(tool_id) is int else None
        if entry is not None and entry.server != server.conn:
            # Another server's request: not this one's to answer (never with one server).
            assert type(tool_id) is int
            self.pending[tool_id] = entry
            entry = None
        if entry is None:
            log.debug("agent %s: tool response to id %r nobody awaits, dropped", self.name, tool_id)
            return []
        assert type(tool_id) is int
        caller = entry.caller
        del caller.inflight[tool_id]
        out = attrs.evolve(frame, id=entry.caller_id)
        return [Send(caller.conn, dumps(out.to_json()))]

    def _notification_from_server(self, server: Server, frame: Notification) -> list[Action]:
        params = frame.params
        if frame.method == "notifications/progress" and isinstance(params, dict):
            token = params.get("progressToken", MISSING)
            if type(token) is int and 0 < token < self.next_id:
                entry = self.pending.get(token)
                if entry is None or entry.token is MISSING or entry.server != server.conn:
                    log.debug("agent %s: progress for finished request dropped", self.name)
                    return []
                out = attrs.evolve(frame, params={**params, "progressToken": entry.token})
                return [Send(entry.caller.conn, dumps(out.to_json()))]
        if frame.method == CANCELLED and isinstance(params, dict):
            return self._cancel_from_server(server, frame, params)
        if not self.callers:
            log.debug("agent %s: no caller for %s, dropped", self.name, frame.method)
            return []
        data = dumps(frame.to_json())
        return [Send(c, data) for c in self.callers]

    def _cancel_from_server(
        self, server: Server, frame: Notification, params: dict[str, Any]
    ) -> list[Action]:
        wanted = params.get("requestId", MISSING)
        conn = server.conn
        found = next(
            (
                (k, r)
                for k, r in self.tool_requests.items()
                if r.server == conn and _same_id(r.tool_id, wanted)
            ),
            None,
        )
        if found is None:
            log.debug("agent %s: tool cancelled unknown request %r", self.name, wanted)
            return []
        key, req = found
        del self.tool_requests[key]
        req.caller.owes.discard(key)
        out = attrs.evolve(frame, params={**params, "requestId": key})
        return [Send(req.caller.conn, dumps(out.to_json()))]

    # ------------------------------------------------------------------ failures and time

    def forward_failed(self, server: Server, tool_id: int, why: str) -> list[Action]:
        """Request ``tool_id`` could not be delivered to ``server``: answer ``-32002``."""
        entry = self.pending.get(tool_id)
        if entry is None or entry.server != server.conn:
            return []
        del self.pending[tool_id]
        del entry.caller.inflight[tool_id]
        error = error_frame(entry.caller_id, FORWARD_FAILED, "Forward failed", why)
        return [Send(entry.caller.conn, error)]

    def awaits_request(self, tool_id: int, entry: Pending) -> bool:
        """Whether the caller request ``entry`` is still in flight as ``tool_id``."""
        return self.pending.get(tool_id) is entry

    def awaits_tool_request(self, key: int, req: ToolRequest) -> bool:
        """Whether the tool request ``req`` still awaits its caller's answer as ``key``."""
        return self.tool_requests.get(key) is req

    def expire_request(self, tool_id: int, entry: Pending) -> list[Action]:
        """``entry`` reached its deadline: ``-32006`` to its caller, cancel it at its server.

        A request answered in the meantime is a no-op.
        """
        if self.pending.get(tool_id) is not entry:
            return []
        del self.pending[tool_id]
        del entry.caller.inflight[tool_id]
        why = f"the tool did not answer within {self.policy.request_timeout:g} s"
        error = error_frame(entry.caller_id, REQUEST_TIMEOUT, "Timeout", why)
        params = {"requestId": tool_id, "reason": "request timed out at the relay"}
        return [
            Send(entry.caller.conn, error),
            Send(entry.server, _notification(CANCELLED, params)),
        ]

    def expire_tool_request(self, key: int, req: ToolRequest) -> list[Action]:
        """``req`` reached its deadline: cancel it at its caller, ``-32006`` to its server.

        A request answered in the meantime is a no-op.
        """
        if self.tool_requests.get(key) is not req:
            return []
        del self.tool_requests[key]
        req.caller.owes.discard(key)
        params = {"requestId": key, "reason": "no answer in time"}
        timeout = self.policy.tool_request_timeout
        why = f"no caller answered {req.method} within {timeout:g} s"
        error = error_frame(req.tool_id, REQUEST_TIMEOUT, "Timeout", why)
        return [Send(req.caller.conn, _notification(CANCELLED, params)), Send(req.server, error)]

    def check_invariants(self) -> Iterator[str]:
        """Yield a description of every broken invariant of this session (for tests)."""
        name, server = self.name, self.server
        servers = set() if server is None else {server.conn}
        if server is not None and server.session is not self:
            yield f"agent {name}: tool {server.conn} belongs to another session"
        if server is None and self.pending:
            yield f"agent {name}: pending requests without a tool"
        for tool_id, entry in self.pending.items():
            caller = self.callers.get(entry.caller.conn)
            if caller is not entry.caller or tool_id not in caller.inflight:
                yield f"agent {name}: pending {tool_id} has no live caller"
            if entry.server not in servers:
                yield f"agent {name}: pending {tool_id} went to {entry.server}, not its tool"
            if not 0 < tool_id < self.next_id:
                yield f"agent {name}: pending {tool_id} was never allocated"
        for conn, caller in self.callers.items():
            if caller.conn != conn or caller.session is not self:
                yield f"caller {conn}: registered under another connection or session"
            for tool_id in caller.inflight:
                if tool_id not in self.pending:
                    yield f"caller {conn}: in-flight {tool_id} not pending"
            for key in caller.owes:
                if self.tool_requests.get(key) is None:
                    yield f"caller {conn}: owes unknown {key}"
        for key, req in self.tool_requests.items():
            caller = self.callers.get(req.caller.conn)
            if caller is not req.caller or key not in caller.owes:
                yield f"agent {name}: tool request {key} has no live caller"
            if req.server not in servers:
                yield f"agent {name}: tool request {key} came from {req.server}, not its tool"
