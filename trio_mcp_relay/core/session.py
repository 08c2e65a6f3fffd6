"""One agent's session: its servers, its callers, its catalog, and every request in flight.

Theory of operation
-------------------
A :class:`Session` holds all the routing state of one agent (the id inside the token) and makes
every decision about it, with no I/O and no Trio. The
:class:`~trio_mcp_relay.core.registry.Router` finds the session of a connection and tells it
what happened (a frame arrived, a connection came or went, a deadline passed); the session
answers with actions (:class:`~trio_mcp_relay.core.actions.Send`,
:class:`~trio_mcp_relay.core.actions.Close`). A session refers to no other session and to
no registry: it is the unit later work can place on any node.

The relay is the MCP *client* of each of the agent's servers (every tool connection is one;
:mod:`trio_mcp_relay.core.upstream` initializes and lists them) and the MCP *server* of each
caller (:mod:`trio_mcp_relay.core.front` handles a caller's frames, with
:mod:`trio_mcp_relay.core.resolve` saying where a request goes), answering from the agent's
:class:`~trio_mcp_relay.core.catalog.Catalog`:

* ``initialize`` (protocol version negotiated, capabilities merged), ``ping``, the four list
  methods (one page of the merged list) and ``logging/setLevel`` (forwarded to every server
  that declared logging) are answered by the relay; ``notifications/initialized`` absorbed.
* ``tools/call`` and ``prompts/get`` are routed by name, ``resources/read``,
  ``resources/subscribe`` and ``resources/unsubscribe`` by URI, ``completion/complete`` by its
  ref, each to the server that owns it, with the server's own name. An unknown name is
  ``-32602``.
* Any other method (custom JSON-RPC) goes to the *default server*: the first connected with
  ``server_id=default`` or no ``server_id``, else the longest-connected. Other caller
  notifications go there too; ``notifications/roots/list_changed`` goes to every server.
* While a server is initializing, a request whose answer it could change (``initialize``, a
  list, a name nobody has yet, a name of a server being replaced, a custom method meant for
  it) is *parked*, and run again when that initialization ends (ready or failed; each step of
  it has a deadline), so a caller never sees a partial catalog.
* With no server at all, requests get ``-32001``; ``ping`` is always answered.

Servers have an identity (``server_id``, else ``serverInfo.name``; one namespace). A server of
the identity of a connected one replaces it: the old connection is closed ``4001`` and its
requests in flight answered ``-32003``. Other identities join.

Tables, all keyed by values the session chose itself, never parsed back from the wire:

``pending``
    caller requests in flight to a server, keyed by the id the server saw. Those ids are
    integers from a per-session counter that never repeats, so they are unique among a
    server's in-flight requests whatever the callers chose (``0``, ``""``, duplicates, huge
    integers). An entry remembers the caller, its original id (restored exactly on the
    response), its original progress token, the server connection it went to and the method.
    The rewritten progress token is the server-side id itself. A response, progress or a
    failed forward counts only from (or for) the server the entry names, and a server that
    leaves fails only the entries that name it.
``relay_requests``
    the relay's own requests to servers (initialization, lists), ids from the same counter.
``tool_requests``
    requests a server sent to the caller side (``sampling/createMessage``, ``roots/list``,
    ``elicitation/create``...), keyed by the id the chosen caller saw (another per-session
    counter), remembering the server, its own id, the method and a deadline.
``callers``
    per caller: its in-flight server-side ids (to cancel them when it leaves), the tool
    requests it owes an answer to, when it was last active, what it declared at
    ``initialize`` and the resource URIs it subscribed to.

Every request gets exactly one answer: the server's response, or an error from the relay when
the request cannot complete (no tool ``-32001``, forward failed ``-32002``, tool gone
``-32003``, timeout ``-32006``, over a limit ``-32007``). A request the caller cancelled, or
whose caller left, is forgotten, and the server's late answer to it is dropped.

Server notifications: progress goes to the caller of the request, ``resources/updated`` to the
callers subscribed to that URI, ``notifications/*/list_changed`` makes the relay list that
server again (callers get the relay's own ``list_changed`` when what they would see changed,
changes within ``list_changed_delay`` coalescing into one), anything else to every caller.

Rule for tool-initiated requests: they go to a caller that has a request in flight to *that*
server and declared the capability the method needs (``sampling``, ``roots``,
``elicitation``; a caller that never sent ``initialize`` is taken at its word for none and
accepted), the most recently active when several do; with none, the server gets ``-32005``.
``ping`` from a server is answered by the session itself.

Deadlines: the shell has one timer for all agents, so a session appends each deadline it sets
to the :class:`Deadlines` it shares with the other sessions of its router. Each kind of
deadline has a constant timeout, so each queue is sorted. The router pops them in order and
hands each back to its session, which acts only if it still applies.
"""

