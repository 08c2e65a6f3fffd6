"""The routing core: every forwarding decision of the relay, with no I/O and no Trio.

Theory of operation
-------------------
The :class:`Router` is told what happened (a peer connected, sent a message, went away, a
deadline passed) and answers with a list of actions for the I/O layer to carry out:
:class:`Send` (deliver these bytes to that connection) and :class:`Close` (close that
connection with this code). Connections are named by integers the caller of the router picks.

Each agent (the id inside the token) has at most one tool connection, any number of caller
connections, and three tables, all keyed by values the relay chose itself, never parsed back
from the wire:

``pending``
    caller requests in flight to the tool, keyed by the id the tool saw. Those ids are
    integers from a per-agent counter that never repeats, so they are unique among the tool's
    in-flight requests whatever the callers chose (``0``, ``""``, duplicates, huge integers).
    The entry remembers the caller, its original id (restored exactly on the response) and its
    original progress token. The rewritten progress token is the tool-side id itself.
``tool_requests``
    requests the tool sent to the caller side (``sampling/createMessage``, ``roots/list``,
    ``elicitation/create``...), keyed by the id the chosen caller saw (another per-agent
    counter), remembering the tool's own id and a deadline.
``callers``
    per caller: its in-flight tool-side ids (to cancel them when it leaves) and the tool
    requests it owes an answer to.

Every request gets exactly one answer: the tool's response, or an error from the relay when
the request cannot complete (no tool ``-32001``, forward failed ``-32002``, tool gone
``-32003``). A request the caller cancelled, or whose caller left, is forgotten, and the tool's
late answer to it is dropped.

Rule for tool-initiated requests: they go to the most recently active caller among those with
requests in flight to the tool (the tool is most likely asking on behalf of one of those), and
when no caller has any in flight, to the most recently active caller. ``ping`` from the tool
is answered by the relay itself.

Looking ahead, the inputs stay the same when an agent gains several tool connections (a
``pending`` entry would also name its tool) or when a peer lives on another relay node (a
connection id is all the router knows of a peer).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator
from typing import Any

import attrs

from ._frames import (
    CONNECTION_ERROR,
    FORWARD_FAILED,
    LIMIT_EXCEEDED,
    MISSING,
    NO_CALLER,
    REQUEST_TIMEOUT,
    TOOL_NOT_CONNECTED,
    ErrorResponse,
    FrameError,
    Id,
    Notification,
    Request,
    Result,
    dumps,
    error_frame,
    parse_frame,
)
from .core.actions import CLOSE_REPLACED, Action, Close, Role, Send

__all__ = ["CLOSE_REPLACED", "Action", "Close", "Role", "Router", "Send"]

log = logging.getLogger("trio_mcp_relay.routing")

@attrs.define(slots=True)
class _Pending:
    caller: int
    caller_id: Id
    token: Any  # the caller's progress token, or MISSING
    deadline: float | None = None


@attrs.define(slots=True)
class _ToolRequest:
    caller: int
    tool_id: Id
    method: str
    deadline: float


@attrs.define(slots=True)
class _Caller:
    conn: int
    agent: str
    last_active: int = 0
    inflight: dict[int, None] = attrs.Factory(dict)  # tool-side ids, insertion ordered
    owes: set[int] = attrs.Factory(set)  # tool_requests keys this caller must answer


@attrs.define(slots=True)
class _Agent:
    name: str
    tool: int | None = None
    next_id: int = 1
    next_tool_request: int = 1
    callers: dict[int, _Caller] = attrs.Factory(dict)
    pending: dict[int, _Pending] = attrs.Factory(dict)
    tool_requests: dict[int, _ToolRequest] = attrs.Factory(dict)


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
    """

    def __init__(
        self,
        *,
        tool_request_timeout: float = 30.0,
        request_timeout: float = 0.0,
        max_inflight_per_caller: int = 0,
        max_tool_requests: int = 0,
    ) -> None:
        self.tool_request_timeout = tool_request_timeout
        self.request_timeout = request_timeout
        self.max_inflight_per_caller = max_inflight_per_caller
        self.max_tool_requests = max_tool_requests
        #: Set during a graceful shutdown: new caller requests are refused with -32003.
        self.draining = False
        # Deadlines in the order they were set. Each timeout is a constant, so each queue is
        # sorted; entries whose request completed first are skipped when they come up.
        self._request_deadlines: deque[tuple[float, _Agent, int, _Pending]] = deque()
        self._tool_request_deadlines: deque[tuple[float, _Agent, int, _ToolRequest]] = deque()
        self._agents: dict[str, _Agent] = {}
        self._tools: dict[int, _Agent] = {}
        self._callers: dict[int, _Caller] = {}
        self._activity = 0
        self._deadline_added = False

    # ------------------------------------------------------------------ introspection

    def role(self, conn: int) -> Role | None:
        """The role of a registered connection, or None."""
        if conn in self._tools:
            return Role.TOOL
        if conn in self._callers:
            return Role.CALLER
        return None

    def tool_of(self, agent: str) -> int | None:
        """The tool connection currently serving ``agent``."""
        state = self._agents.get(agent)
        return state.tool if state else None

    def stats(self) -> dict[str, Any]:
        """Connection counts in the reference server's health-check shape."""
        by_agent = {a.name: len(a.callers) for a in self._agents.values() if a.callers}
        tools = len(self._tools)
        callers = len(self._callers)
        return {
            "tool_connections": tools,
            "robot_connections": callers,
            "total_connections": tools + callers,
            "robot_connections_by_agent": by_agent,
        }

    def pending_count(self) -> int:
        """Requests in flight in either direction, over all agents."""
        return sum(len(a.pending) + len(a.tool_requests) for a in self._agents.values())

    def caller_count(self, agent: str) -> int:
        """How many callers ``agent`` has connected."""
        state = self._agents.get(agent)
        return len(state.callers) if state else 0

    def take_deadline_change(self) -> bool:
        """Whether a deadline was added since the last call (then wake the timer)."""
        added, self._deadline_added = self._deadline_added, False
        return added

    def next_deadline(self) -> float | None:
        """The earliest deadline :meth:`expire` acts on, or None if there is none."""
        requests, tool_requests = self._request_deadlines, self._tool_request_deadlines
        # Drop entries of requests answered in time (amortized O(1): each goes once).
        while requests and not self._request_waiting(requests[0]):
            requests.popleft()
        while tool_requests and not self._tool_request_waiting(tool_requests[0]):
            tool_requests.popleft()
        fronts = [q[0][0] for q in (requests, tool_requests) if q]
        return min(fronts, default=None)

    @staticmethod
    def _request_waiting(item: tuple[float, _Agent, int, _Pending]) -> bool:
        _, state, key, entry = item
        return state.pending.get(key) is entry

    @staticmethod
    def _tool_request_waiting(item: tuple[float, _Agent, int, _ToolRequest]) -> bool:
        _, state, key, req = item
        return state.tool_requests.get(key) is req

    # ------------------------------------------------------------------ connections

    def _agent(self, name: str) -> _Agent:
        state = self._agents.get(name)
        if state is None:
            state = self._agents[name] = _Agent(name)
        return state

    def _maybe_forget(self, agent: _Agent) -> None:
        if agent.tool is None and not (agent.callers or agent.pending or agent.tool_requests):
            self._agents.pop(agent.name, None)

    def tool_connected(self, conn: int, agent: str) -> list[Action]:
        """A tool connection for ``agent`` is up. It replaces (and closes) any previous one."""
        state = self._agent(agent)
        actions: list[Action] = []
        if state.tool is not None:
            old = state.tool
            log.info("agent %s: tool connection %d replaces %d", agent, conn, old)
            actions.extend(self._tool_gone(state, "tool connection was replaced"))
            actions.append(Close(old, CLOSE_REPLACED, "replaced by a newer tool connection"))
        state.tool = conn
        self._tools[conn] = state
        return actions

    def tool_disconnected(self, conn: int) -> list[Action]:
        """A tool connection went away. Unknown or already replaced connections are a no-op."""
        state = self._tools.get(conn)
        if state is None or state.tool != conn:
            return []
        actions = self._tool_gone(state, "tool disconnected")
        self._maybe_forget(state)
        return actions

    def _tool_gone(self, state: _Agent, why: str) -> list[Action]:
        assert state.tool is not None
        del self._tools[state.tool]
        state.tool = None
        actions: list[Action] = []
        for entry in state.pending.values():
            actions.append(
                Send(
                    entry.caller,
                    error_frame(entry.caller_id, CONNECTION_ERROR, "Connection error", why),
                )
            )
        state.pending.clear()
        for caller in state.callers.values():
            caller.inflight.clear()
            caller.owes.clear()
        for key, req in state.tool_requests.items():
            params = {"requestId": key, "reason": why}
            actions.append(Send(req.caller, _notification("notifications/cancelled", params)))
        state.tool_requests.clear()
        return actions

    def caller_connected(self, conn: int, agent: str) -> list[Action]:
        """A caller connection for ``agent`` is up."""
        state = self._agent(agent)
        self._activity += 1
        caller = _Caller(conn, agent, last_active=self._activity)
        state.callers[conn] = caller
        self._callers[conn] = caller
        return []

    def caller_disconnected(self, conn: int) -> list[Action]:
        """A caller went away: cancel its requests at the tool, fail what it owed the tool."""
        caller = self._callers.pop(conn, None)
        if caller is None:
            return []
        state = self._agents[caller.agent]
        del state.callers[conn]
        actions: list[Action] = []
        tool = state.tool
        for tool_id in caller.inflight:
            del state.pending[tool_id]
            if tool is not None:
                params = {"requestId": tool_id, "reason": "caller disconnected"}
                actions.append(Send(tool, _notification("notifications/cancelled", params)))
        for key in caller.owes:
            req = state.tool_requests.pop(key)
            if tool is not None:
                actions.append(
                    Send(
                        tool,
                        error_frame(
                            req.tool_id, CONNECTION_ERROR, "Connection error", "caller disconnected"
                        ),
                    )
                )
        self._maybe_forget(state)
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
        caller = self._callers.get(conn)
        if caller is not None:
            self._activity += 1
            caller.last_active = self._activity
            return self._from_caller(caller, frame, now)
        state = self._tools.get(conn)
        if state is not None and state.tool == conn:
            return self._from_tool(state, conn, frame, now)
        return []

    def _from_caller(
        self, caller: _Caller, frame: Request | Notification | Result | ErrorResponse, now: float
    ) -> list[Action]:
        state = self._agents[caller.agent]
        tool = state.tool
        if isinstance(frame, Request):
            if tool is None:
                return [
                    Send(
                        caller.conn,
                        error_frame(frame.id, TOOL_NOT_CONNECTED, "Tool not connected"),
                    )
                ]
            if self.draining:
                why = "the relay is shutting down"
                return [
                    Send(
                        caller.conn,
                        error_frame(frame.id, CONNECTION_ERROR, "Connection error", why),
                    )
                ]
            limit = self.max_inflight_per_caller
            if limit and len(caller.inflight) >= limit:
                why = f"max_inflight_per_caller: at most {limit} requests in flight per caller"
                return [
                    Send(caller.conn, error_frame(frame.id, LIMIT_EXCEEDED, "Limit exceeded", why))
                ]
            tool_id = state.next_id
            state.next_id += 1
            token = _progress_token(frame.params)
            params = frame.params
            if token is not MISSING:
                params = _with_progress_token(params, tool_id)
            entry = state.pending[tool_id] = _Pending(caller.conn, frame.id, token)
            if self.request_timeout:
                entry.deadline = now + self.request_timeout
                self._request_deadlines.append((entry.deadline, state, tool_id, entry))
                if len(self._request_deadlines) == 1:
                    self._deadline_added = True
            caller.inflight[tool_id] = None
            out = Request(id=tool_id, method=frame.method, params=params, extra=frame.extra)
            return [Send(tool, dumps(out.to_json()), request=tool_id)]
        if isinstance(frame, Notification):
            if tool is None:
                log.debug("agent %s: no tool; dropped %s", state.name, frame.method)
                return []
            if frame.method == "notifications/cancelled":
                return self._cancel_from_caller(state, caller, tool, frame)
            return [Send(tool, dumps(frame.to_json()))]
        return self._response_from_caller(state, caller, frame)

    def _cancel_from_caller(
        self, state: _Agent, caller: _Caller, tool: int, frame: Notification
    ) -> list[Action]:
        params = frame.params
        wanted = params.get("requestId", MISSING) if isinstance(params, dict) else MISSING
        # The most recent in-flight request of this caller with that id (a caller that
        # reuses an id while it is in flight can only mean the latest one).
        for tool_id in reversed(caller.inflight):
            if _same_id(state.pending[tool_id].caller_id, wanted):
                break
        else:
            log.debug("agent %s: cancellation of unknown request %r dropped", state.name, wanted)
            return []
        del state.pending[tool_id]
        del caller.inflight[tool_id]
        out = Notification(
            method=frame.method, params={**params, "requestId": tool_id}, extra=frame.extra
        )
        return [Send(tool, dumps(out.to_json()))]

    def _response_from_caller(
        self, state: _Agent, caller: _Caller, frame: Result | ErrorResponse
    ) -> list[Action]:
        key = frame.id
        req = state.tool_requests.get(key) if type(key) is int else None
        if req is None or req.caller != caller.conn:
            log.debug("agent %s: caller response to unknown id %r dropped", state.name, key)
            return []
        assert type(key) is int
        del state.tool_requests[key]
        caller.owes.discard(key)
        if state.tool is None:
            return []
        out = attrs.evolve(frame, id=req.tool_id)
        return [Send(state.tool, dumps(out.to_json()))]

    def _from_tool(
        self,
        state: _Agent,
        conn: int,
        frame: Request | Notification | Result | ErrorResponse,
        now: float,
    ) -> list[Action]:
        if isinstance(frame, Result | ErrorResponse):
            return self._response_from_tool(state, frame)
        if isinstance(frame, Notification):
            return self._notification_from_tool(state, frame)
        if frame.method == "ping":
            return [Send(conn, dumps(Result(id=frame.id, result={}).to_json()))]
        limit = self.max_tool_requests
        if limit and len(state.tool_requests) >= limit:
            why = f"max_tool_requests: at most {limit} tool requests await callers per agent"
            return [Send(conn, error_frame(frame.id, LIMIT_EXCEEDED, "Limit exceeded", why))]
        caller = self._choose_caller(state)
        if caller is None:
            return [
                Send(
                    conn,
                    error_frame(
                        frame.id, NO_CALLER, "No caller connected", f"cannot route {frame.method}"
                    ),
                )
            ]
        key = state.next_tool_request
        state.next_tool_request += 1
        deadline = now + self.tool_request_timeout
        req = state.tool_requests[key] = _ToolRequest(caller.conn, frame.id, frame.method, deadline)
        self._tool_request_deadlines.append((deadline, state, key, req))
        caller.owes.add(key)
        if len(self._tool_request_deadlines) == 1:
            self._deadline_added = True
        return [Send(caller.conn, dumps(attrs.evolve(frame, id=key).to_json()))]

    def _choose_caller(self, state: _Agent) -> _Caller | None:
        busy = [c for c in state.callers.values() if c.inflight]
        candidates = busy or list(state.callers.values())
        return max(candidates, key=lambda c: c.last_active, default=None)

    def _response_from_tool(self, state: _Agent, frame: Result | ErrorResponse) -> list[Action]:
        tool_id = frame.id
        entry = state.pending.pop(tool_id, None) if type(tool_id) is int else None
        if entry is None:
            log.debug(
                "agent %s: tool response to id %r nobody awaits, dropped", state.name, tool_id
            )
            return []
        assert type(tool_id) is int
        caller = self._callers[entry.caller]
        del caller.inflight[tool_id]
        out = attrs.evolve(frame, id=entry.caller_id)
        return [Send(entry.caller, dumps(out.to_json()))]

    def _notification_from_tool(self, state: _Agent, frame: Notification) -> list[Action]:
        params = frame.params
        if frame.method == "notifications/progress" and isinstance(params, dict):
            token = params.get("progressToken", MISSING)
            if type(token) is int and 0 < token < state.next_id:
                entry = state.pending.get(token)
                if entry is None or entry.token is MISSING:
                    log.debug("agent %s: progress for finished request dropped", state.name)
                    return []
                out = attrs.evolve(frame, params={**params, "progressToken": entry.token})
                return [Send(entry.caller, dumps(out.to_json()))]
        if frame.method == "notifications/cancelled" and isinstance(params, dict):
            return self._cancel_from_tool(state, frame, params)
        if not state.callers:
            log.debug("agent %s: no caller for %s, dropped", state.name, frame.method)
            return []
        data = dumps(frame.to_json())
        return [Send(c, data) for c in state.callers]

    def _cancel_from_tool(
        self, state: _Agent, frame: Notification, params: dict[str, Any]
    ) -> list[Action]:
        wanted = params.get("requestId", MISSING)
        found = next(
            ((k, r) for k, r in state.tool_requests.items() if _same_id(r.tool_id, wanted)), None
        )
        if found is None:
            log.debug("agent %s: tool cancelled unknown request %r", state.name, wanted)
            return []
        key, req = found
        del state.tool_requests[key]
        self._callers[req.caller].owes.discard(key)
        out = attrs.evolve(frame, params={**params, "requestId": key})
        return [Send(req.caller, dumps(out.to_json()))]

    # ------------------------------------------------------------------ failures and time

    def forward_failed(
        self, tool: int, tool_id: int, why: str = "the tool is not reading"
    ) -> list[Action]:
        """A forwarded caller request could not be delivered to the tool: answer ``-32002``."""
        state = self._tools.get(tool)
        if state is None or state.tool != tool:
            return []
        entry = state.pending.pop(tool_id, None)
        if entry is None:
            return []
        del self._callers[entry.caller].inflight[tool_id]
        return [
            Send(
                entry.caller,
                error_frame(entry.caller_id, FORWARD_FAILED, "Forward failed", why),
            )
        ]

    def expire(self, now: float) -> list[Action]:
        """Act on every deadline that has passed.

        Tool requests no caller answered in time: the tool gets ``-32006``, the caller
        ``notifications/cancelled``. Caller requests past ``request_timeout``: the caller gets
        ``-32006`` with its id, the tool ``notifications/cancelled``.
        """
        actions: list[Action] = []
        queue = self._tool_request_deadlines
        while queue and queue[0][0] <= now:
            item = queue.popleft()
            if not self._tool_request_waiting(item):
                continue  # answered in time
            _, state, key, req = item
            del state.tool_requests[key]
            self._callers[req.caller].owes.discard(key)
            params = {"requestId": key, "reason": "no answer in time"}
            actions.append(Send(req.caller, _notification("notifications/cancelled", params)))
            if state.tool is not None:
                why = f"no caller answered {req.method} within {self.tool_request_timeout:g} s"
                actions.append(
                    Send(state.tool, error_frame(req.tool_id, REQUEST_TIMEOUT, "Timeout", why))
                )
            self._maybe_forget(state)
        requests = self._request_deadlines
        while requests and requests[0][0] <= now:
            waiting = requests.popleft()
            if not self._request_waiting(waiting):
                continue  # answered in time
            _, state, tool_id, entry = waiting
            del state.pending[tool_id]
            del self._callers[entry.caller].inflight[tool_id]
            why = f"the tool did not answer within {self.request_timeout:g} s"
            actions.append(
                Send(entry.caller, error_frame(entry.caller_id, REQUEST_TIMEOUT, "Timeout", why))
            )
            if state.tool is not None:
                params = {"requestId": tool_id, "reason": "request timed out at the relay"}
                actions.append(Send(state.tool, _notification("notifications/cancelled", params)))
        return actions

    def check_invariants(self) -> Iterator[str]:
        """Yield a description of every broken internal invariant (for tests)."""
        for state in self._agents.values():
            if state.tool is not None and self._tools.get(state.tool) is not state:
                yield f"agent {state.name}: tool {state.tool} not registered"
            if state.tool is None and state.pending:
                yield f"agent {state.name}: pending requests without a tool"
            for tool_id, entry in state.pending.items():
                caller = state.callers.get(entry.caller)
                if caller is None or tool_id not in caller.inflight:
                    yield f"agent {state.name}: pending {tool_id} has no live caller"
            for caller in state.callers.values():
                for tool_id in caller.inflight:
                    if tool_id not in state.pending:
                        yield f"caller {caller.conn}: in-flight {tool_id} not pending"
                for key in caller.owes:
                    if state.tool_requests.get(key) is None:
                        yield f"caller {caller.conn}: owes unknown {key}"
            for key, req in state.tool_requests.items():
                caller = state.callers.get(req.caller)
                if caller is None or key not in caller.owes:
                    yield f"agent {state.name}: tool request {key} has no live caller"
