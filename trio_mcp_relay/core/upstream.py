"""The relay as the MCP client of each tool server: initialization and listing, as pure steps.

Theory of operation
-------------------
When a tool connection arrives, its session (:mod:`trio_mcp_relay.core.session`) makes it a
:class:`Server` and asks it, with requests of the relay's own:

1. ``initialize`` (the relay's clientInfo, :data:`RELAY_PROTOCOL_VERSION`, and the
   capabilities the relay can route to callers: roots, sampling, elicitation);
2. on its result, ``notifications/initialized``, then at once ``tools/list`` and, for each
   capability the server declared, ``resources/list``, ``resources/templates/list`` and
   ``prompts/list``, each following ``nextCursor`` page by page (a :class:`Fetch` per kind);
3. when every fetch is complete, the server is *ready*: the session marks it ready in its
   catalog and its items become visible.

Every one of those requests has a deadline (``init_timeout``); a server that lets one pass,
answers ``initialize`` with an error or with something that is not an object, or fails a list
it declared, fails its initialization: it is closed ``4003`` with the reason and never enters
the catalog. A list the server did not declare is asked anyway for tools (servers often forget
the capability) and an error there means "no tools".

Later, a server's ``notifications/<kind>/list_changed`` makes the session fetch that kind again
(a fetch already running is restarted from its first page when it ends). A re-list that fails
or times out keeps the previous list.

Relay requests use ids from the session's counter, like forwarded caller requests, so they
never collide with those at the server. This module holds the records and the pure helpers;
the session owns the tables and the deadlines.
"""

from __future__ import annotations

import enum
import logging
from typing import TYPE_CHECKING, Any, Final

import attrs

from .. import __version__
from .._frames import MISSING, ErrorResponse, Result, dumps
from .actions import Send
from .catalog import Kind

if TYPE_CHECKING:
    from .actions import Action
    from .session import Session

log = logging.getLogger("trio_mcp_relay.routing")

__all__ = [
    "CLOSE_INIT_FAILED",
    "MAX_PAGES",
    "RELAY_INFO",
    "RELAY_PROTOCOL_VERSION",
    "Fetch",
    "Purpose",
    "RelayRequest",
    "Server",
    "expire",
    "initialize_request",
    "initialized",
    "kinds_to_fetch",
    "list_kind",
    "list_request",
    "page_items",
    "relay_answer",
    "relay_request",
]

#: Close code for a tool server that failed its initialization.
CLOSE_INIT_FAILED: Final = 4003
#: The protocol revision the relay asks servers for (they may answer an older one).
RELAY_PROTOCOL_VERSION: Final = "2025-11-25"
#: ``clientInfo`` towards servers and ``serverInfo`` towards callers of several servers.
RELAY_INFO: Final = {"name": "trio-mcp-relay", "version": __version__}
#: A list of more pages than this is cut there (a server whose cursor never ends).
MAX_PAGES: Final = 1000
#: What the relay can route to callers, so it declares it to servers.
RELAY_CAPABILITIES: Final = {
    "roots": {"listChanged": True},
    "sampling": {},
    "elicitation": {},
}


class Purpose(enum.Enum):
    """What a relay request is for."""

    INITIALIZE = "initialize"
    LIST = "list"
    #: Forwarded for every server (``logging/setLevel``): the answer is not awaited by anyone.
    FIRE = "fire"


@attrs.define(slots=True, eq=False)
class Fetch:
    """One kind being listed from one server, page by page."""

    kind: Kind
    items: list[Any] = attrs.Factory(list)
    pages: int = 0
    #: A list_changed arrived while this fetch ran: start again when it ends.
    again: bool = False
    cursors: set[str] = attrs.Factory(set)


@attrs.define(slots=True, eq=False)
class RelayRequest:
    """A request the relay itself sent to a server."""

    server: Server
    purpose: Purpose
    method: str
    fetch: Fetch | None = None
    deadline: float = 0.0