from __future__ import annotations

import bisect
import logging
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Final

import attrs

from .._frames import (
    CONNECTION_ERROR,
    FORWARD_FAILED,
    LIMIT_EXCEEDED,
    MISSING,
    NO_CALLER,
    REQUEST_TIMEOUT,
    ErrorResponse,
    Id,
    Notification,
    Request,
    Result,
    dumps,
    error_frame,
)
from . import front, upstream
from .actions import CLOSE_REPLACED, Action, Close, Send
from .catalog import Catalog, Change, Kind, ToolFilter
from .middleware import Call, Middleware, Reply, run_answer_hooks
from .tally import CANCELLED as CANCELLED_OUTCOME
from .tally import ERROR, RESULT, Tally
from .upstream import (
    CLOSE_INIT_FAILED,
    Purpose,
    RelayRequest,
    Server,
)
from .wire import CANCELLED
from .wire import notification as _notification
from .wire import result_frame as _result_frame
from .wire import same_id as _same_id

__all__ = [
    "AgentFilters",
    "Caller",
    "Deadlines",
    "Pending",
    "Policy",
    "Server",
    "Session",
    "ToolRequest",
]

log = logging.getLogger("trio_mcp_relay.routing")

_LISTS: Final = {kind.list_method: kind for kind in Kind}
_LIST_CHANGED: Final = {kind.list_changed: kind for kind in Kind if kind is not Kind.RESOURCES}
#: What a caller must have declared to be sent a server's request of this method.
_NEEDS: Final = {
    "sampling/createMessage": "sampling",
    "roots/list": "roots",
    "elicitation/create": "elicitation",
}
_ROUTED_BY_URI: Final = frozenset(
    {"resources/read", "resources/subscribe", "resources/unsubscribe"}
)


@attrs.frozen
class AgentFilters:
    """The tool filters of one agent: its own, and per server identity."""

    tools: ToolFilter = attrs.field(factory=ToolFilter)
    servers: Mapping[str, ToolFilter] = attrs.field(factory=dict)


@attrs.define(slots=True)
class Policy:
    """The settings every session of a router obeys (see the Router's arguments)."""

    tool_request_timeout: float = 30.0
    request_timeout: float = 0.0
    max_inflight_per_caller: int = 0
    max_tool_requests: int = 0
    #: Seconds each step of a server's initialization (and of a re-list) may take.
    init_timeout: float = 10.0
    #: Catalog changes within this many seconds reach callers as one list_changed.
    list_changed_delay: float = 0.2
    #: Tool filters by agent (agents not named: ``default_filters``).
    filters: Mapping[str, AgentFilters] = attrs.field(factory=dict)
    default_filters: AgentFilters = attrs.field(factory=AgentFilters)
    middleware: Sequence[Middleware] = ()
    #: Set during a graceful shutdown: new caller requests are refused with -32003.
    draining: bool = False
    #: Where outcomes are counted (read by the shell's metrics).
    tally: Tally = attrs.field(factory=Tally)
    #: Told ``(agent, identity)`` when what a server shows in the catalog may have changed
    #: (it became ready, listed again, or left); cluster mode publishes it from there.
    watch: Callable[[str, str], None] | None = None
    #: Per agent, the tool requests awaiting a caller on the other relay nodes (cluster
    #: mode), so that ``max_tool_requests`` holds for the whole cluster.
    elsewhere: Callable[[str], int] | None = None


