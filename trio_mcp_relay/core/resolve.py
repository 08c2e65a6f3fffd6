"""Where a caller request goes: the relay itself, or which server, with which params.

Pure functions of a session's catalog and servers (see :mod:`trio_mcp_relay.core.session`
for the rules). :func:`target` raises :class:`Park` when the answer depends on a server
still initializing, and :class:`~trio_mcp_relay.core.middleware.Refused` for a request the
relay answers with an error itself (unknown name, bad params).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final, NamedTuple

from .._frames import INVALID_PARAMS, MISSING
from .catalog import Kind, Route
from .middleware import Refused
from .upstream import Server

if TYPE_CHECKING:
    from .session import Session

__all__ = ["LISTS", "Park", "Target", "target"]

#: The list methods, and the kind each lists.
LISTS: Final = {kind.list_method: kind for kind in Kind}
_ROUTED_BY_URI: Final = frozenset(
    {"resources/read", "resources/subscribe", "resources/unsubscribe"}
)


class Park(Exception):
    """The request must wait for a server's initialization to end."""


class Target(NamedTuple):
    """Where a caller request goes: a server (with the params it gets), or the relay (None).

    A named tuple: one is made for every request, on the hot path."""

    server: Server | None
    params: Any = MISSING


def target(session: Session, method: str, params: Any) -> Target:
    """Where a request goes; raises Park to wait, Refused for a bad or unknown name."""
    if method == "tools/call":  # the hot path first
        return by_name(session, Kind.TOOLS, params, "tool")
    if method in LISTS or method in ("initialize", "logging/setLevel"):
        if session.initializing:
            raise Park
        return Target(None)
    if method == "prompts/get":
        return by_name(session, Kind.PROMPTS, params, "prompt")
    if method in _ROUTED_BY_URI:
        uri = params.get("uri") if isinstance(params, dict) else None
        if not isinstance(uri, str):
            raise Refused(INVALID_PARAMS, "Invalid params", f"{method} needs a string uri")
        return Target(
            ready(session, session.catalog.resolve_resource(uri), f"Unknown resource: {uri}"),
            params,
        )
    if method == "completion/complete":
        return completion(session, params)
    return default_target(session, params)


def ready(session: Session, route: Route | None, unknown: str) -> Server:
    if route is None:
        if session.initializing:
            raise Park
        raise Refused(INVALID_PARAMS, unknown)
    server = session.by_identity.get(route.server)
    if server is None:
        raise Refused(INVALID_PARAMS, unknown)
    if not server.ready:
        raise Park  # being replaced: wait for the replacement
    return server


def by_name(session: Session, kind: Kind, params: Any, what: str) -> Target:
    name = params.get("name") if isinstance(params, dict) else None
    if not isinstance(name, str):
        raise Refused(INVALID_PARAMS, "Invalid params", f"a {what} name (string) is required")
    route = session.catalog.resolve(kind, name)
    server = ready(session, route, f"Unknown {what}: {name}")
    assert route is not None
    return Target(server, params if route.name == name else {**params, "name": route.name})


def completion(session: Session, params: Any) -> Target:
    ref = params.get("ref") if isinstance(params, dict) else None
    if not isinstance(ref, dict):
        raise Refused(INVALID_PARAMS, "Invalid params", "completion/complete needs a ref")
    if ref.get("type") == "ref/prompt" and isinstance(ref.get("name"), str):
        name = ref["name"]
        route = session.catalog.resolve_prompt(name)
        server = ready(session, route, f"Unknown prompt: {name}")
        assert route is not None
        if route.name != name:
            params = {**params, "ref": {**ref, "name": route.name}}
        return Target(server, params)
    uri = ref.get("uri")
    if ref.get("type") == "ref/resource" and isinstance(uri, str):
        route = session.catalog.resolve_template(uri) or session.catalog.resolve_resource(uri)
        return Target(ready(session, route, f"Unknown resource: {uri}"), params)
    raise Refused(INVALID_PARAMS, "Invalid params", "unknown completion ref")


def default_target(session: Session, params: Any) -> Target:
    server = session.default_server()
    assert server is not None  # there is a server
    if not server.ready:
        raise Park
    return Target(server, params)