@attrs.define(slots=True, eq=False)
class Server:
    """A tool connection serving a session: one server of its agent.

    Attributes:
        conn: its connection.
        session: the session it serves (a :class:`~trio_mcp_relay.core.session.Session`).
        server_id: ``server_id`` from its URL (or its token), or None.
        since: its place in the session's connection order (smaller: earlier).
        identity: ``server_id``, else the ``serverInfo.name`` it reported; None until known.
        ready: initialization complete; its items are in the catalog.
        gone: closed or replaced; whatever it still sends is ignored.
        capabilities: the capabilities of its ``initialize`` result.
        fetches: kinds being listed now.
        relay_requests: ids of the relay's requests awaiting its answer.
        remote: it is on another relay node (cluster mode); the limits of the requests it
            sends were checked there.
    """

    conn: int
    session: Session
    server_id: str | None = None
    since: int = 0
    identity: str | None = None
    ready: bool = False
    gone: bool = False
    connected_at: float = 0.0
    capabilities: dict[str, Any] = attrs.Factory(dict)
    fetches: dict[Kind, Fetch] = attrs.Factory(dict)
    relay_requests: dict[int, None] = attrs.Factory(dict)
    #: A server on another relay node, reached through the cluster (cluster mode).
    remote: bool = False

    @property
    def is_default(self) -> bool:
        """Whether it counts as the agent's default server by its URL: ``server_id=default``
        or no ``server_id``."""
        return self.server_id is None or self.server_id == "default"

    def declares(self, capability: str) -> bool:
        """Whether its ``initialize`` result declared this capability."""
        return isinstance(self.capabilities.get(capability), dict)


def initialize_request(request_id: int) -> bytes:
    """The relay's ``initialize`` request to a server."""
    return dumps(
        {
            "jsonrpc": "2.0",
            "id": request_id,
            "method": "initialize",
            "params": {
                "protocolVersion": RELAY_PROTOCOL_VERSION,
                "capabilities": RELAY_CAPABILITIES,
                "clientInfo": RELAY_INFO,
            },
        }
    )


INITIALIZED: Final = dumps({"jsonrpc": "2.0", "method": "notifications/initialized"})


def list_request(request_id: int, kind: Kind, cursor: str | None) -> bytes:
    """A ``tools/list`` (or the list method of ``kind``) request, for one page."""
    frame: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id, "method": kind.list_method}
    if cursor is not None:
        frame["params"] = {"cursor": cursor}
    return dumps(frame)


def kinds_to_fetch(capabilities: dict[str, Any]) -> list[Kind]:
    """What to list from a server with these capabilities: tools always, the others when
    declared."""
    kinds = [Kind.TOOLS]
    if isinstance(capabilities.get("resources"), dict):
        kinds += [Kind.RESOURCES, Kind.RESOURCE_TEMPLATES]
    if isinstance(capabilities.get("prompts"), dict):
        kinds.append(Kind.PROMPTS)
    return kinds


def page_items(kind: Kind, result: Any) -> tuple[list[Any], str | None]:
    """The items and next cursor of one page of a list result; ``([], None)`` for a result
    without them (lenient: such a server lists nothing)."""
    if not isinstance(result, dict):
        return [], None
    items = result.get(kind.value, MISSING)
    cursor = result.get("nextCursor")
    listed = items if isinstance(items, list) else []
    return listed, cursor if isinstance(cursor, str) and cursor else None


# --------------------------------------------------------------------------- the steps
# Functions of the session's state (its tables, deadlines and catalog); the session calls
# them when a server connects, answers a relay request, or lets one expire.


def relay_request(
    session: Session,
    server: Server,
    purpose: Purpose,
    method: str,
    fetch: Fetch | None,
    now: float,
    cursor: str | None = None,
) -> Send:
    rid = session.new_id()
    req = RelayRequest(server, purpose, method, fetch, now + session.policy.init_timeout)
    session.relay_requests[rid] = req
    server.relay_requests[rid] = None
    session.deadlines.push(session.deadlines.relay, (req.deadline, session, rid, req))
    if purpose is Purpose.INITIALIZE:
        data = initialize_request(rid)
    else:
        assert fetch is not None
        data = list_request(rid, fetch.kind, cursor)
    return Send(server.conn, data)