@attrs.define(slots=True)
class Deadlines:
    """The deadlines sessions set, each queue sorted by deadline.

    Each timeout is a constant between changes of the settings, so an entry almost always
    goes at the end; entries whose request completed first are skipped when they come up.
    """

    requests: deque[tuple[float, Session, int, Pending]] = attrs.Factory(deque)
    tool_requests: deque[tuple[float, Session, int, ToolRequest]] = attrs.Factory(deque)
    relay: deque[tuple[float, Session, int, RelayRequest]] = attrs.Factory(deque)
    notify: deque[tuple[float, Session]] = attrs.Factory(deque)
    #: A queue went from empty to not empty since the timer last looked.
    added: bool = False

    def push(self, queue: deque[Any], entry: Any) -> None:
        """Add ``entry`` (its deadline first) to ``queue``, keeping the queue sorted."""
        if queue and entry[0] < queue[-1][0]:
            # A timeout was shortened (a configuration reload): this deadline comes before
            # some set under the old timeout, and must not wait behind them.
            queue.insert(bisect.bisect_right(queue, entry[0], key=_deadline), entry)
            if queue[0] is entry:
                self.added = True
            return
        queue.append(entry)
        if len(queue) == 1:
            self.added = True


def _deadline(entry: tuple[Any, ...]) -> float:
    return float(entry[0])


@attrs.define(slots=True, eq=False)
class Caller:
    """A caller connection of a session."""

    conn: int
    session: Session
    last_active: int = 0
    inflight: dict[int, None] = attrs.Factory(dict)  # server-side ids, insertion ordered
    #: tool_requests keys this caller must answer (dicts, not sets, here and below: an empty
    #: set takes 216 bytes, an empty dict 64, and most callers have none).
    owes: dict[int, None] = attrs.Factory(dict)
    #: Its ``initialize`` capabilities; None until it sent ``initialize``.
    capabilities: dict[str, Any] | None = None
    subscriptions: dict[str, None] = attrs.Factory(dict)
    #: Per kind, the merged list as this caller last saw it (answered or notified).
    seen: dict[Kind, tuple[dict[str, Any], ...]] = attrs.Factory(dict)
    #: How many of its requests are parked (waiting for an initialization).
    parked: int = 0
    #: For a caller standing for another relay node's callers of one server (cluster mode):
    #: that server's identity. Its requests go to that server as they are (the other node
    #: resolved names already), and it hears only that server's notifications.
    target: str | None = None


@attrs.define(slots=True, eq=False)
class Pending:
    """A caller request in flight to a server."""

    caller: Caller
    caller_id: Id
    token: Any  # the caller's progress token, or MISSING
    server: int  # the server connection it went to
    method: str
    deadline: float | None = None
    call: Call | None = None  # for the answer middleware
    started: float = 0.0  # when the caller's request arrived (for the latency metric)


@attrs.define(slots=True, eq=False)
class ToolRequest:
    """A server's request awaiting a caller's answer."""

    caller: Caller
    server: int  # the server connection that sent it
    tool_id: Id
    method: str
    deadline: float


