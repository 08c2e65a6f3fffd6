"""The relay as the MCP server of each caller: what happens to a caller's frames.

Functions of a :class:`~trio_mcp_relay.core.session.Session` (the rules are in its module
docstring): a caller request is answered by the relay from the catalog (``initialize``, the
lists, ``ping``, ``logging/setLevel``), parked while a server it depends on initializes,
refused, or forwarded to the server :mod:`~trio_mcp_relay.core.resolve` picks, after the
request middleware; caller notifications and caller answers to server requests are routed
back. The session calls :func:`request`, :func:`caller_notification` and
:func:`response_from_caller`; it owns every table these functions change.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from .._frames import (
    CONNECTION_ERROR,
    LIMIT_EXCEEDED,
    MISSING,
    TOOL_NOT_CONNECTED,
    ErrorResponse,
    Notification,
    Request,
    Result,
    dumps,
    error_frame,
)
from . import resolve
from . import session as _session  # the records; a cycle, resolved at call time
from .actions import Action, Send
from .catalog import CursorError, Kind
from .middleware import Call, Refused, Reply, run_request_hooks
from .resolve import LISTS as _LISTS
from .tally import CANCELLED as CANCELLED_OUTCOME
from .tally import RESULT, outcome_of_code
from .upstream import (
    RELAY_INFO,
    Purpose,
    RelayRequest,
    Server,
)
from .wire import (
    CANCELLED,
    progress_token,
    result_frame,
    same_id,
    with_progress_token,
)

if TYPE_CHECKING:
    from .session import Caller, Session

__all__ = ["caller_notification", "request", "response_from_caller"]

log = logging.getLogger("trio_mcp_relay.routing")


def request(
    session: Session, caller: Caller, frame: Request, now: float, arrived: float | None = None
) -> list[Action]:
    """Route a caller request that arrived at ``arrived`` (``now`` unless it was parked);
    an answer given here is counted here, one forwarded when it comes back."""
    method = frame.method
    if arrived is None:
        arrived = now
    tally = session.policy.tally
    if method == "ping":
        tally.answered(session.name, method, RESULT, now - arrived)
        return [Send(caller.conn, result_frame(frame.id, {}))]
    if not session.servers:
        tally.answered(session.name, method, "-32001", now - arrived)
        return [Send(caller.conn, error_frame(frame.id, TOOL_NOT_CONNECTED, "Tool not connected"))]
    policy = session.policy
    if policy.draining:
        why = "the relay is shutting down"
        tally.answered(session.name, method, "-32003", now - arrived)
        return [Send(caller.conn, error_frame(frame.id, CONNECTION_ERROR, "Connection error", why))]
    if caller.target is not None:
        return _to_target(session, caller, frame, caller.target, now, arrived)
    refused: Refused | None = None
    try:
        target = resolve.target(session, frame.method, frame.params)
    except resolve.Park:
        return park(session, caller, frame, now, arrived)
    except Refused as refusal:
        if not policy.middleware:
            error = {"jsonrpc": "2.0", "id": frame.id, "error": refusal.to_error()}
            tally.answered(session.name, method, outcome_of_code(refusal.code), now - arrived)
            return [Send(caller.conn, dumps(error))]
        refused, target = refusal, resolve.Target(None)
    call: Call | None = None
    if policy.middleware:
        identity = None if target.server is None else target.server.identity
        call = Call(session.name, caller.conn, frame.id, method, frame.params, identity)
        failed = run_request_middleware(session, call, now - arrived)
        if failed is not None:
            return [Send(caller.conn, failed)]
        if call.params is not frame.params and (target.server is not None or refused):
            # Rewritten: route what the middleware wrote, in the caller's names.
            try:
                target, refused = resolve.target(session, method, call.params), None
            except resolve.Park:
                return park(session, caller, frame, now, arrived)  # the middleware runs again
            except Refused as refusal:
                refused = refusal
        if refused is not None:
            code, message, data = refused.code, refused.message, refused.data
            tally.answered(session.name, method, outcome_of_code(code), now - arrived)
            return [session.error_to(caller, frame.id, call, code, message, data)]
    if target.server is None:
        return answer_here(session, caller, frame, call, now, arrived)
    limit = policy.max_inflight_per_caller
    if limit and len(caller.inflight) >= limit:
        why = f"max_inflight_per_caller: at most {limit} requests in flight per caller"
        tally.answered(session.name, method, "-32007", now - arrived)
        return [session.error_to(caller, frame.id, call, LIMIT_EXCEEDED, "Limit exceeded", why)]
    return forward(session, caller, frame, target.server, target.params, call, now, arrived)


def _to_target(
    session: Session, caller: Caller, frame: Request, identity: str, now: float, arrived: float
) -> list[Action]:
    """A request of a caller standing for another node's callers of server ``identity``:
    to that server as it is (that node resolved names, ran the middleware and counts the
    caller's limits), else ``-32003``: the server has left this node."""
    server = session.by_identity.get(identity)
    if server is None or not server.ready:
        why = f"server {identity} is not connected to this relay node"
        session.policy.tally.answered(session.name, frame.method, "-32003", now - arrived)
        return [Send(caller.conn, error_frame(frame.id, CONNECTION_ERROR, "Connection error", why))]
    return forward(session, caller, frame, server, frame.params, None, now, arrived)


def answer_here(
    session: Session, caller: Caller, frame: Request, call: Call | None, now: float, arrived: float
) -> list[Action]:
    """The requests the relay answers itself, from the catalog."""
    method, params = frame.method, frame.params if call is None else call.params
    tally = session.policy.tally
    result: Any
    if method == "initialize":
        capabilities = params.get("capabilities") if isinstance(params, dict) else None
        caller.capabilities = capabilities if isinstance(capabilities, dict) else {}
        version = params.get("protocolVersion") if isinstance(params, dict) else None
        result = session.catalog.initialize_result(version, RELAY_INFO)
        caller.seen = {kind: session.catalog.items(kind) for kind in Kind}
    elif method == "logging/setLevel":
        actions: list[Action] = []
        for server in session.servers.values():
            if server.ready and server.declares("logging"):
                rid = session.new_id()
                deadline = session.policy.init_timeout + now
                req = RelayRequest(server, Purpose.FIRE, method, None, deadline)
                session.relay_requests[rid] = req
                server.relay_requests[rid] = None
                session.deadlines.push(session.deadlines.relay, (deadline, session, rid, req))
                out = Request(id=rid, method=method, params=params)
                actions.append(Send(server.conn, dumps(out.to_json())))
        actions += session.reply(caller, frame.id, call, Reply(result={}))
        tally.answered(session.name, method, RESULT, now - arrived)
        return actions
    else:
        cursor = params.get("cursor") if isinstance(params, dict) else None
        kind = _LISTS[method]
        caller.seen[kind] = session.catalog.items(kind)
        try:
            result = session.catalog.list_result(kind, cursor)
        except CursorError as exc:
            tally.answered(session.name, method, outcome_of_code(exc.code), now - arrived)
            return [session.error_to(caller, frame.id, call, exc.code, "Invalid params", str(exc))]
    tally.answered(session.name, method, RESULT, now - arrived)
    return session.reply(caller, frame.id, call, Reply(result=result))


def park(
    session: Session, caller: Caller, frame: Request, now: float, arrived: float
) -> list[Action]:
    """Keep ``frame`` until an initialization ends; parked requests count towards the
    caller's in-flight limit."""
    limit = session.policy.max_inflight_per_caller
    if limit and len(caller.inflight) + caller.parked >= limit:
        why = f"max_inflight_per_caller: at most {limit} requests in flight per caller"
        session.policy.tally.answered(session.name, frame.method, "-32007", now - arrived)
        return [Send(caller.conn, error_frame(frame.id, LIMIT_EXCEEDED, "Limit exceeded", why))]
    caller.parked += 1
    session.parked.append((caller, frame, arrived))
    return []


def forward(
    session: Session,
    caller: Caller,
    frame: Request,
    server: Server,
    params: Any,
    call: Call | None,
    now: float,
    arrived: float,
) -> list[Action]:
    tool_id = session.next_id
    session.next_id = tool_id + 1
    token = progress_token(params)
    if token is not MISSING:
        params = with_progress_token(params, tool_id)
    conn = server.conn
    entry = _session.Pending(caller, frame.id, token, conn, frame.method, None, call, arrived)
    session.pending[tool_id] = entry
    policy = session.policy
    if policy.request_timeout:
        entry.deadline = now + policy.request_timeout
        session.deadlines.push(
            session.deadlines.requests, (entry.deadline, session, tool_id, entry)
        )
    caller.inflight[tool_id] = None
    method = frame.method
    if method == "resources/subscribe":
        caller.subscriptions[params["uri"]] = None
    elif method == "resources/unsubscribe":
        caller.subscriptions.pop(params["uri"], None)
    return [Send(conn, dumps(frame.to_json(id=tool_id, params=params)), request=tool_id)]


def run_request_middleware(session: Session, call: Call, seconds: float) -> bytes | None:
    """Run the request hooks; the error frame to answer with when one refused (and
    counted, ``seconds`` after the request arrived)."""
    error = run_request_hooks(session.policy.middleware, call)
    if error is None:
        return None
    code = error.get("code")
    outcome = outcome_of_code(code) if type(code) is int else "relay_other"
    session.policy.tally.answered(session.name, call.method, outcome, seconds)
    return dumps({"jsonrpc": "2.0", "id": call.id, "error": error})


def caller_notification(session: Session, caller: Caller, frame: Notification) -> list[Action]:
    method = frame.method
    if method == CANCELLED:
        return cancel_from_caller(session, caller, frame)
    if method == "notifications/initialized":
        return []
    data = dumps(frame.to_json())
    if caller.target is not None:
        server = session.by_identity.get(caller.target)
        return [Send(server.conn, data)] if server is not None and server.ready else []
    if method == "notifications/roots/list_changed":
        return [Send(s.conn, data) for s in session.servers.values() if s.ready]
    server = session.default_server()
    if server is None or not server.ready:
        log.debug("agent %s: no ready tool; dropped %s", session.name, method)
        return []
    return [Send(server.conn, data)]


def cancel_from_caller(session: Session, caller: Caller, frame: Notification) -> list[Action]:
    params = frame.params
    wanted = params.get("requestId", MISSING) if isinstance(params, dict) else MISSING
    # The most recent in-flight request of this caller with that id (a caller that
    # reuses an id while it is in flight can only mean the latest one).
    for tool_id in reversed(caller.inflight):
        if same_id(session.pending[tool_id].caller_id, wanted):
            break
    else:
        for index, (who, parked, _) in enumerate(session.parked):
            if who is caller and same_id(parked.id, wanted):
                del session.parked[index]
                caller.parked -= 1
                session.policy.tally.answered(session.name, parked.method, CANCELLED_OUTCOME, None)
                return []
        log.debug("agent %s: cancellation of unknown request %r dropped", session.name, wanted)
        return []
    entry = session.pending.pop(tool_id)
    del caller.inflight[tool_id]
    session.policy.tally.answered(session.name, entry.method, CANCELLED_OUTCOME, None)
    out = Notification(
        method=frame.method, params={**params, "requestId": tool_id}, extra=frame.extra
    )
    return [Send(entry.server, dumps(out.to_json()))]


def response_from_caller(
    session: Session, caller: Caller, frame: Result | ErrorResponse
) -> list[Action]:
    key = frame.id
    req = session.tool_requests.get(key) if type(key) is int else None
    if req is None or req.caller is not caller:
        log.debug("agent %s: caller response to unknown id %r dropped", session.name, key)
        return []
    assert type(key) is int
    del session.tool_requests[key]
    caller.owes.pop(key, None)
    return [Send(req.server, dumps(frame.to_json(id=req.tool_id)))]