def list_kind(session: Session, server: Server, kind: Kind, now: float) -> list[Action]:
    running = server.fetches.get(kind)
    if running is not None:
        running.again = True
        return []
    fetch = server.fetches[kind] = Fetch(kind)
    return [relay_request(session, server, Purpose.LIST, kind.list_method, fetch, now)]


def relay_answer(
    session: Session, rid: int, req: RelayRequest, frame: Result | ErrorResponse, now: float
) -> list[Action]:
    del session.relay_requests[rid]
    server = req.server
    server.relay_requests.pop(rid, None)
    if req.purpose is Purpose.FIRE:
        return []
    if req.purpose is Purpose.INITIALIZE:
        return initialized(session, server, frame, now)
    fetch = req.fetch
    assert fetch is not None
    kind = fetch.kind
    if isinstance(frame, ErrorResponse):
        del server.fetches[kind]
        error = frame.error
        if server.ready:
            log.warning(
                "agent %s: %s of %s failed: %s",
                session.name,
                req.method,
                server.identity,
                error.message,
            )
            return []
        if kind is not Kind.RESOURCE_TEMPLATES and server.declares(kind.capability):
            return session.fail_server(
                server,
                f"initialization failed: {req.method}: {error.code} {error.message}",
                now,
            )
        fetch.items = []
    else:
        items, cursor = page_items(kind, frame.result)
        fetch.items += items
        fetch.pages += 1
        if cursor is not None and cursor not in fetch.cursors and fetch.pages < MAX_PAGES:
            fetch.cursors.add(cursor)
            return [relay_request(session, server, Purpose.LIST, req.method, fetch, now, cursor)]
        del server.fetches[kind]
    assert server.identity is not None
    change = session.catalog.set_items(server.identity, kind, fetch.items)
    if change.ignored:
        log.info(
            "agent %s: %s listed %d unusable items", session.name, server.identity, change.ignored
        )
    actions: list[Action] = []
    if fetch.again:
        actions += list_kind(session, server, kind, now)
    if server.ready:
        session.note(change, now)
        session.watched(server.identity)
    elif not server.fetches:
        server.ready = True
        log.info(
            "agent %s: server %r ready (%d tools)",
            session.name,
            server.identity,
            len(fetch.items) if kind is Kind.TOOLS else -1,
        )
        session.note(session.catalog.mark_ready(server.identity), now)
        session.watched(server.identity)
        actions += session.unpark(now)
    return actions


def initialized(
    session: Session, server: Server, frame: Result | ErrorResponse, now: float
) -> list[Action]:
    if isinstance(frame, ErrorResponse):
        error = frame.error
        return session.fail_server(
            server, f"initialization failed: {error.code} {error.message}", now
        )
    result = frame.result
    if not isinstance(result, dict):
        return session.fail_server(
            server, "initialization failed: the initialize result is not an object", now
        )
    actions: list[Action] = []
    if server.identity is None:
        info = result.get("serverInfo")
        name = info.get("name") if isinstance(info, dict) else None
        identity = name if isinstance(name, str) and name.strip() else "default"
        actions += session.take_identity(server, identity, now)
    assert server.identity is not None
    capabilities = result.get("capabilities")
    server.capabilities = capabilities if isinstance(capabilities, dict) else {}
    session.catalog.set_info(server.identity, result)
    actions.append(Send(server.conn, INITIALIZED))
    for kind in kinds_to_fetch(server.capabilities):
        actions += list_kind(session, server, kind, now)
    return actions


def expire(session: Session, rid: int, req: RelayRequest, now: float) -> list[Action]:
    """A relay request reached its deadline. One answered in the meantime is a no-op."""
    if session.relay_requests.get(rid) is not req:
        return []
    server = req.server
    del session.relay_requests[rid]
    server.relay_requests.pop(rid, None)
    if req.purpose is Purpose.FIRE:
        return []
    timeout = session.policy.init_timeout
    why = f"no answer to {req.method} within {timeout:g} s"
    if not server.ready:
        return session.fail_server(server, f"initialization failed: {why}", now)
    assert req.fetch is not None
    del server.fetches[req.fetch.kind]
    log.warning(
        "agent %s: server %r: %s; keeping its previous list", session.name, server.identity, why
    )
    return []