class Session:
    """One agent's routing state, and the decisions that change it.

    Args:
        name: the agent.
        policy: the settings it obeys, shared with the other sessions of its router.
        deadlines: where it puts the deadlines it sets, likewise shared.
    """

    __slots__ = (
        "activity",
        "by_identity",
        "callers",
        "catalog",
        "changed",
        "deadlines",
        "dropped",
        "name",
        "next_id",
        "next_since",
        "next_tool_request",
        "notify_at",
        "parked",
        "pending",
        "policy",
        "relay_requests",
        "servers",
        "tool_requests",
    )

    def __init__(
        self, name: str, policy: Policy | None = None, deadlines: Deadlines | None = None
    ) -> None:
        self.name = name
        self.policy = Policy() if policy is None else policy
        self.deadlines = Deadlines() if deadlines is None else deadlines
        filters = self.policy.filters.get(name, self.policy.default_filters)
        self.catalog = Catalog(tool_filter=filters.tools, server_filters=filters.servers)
        self.servers: dict[int, Server] = {}  # by connection, in connection order
        self.by_identity: dict[str, Server] = {}
        self.callers: dict[int, Caller] = {}
        self.pending: dict[int, Pending] = {}
        self.relay_requests: dict[int, RelayRequest] = {}
        self.tool_requests: dict[int, ToolRequest] = {}
        #: Requests waiting for an initialization: caller, frame, when it arrived.
        self.parked: list[tuple[Caller, Request, float]] = []
        self.next_id = 1
        self.next_tool_request = 1
        self.next_since = 0
        self.activity = 0  # a clock that ticks on each caller event, for the choose-caller rule
        #: Server connections this session closed or replaced (the router unregisters them).
        self.dropped: list[int] = []
        #: Kinds changed since callers were last told (frozen: the empty one is shared).
        self.changed: frozenset[Kind] = frozenset()
        self.notify_at: float | None = None

    @property
    def idle(self) -> bool:
        """Nothing connected and nothing in flight: its router may forget it."""
        return not (self.servers or self.callers or self.pending or self.tool_requests)

    @property
    def initializing(self) -> bool:
        """Whether a server of this agent is still initializing."""
        return any(not s.ready for s in self.servers.values())

    def new_id(self) -> int:
        rid = self.next_id
        self.next_id += 1
        return rid

    # ------------------------------------------------------------------ servers come and go

    def server_connected(self, server: Server, now: float) -> list[Action]:
        """``server`` connected: start its initialization. One with the ``server_id`` of a
        connected server replaces it."""
        server.session = self
        server.since = self.next_since
        server.connected_at = now
        self.next_since += 1
        actions: list[Action] = []
        self.servers[server.conn] = server
        if server.server_id is not None:
            actions += self.take_identity(server, server.server_id, now)
        actions.append(
            upstream.relay_request(self, server, Purpose.INITIALIZE, "initialize", None, now)
        )
        return actions

    def take_identity(self, server: Server, identity: str, now: float) -> list[Action]:
        server.identity = identity
        actions: list[Action] = []
        old = self.by_identity.get(identity)
        if old is not None:
            log.info(
                "agent %s: server %r: connection %d replaces %d",
                self.name,
                identity,
                server.conn,
                old.conn,
            )
            actions += self._server_gone(old, "tool connection was replaced", now, keep=True)
            reason = f"replaced by a newer connection of server {identity}"[:120]
            actions.append(Close(old.conn, CLOSE_REPLACED, reason))
            self.dropped.append(old.conn)
        self.by_identity[identity] = server
        self.catalog.add_server(identity, since=server.since)
        return actions

    def server_disconnected(self, server: Server, now: float) -> list[Action]:
        """``server`` went away. A server this session no longer has is a no-op."""
        if server.gone or self.servers.get(server.conn) is not server:
            return []
        return self._server_gone(server, "tool disconnected", now)

    def _server_gone(
        self, server: Server, why: str, now: float, keep: bool = False
    ) -> list[Action]:
        """Forget ``server``: ``-32003`` to callers for what it had in flight, cancel its
        requests at their callers. With ``keep``, its identity stays in the catalog (it is
        being replaced)."""
        server.gone = True
        del self.servers[server.conn]
        conn = server.conn
        actions: list[Action] = []
        for rid in server.relay_requests:
            del self.relay_requests[rid]
        server.relay_requests.clear()
        if server.identity is not None and self.by_identity.get(server.identity) is server:
            del self.by_identity[server.identity]
            if not keep:
                self.note(self.catalog.remove_server(server.identity), now)
            self.watched(server.identity)
        gone = [(k, e) for k, e in self.pending.items() if e.server == conn]
        tally = self.policy.tally
        for tool_id, entry in gone:
            del self.pending[tool_id]
            del entry.caller.inflight[tool_id]
            tally.answered(self.name, entry.method, "-32003", now - entry.started)
            actions.append(
                self.error_to(
                    entry.caller,
                    entry.caller_id,
                    entry.call,
                    CONNECTION_ERROR,
                    "Connection error",
                    why,
                )
            )
        asked = [(k, r) for k, r in self.tool_requests.items() if r.server == conn]
        for key, req in asked:
            del self.tool_requests[key]
            req.caller.owes.pop(key, None)
            params = {"requestId": key, "reason": why}
            actions.append(Send(req.caller.conn, _notification(CANCELLED, params)))
        if not server.ready:
            actions += self.unpark(now)
        return actions

    def fail_server(self, server: Server, why: str, now: float) -> list[Action]:
        """``server`` failed its initialization: close it 4003; it leaves the catalog."""
        log.warning("agent %s: tool connection %d: %s", self.name, server.conn, why)
        actions = self._server_gone(server, why, now)
        self.dropped.append(server.conn)
        actions.append(Close(server.conn, CLOSE_INIT_FAILED, why[:120]))
        return actions

    # ------------------------------------------------------------------ list_changed to callers

    def set_filters(self, filters: AgentFilters, now: float) -> None:
        """Replace this agent's tool filters; callers hear of what that changed for them
        (``list_changed``) as of any other change to the catalog."""
        change = self.catalog.set_filters(tool_filter=filters.tools, server_filters=filters.servers)
        self.note(change, now)

    def watched(self, identity: str) -> None:
        """Tell the policy's watcher that server ``identity`` changed in the catalog."""
        watch = self.policy.watch
        if watch is not None:
            watch(self.name, identity)

    def note(self, change: Change, now: float) -> None:
        if not change.kinds:
            return
        self.changed |= change.kinds
        if self.notify_at is None:
            self.notify_at = now + self.policy.list_changed_delay
            self.deadlines.push(self.deadlines.notify, (self.notify_at, self))

    def flush_changes(self) -> list[Action]:
        """The coalescing delay passed: tell each initialized caller of each list that now
        differs from what it last saw."""
        self.notify_at = None
        kinds = [kind for kind in Kind if kind in self.changed]
        self.changed = frozenset()
        actions: list[Action] = []
        for caller in self.callers.values():
            if caller.capabilities is None or caller.target is not None:
                continue
            methods: list[str] = []
            for kind in kinds:
                items = self.catalog.items(kind)
                if caller.seen.get(kind, ()) != items:
                    caller.seen[kind] = items
                    if kind.list_changed not in methods:
                        methods.append(kind.list_changed)
            actions += [Send(caller.conn, _notification(method)) for method in methods]
        return actions

    # ------------------------------------------------------------------ callers come and go

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
        tally = self.policy.tally
        if self.parked:
            for c, f, _ in self.parked:
                if c is caller:
                    tally.answered(self.name, f.method, CANCELLED_OUTCOME, None)
            self.parked = [p for p in self.parked if p[0] is not caller]
        actions: list[Action] = []
        for tool_id in caller.inflight:
            entry = self.pending.pop(tool_id)
            tally.answered(self.name, entry.method, CANCELLED_OUTCOME, None)
            params = {"requestId": tool_id, "reason": "caller disconnected"}
            actions.append(Send(entry.server, _notification(CANCELLED, params)))
        for key in caller.owes:
            req = self.tool_requests.pop(key)
            why = "caller disconnected"
            error = error_frame(req.tool_id, CONNECTION_ERROR, "Connection error", why)
            actions.append(Send(req.server, error))
        return actions

    def unpark(self, now: float) -> list[Action]:
        """Run the parked requests again (an initialization ended)."""
        if not self.parked:
            return []
        parked, self.parked = self.parked, []
        for caller, _, _ in parked:
            caller.parked -= 1
        actions: list[Action] = []
        for caller, frame, arrived in parked:
            actions += front.request(self, caller, frame, now, arrived)
        return actions

    # ------------------------------------------------------------------ caller to server

    def from_caller(
        self, caller: Caller, frame: Request | Notification | Result | ErrorResponse, now: float
    ) -> list[Action]:
        """A caller of this agent sent ``frame`` (parsed) at time ``now``."""
        self.activity += 1
        caller.last_active = self.activity
        if isinstance(frame, Request):
            return front.request(self, caller, frame, now)
        if isinstance(frame, Notification):
            return front.caller_notification(self, caller, frame)
        return front.response_from_caller(self, caller, frame)

    def default_server(self) -> Server | None:
        """The agent's default server (see the module docstring), ready or not."""
        first: Server | None = None
        for server in self.servers.values():
            if server.is_default:
                return server
            if first is None:
                first = server
        return first

    # ------------------------------------------------------------------ middleware

    def reply(self, caller: Caller, rid: Id, call: Call | None, reply: Reply) -> list[Action]:
        """Answer ``caller`` with ``reply`` after the answer hooks."""
        if call is not None:
            run_answer_hooks(self.policy.middleware, call, reply)
        frame: dict[str, Any] = {"jsonrpc": "2.0", "id": rid}
        if reply.error is not None:
            frame["error"] = reply.error
        else:
            frame["result"] = reply.result
        return [Send(caller.conn, dumps(frame))]

    def error_to(
        self,
        caller: Caller,
        rid: Id,
        call: Call | None,
        code: int,
        message: str,
        data: Any = MISSING,
    ) -> Send:
        if call is None:
            return Send(caller.conn, error_frame(rid, code, message, data))
        error: dict[str, Any] = {"code": code, "message": message}
        if data is not MISSING:
            error["data"] = data
        action = self.reply(caller, rid, call, Reply(error=error))[0]
        assert isinstance(action, Send)
        return action

    # ------------------------------------------------------------------ caller notifications

    # ------------------------------------------------------------------ server to callers

    def from_server(
        self, server: Server, frame: Request | Notification | Result | ErrorResponse, now: float
    ) -> list[Action]:
        """A server of this agent sent ``frame`` (parsed) at time ``now``."""
        if server.gone:
            return []
        if isinstance(frame, Result | ErrorResponse):
            rid = frame.id
            if type(rid) is int and server.relay_requests and rid in server.relay_requests:
                return upstream.relay_answer(self, rid, self.relay_requests[rid], frame, now)
            return self._response_from_server(server, frame, now)
        if isinstance(frame, Notification):
            return self._notification_from_server(server, frame, now)
        conn = server.conn
        if frame.method == "ping":
            return [Send(conn, _result_frame(frame.id, {}))]
        limit = self.policy.max_tool_requests
        tally = self.policy.tally
        if limit and not server.remote and self.tool_request_count() >= limit:
            why = f"max_tool_requests: at most {limit} tool requests await callers per agent"
            tally.tool_request(frame.method, "-32007")
            return [Send(conn, error_frame(frame.id, LIMIT_EXCEEDED, "Limit exceeded", why))]
        caller = self.choose_caller(server, frame.method)
        if caller is None:
            why = f"cannot route {frame.method}: no caller with a request in flight to this server"
            if frame.method in _NEEDS:
                why += f" that declared {_NEEDS[frame.method]}"
            tally.tool_request(frame.method, "-32005")
            return [Send(conn, error_frame(frame.id, NO_CALLER, "No caller connected", why))]
        tally.tool_request(frame.method, "routed")
        key = self.next_tool_request
        self.next_tool_request += 1
        deadline = now + self.policy.tool_request_timeout
        req = ToolRequest(caller, conn, frame.id, frame.method, deadline)
        self.tool_requests[key] = req
        self.deadlines.push(self.deadlines.tool_requests, (deadline, self, key, req))
        caller.owes[key] = None
        return [Send(caller.conn, dumps(frame.to_json(id=key)))]

    def tool_request_count(self) -> int:
        """Requests of this agent's servers awaiting a caller: here (those of servers on
        other nodes are counted there), and on the other nodes (cluster mode)."""
        here = self.tool_requests
        remote = self.servers
        count = sum(1 for r in here.values() if not remote[r.server].remote)
        elsewhere = self.policy.elsewhere
        return count + (elsewhere(self.name) if elsewhere is not None else 0)

    def choose_caller(self, server: Server, method: str) -> Caller | None:
        """The caller a tool-initiated request goes to (see the rule above), or None."""
        needs = _NEEDS.get(method)
        conn = server.conn
        pending = self.pending
        best: Caller | None = None
        for caller in self.callers.values():
            if best is not None and caller.last_active < best.last_active:
                continue
            declared = caller.capabilities
            if needs is not None and declared is not None and needs not in declared:
                continue
            if any(pending[t].server == conn for t in caller.inflight):
                best = caller
        return best

    def _response_from_server(
        self, server: Server, frame: Result | ErrorResponse, now: float
    ) -> list[Action]:
        tool_id = frame.id
        entry = self.pending.pop(tool_id, None) if type(tool_id) is int else None
        if entry is not None and entry.server != server.conn:
            # Another server's request: not this one's to answer.
            assert type(tool_id) is int
            self.pending[tool_id] = entry
            entry = None
        if entry is None:
            log.debug("agent %s: tool response to id %r nobody awaits, dropped", self.name, tool_id)
            return []
        assert type(tool_id) is int
        caller = entry.caller
        del caller.inflight[tool_id]
        self.policy.tally.answered(
            self.name, entry.method, RESULT if type(frame) is Result else ERROR, now - entry.started
        )
        if entry.call is not None:
            if isinstance(frame, Result):
                reply = Reply(result=frame.result)
            else:
                reply = Reply(error=frame.error.to_json())
            return self.reply(caller, entry.caller_id, entry.call, reply)
        return [Send(caller.conn, dumps(frame.to_json(id=entry.caller_id)))]

    def _notification_from_server(
        self, server: Server, frame: Notification, now: float
    ) -> list[Action]:
        params = frame.params
        method = frame.method
        if method == "notifications/progress" and isinstance(params, dict):
            token = params.get("progressToken", MISSING)
            if type(token) is int and 0 < token < self.next_id:
                entry = self.pending.get(token)
                if entry is None or entry.token is MISSING or entry.server != server.conn:
                    log.debug("agent %s: progress for finished request dropped", self.name)
                    return []
                out = frame.to_json(params={**params, "progressToken": entry.token})
                return [Send(entry.caller.conn, dumps(out))]
        if method == CANCELLED and isinstance(params, dict):
            return self._cancel_from_server(server, frame, params)
        kind = _LIST_CHANGED.get(method)
        if kind is not None:
            if not server.ready and not server.fetches:
                return []  # not initialized yet: its lists are fetched anyway
            if kind is Kind.RESOURCE_TEMPLATES:  # notifications/resources/list_changed
                return upstream.list_kind(self, server, Kind.RESOURCES, now) + upstream.list_kind(
                    self, server, Kind.RESOURCE_TEMPLATES, now
                )
            return upstream.list_kind(self, server, kind, now)
        data = dumps(frame.to_json())
        callers = self.callers.values()
        identity = server.identity
        if method == "notifications/resources/updated":
            uri = params.get("uri") if isinstance(params, dict) else None
            return [
                Send(c.conn, data)
                for c in callers
                if uri in c.subscriptions and c.target in (None, identity)
            ]
        if not self.callers:
            log.debug("agent %s: no caller for %s, dropped", self.name, method)
            return []
        return [Send(c.conn, data) for c in callers if c.target is None or c.target == identity]

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
        req.caller.owes.pop(key, None)
        out = frame.to_json(params={**params, "requestId": key})
        return [Send(req.caller.conn, dumps(out))]

    # ------------------------------------------------------------------ failures and time

    def forward_failed(
        self, server: Server, tool_id: int, why: str, now: float | None = None
    ) -> list[Action]:
        """Request ``tool_id`` could not be delivered to ``server``: answer ``-32002``
        (``now``, when given, times the answer for the latency metric)."""
        entry = self.pending.get(tool_id)
        if entry is None or entry.server != server.conn:
            return []
        del self.pending[tool_id]
        del entry.caller.inflight[tool_id]
        seconds = None if now is None else now - entry.started
        self.policy.tally.answered(self.name, entry.method, "-32002", seconds)
        return [
            self.error_to(
                entry.caller, entry.caller_id, entry.call, FORWARD_FAILED, "Forward failed", why
            )
        ]

    def awaits_request(self, tool_id: int, entry: Pending) -> bool:
        """Whether the caller request ``entry`` is still in flight as ``tool_id``."""
        return self.pending.get(tool_id) is entry

    def awaits_tool_request(self, key: int, req: ToolRequest) -> bool:
        """Whether the tool request ``req`` still awaits its caller's answer as ``key``."""
        return self.tool_requests.get(key) is req

    def expire_relay(self, rid: int, req: RelayRequest, now: float) -> list[Action]:
        """A relay request reached its deadline. One answered in the meantime is a no-op."""
        return upstream.expire(self, rid, req, now)

    def awaits_relay(self, rid: int, req: RelayRequest) -> bool:
        """Whether the relay request ``req`` still awaits its server's answer as ``rid``."""
        return self.relay_requests.get(rid) is req

    def expire_request(
        self, tool_id: int, entry: Pending, now: float | None = None
    ) -> list[Action]:
        """``entry`` reached its deadline (at ``now``): ``-32006`` to its caller, cancel it at
        its server.

        A request answered in the meantime is a no-op.
        """
        if self.pending.get(tool_id) is not entry:
            return []
        del self.pending[tool_id]
        del entry.caller.inflight[tool_id]
        seconds = None if now is None else now - entry.started
        self.policy.tally.answered(self.name, entry.method, "-32006", seconds)
        why = f"the tool did not answer within {self.policy.request_timeout:g} s"
        params = {"requestId": tool_id, "reason": "request timed out at the relay"}
        return [
            self.error_to(
                entry.caller, entry.caller_id, entry.call, REQUEST_TIMEOUT, "Timeout", why
            ),
            Send(entry.server, _notification(CANCELLED, params)),
        ]

    def expire_tool_request(self, key: int, req: ToolRequest) -> list[Action]:
        """``req`` reached its deadline: cancel it at its caller, ``-32006`` to its server.

        A request answered in the meantime is a no-op.
        """
        if self.tool_requests.get(key) is not req:
            return []
        del self.tool_requests[key]
        req.caller.owes.pop(key, None)
        self.policy.tally.tool_request_timeout(req.method)
        params = {"requestId": key, "reason": "no answer in time"}
        timeout = self.policy.tool_request_timeout
        why = f"no caller answered {req.method} within {timeout:g} s"
        error = error_frame(req.tool_id, REQUEST_TIMEOUT, "Timeout", why)
        return [Send(req.caller.conn, _notification(CANCELLED, params)), Send(req.server, error)]

    # ------------------------------------------------------------------ checks

    def check_invariants(self) -> Iterator[str]:
        """Yield a description of every broken invariant of this session (for tests)."""
        name = self.name
        servers = {conn for conn, s in self.servers.items() if s.ready}
        for conn, server in self.servers.items():
            if server.conn != conn or server.session is not self or server.gone:
                yield f"agent {name}: server {conn} registered wrongly"
            if server.identity is not None and self.by_identity.get(server.identity) is not server:
                yield f"agent {name}: server {conn} not known by its identity {server.identity}"
            if server.identity is not None and server.identity not in self.catalog:
                yield f"agent {name}: server {server.identity} missing from the catalog"
        for identity, server in self.by_identity.items():
            if self.servers.get(server.conn) is not server:
                yield f"agent {name}: identity {identity} names a server that left"
        if len(self.catalog) != len(self.by_identity):
            yield f"agent {name}: catalog and session disagree on the servers"
        for tool_id, entry in self.pending.items():
            caller = self.callers.get(entry.caller.conn)
            if caller is not entry.caller or tool_id not in caller.inflight:
                yield f"agent {name}: pending {tool_id} has no live caller"
            if entry.server not in servers:
                yield f"agent {name}: pending {tool_id} went to {entry.server}, not a ready server"
            if not 0 < tool_id < self.next_id:
                yield f"agent {name}: pending {tool_id} was never allocated"
        for rid, req in self.relay_requests.items():
            if rid in self.pending or rid not in req.server.relay_requests:
                yield f"agent {name}: relay request {rid} badly recorded"
            if self.servers.get(req.server.conn) is not req.server:
                yield f"agent {name}: relay request {rid} to a server that left"
        for conn, caller in self.callers.items():
            if caller.conn != conn or caller.session is not self:
                yield f"caller {conn}: registered under another connection or session"
            for tool_id in caller.inflight:
                if tool_id not in self.pending:
                    yield f"caller {conn}: in-flight {tool_id} not pending"
            for key in caller.owes:
                if self.tool_requests.get(key) is None:
                    yield f"caller {conn}: owes unknown {key}"
        counts: dict[int, int] = {}
        for caller, _, _ in self.parked:
            counts[caller.conn] = counts.get(caller.conn, 0) + 1
            if self.callers.get(caller.conn) is not caller:
                yield f"agent {name}: parked request of a caller that left"
        for conn, caller in self.callers.items():
            if caller.parked != counts.get(conn, 0):
                yield f"caller {conn}: parked count {caller.parked} is wrong"
        if self.parked and not self.initializing:
            yield f"agent {name}: requests parked with no server initializing"
        for key, asked in self.tool_requests.items():
            caller = self.callers.get(asked.caller.conn)
            if caller is not asked.caller or key not in caller.owes:
                yield f"agent {name}: tool request {key} has no live caller"
            if asked.server not in self.servers:
                yield f"agent {name}: tool request {key} came from {asked.server}, not its tool"
