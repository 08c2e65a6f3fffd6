"""The catalog of an agent's servers: merged lists, collisions, filters, resolution, paging.

Pure: no Trio, no I/O. The relay keeps one :class:`Catalog` per agent and answers callers'
``tools/list``, ``prompts/list``, ``resources/list`` and ``resources/templates/list`` from it,
routes ``tools/call``, ``prompts/get`` and ``resources/read`` with it, and builds the
``initialize`` answer with :meth:`Catalog.initialize_result`. The plugin host
(:class:`trio_mcp_relay.plugins.PluginHost`) merges and pages its plugins' tools with the
same code.

Theory of operation
-------------------

A server has an *identity* (``server_id``, else its ``serverInfo.name``), a place in the
connection order (*since*: smaller means connected earlier) and, per :class:`Kind`, the items
it listed, as JSON dicts. A server is *pending* from :meth:`Catalog.add_server` until
:meth:`Catalog.mark_ready`: what it lists meanwhile is kept aside, neither listed nor
resolved, so a caller never sees a half-initialized server; :attr:`Catalog.pending` tells the
relay whom a caller's request may be waiting for. Adding an identity that is already there
*replaces* that server: the replacement keeps the replaced connection's place in the order
and, until it is ready, the replaced connection's lists (so a reconnecting server neither
loses its names to a server that joined after it nor makes its tools blink out of the list;
a call that resolves to it meanwhile waits for the replacement, which
:attr:`Catalog.pending` shows). Removing a server takes its items away at once.

Every change recomputes the listed names of the kinds it touched and returns a
:class:`Change` naming the kinds whose *visible* list (what a caller would receive) differs,
so the relay sends ``notifications/*/list_changed`` only when there is something new to see.

Names (tools and prompts). Listed names are sticky: a listed name keeps its meaning as long as
the item it names stays. A name that no listed item uses goes to the earliest-connected server
that has an item of that name (its *bare* name). Any other server with the same name is
listed as ``<identity>_<name>`` (:func:`derived_name`: characters outside ``[A-Za-z0-9_-]``
become ``_``, cut to 64 characters, made unique with ``_2``, ``_3``... when needed). So the
bare name stays with the server that had it first; when that server leaves (or drops the
item), the bare name passes to the longest-connected remaining server that has it, whose
derived name is then given up. A derived name that happens to equal another server's real
tool name keeps its meaning; that tool gets a derived name in turn. Bare names are listed as
the servers wrote them; derived names always match ``^[A-Za-z0-9_-]{1,64}$``.

Addresses (resources by ``uri``, resource templates by ``uriTemplate``). A URI is an address
that the server itself hands out in its content and links, so it is never renamed: the first
server that listed a URI owns it (the same sticky rule), and the same URI from other servers
is hidden, neither listed nor resolved, until the owner gives it up; then the
longest-connected remaining server that has it takes it over. :meth:`Catalog.resolve_resource`
tries the listed resources, then the listed templates (:func:`template_matches`).

Filters (:class:`ToolFilter`) hide tools by their original name, per agent and per server. A
hidden tool is treated as if its server did not have it: it is not listed, does not resolve,
and takes no part in collisions (it pushes no other server's tool to a derived name).

Items without a usable key (a non-empty string ``name``, ``uri`` or ``uriTemplate``) and an
item repeating a key its server already listed are ignored; :attr:`Change.ignored` counts them.

Errors: misusing the API (an unknown identity) raises :class:`UnknownServer`; a peer's bad
cursor raises :class:`CursorError`, which carries the JSON-RPC code to answer with.
"""

from __future__ import annotations

import base64
import binascii
import enum
import re
from collections.abc import Iterable, Mapping, Sequence
from fnmatch import fnmatchcase
from typing import Any, Final, NamedTuple, TypeVar

import attrs

from .._frames import INVALID_PARAMS

__all__ = [
    "LATEST_PROTOCOL_VERSION",
    "MAX_NAME_LENGTH",
    "SUPPORTED_PROTOCOL_VERSIONS",
    "Catalog",
    "Change",
    "CursorError",
    "Kind",
    "Page",
    "Route",
    "ServerView",
    "ToolFilter",
    "UnknownServer",
    "decode_cursor",
    "derived_name",
    "encode_cursor",
    "merge_capabilities",
    "merge_instructions",
    "negotiate_version",
    "paginate",
    "template_matches",
]

#: MCP revisions the relay and the plugin host speak, oldest first.
SUPPORTED_PROTOCOL_VERSIONS: Final = ("2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25")
#: Offered to a caller that asks for a revision not in :data:`SUPPORTED_PROTOCOL_VERSIONS`.
LATEST_PROTOCOL_VERSION: Final = SUPPORTED_PROTOCOL_VERSIONS[-1]
#: Model providers accept tool names of ``^[A-Za-z0-9_-]{1,64}$``.
MAX_NAME_LENGTH: Final = 64

_NOT_IN_NAMES: Final = re.compile(r"[^A-Za-z0-9_-]")

T = TypeVar("T")


# --------------------------------------------------------------------------- errors


class UnknownServer(KeyError):
    """Local error: the catalog has no server of this identity (the caller misused the API)."""


class CursorError(ValueError):
    """Remote error: a peer sent a cursor this catalog never gave out.

    Attributes:
        code: the JSON-RPC error code to answer with (``-32602``, invalid params).
    """

    code: Final = INVALID_PARAMS


# --------------------------------------------------------------------------- kinds


class Kind(enum.Enum):
    """What a server lists; the value is the member of the list result holding the items."""

    TOOLS = "tools"
    PROMPTS = "prompts"
    RESOURCES = "resources"
    RESOURCE_TEMPLATES = "resourceTemplates"

    @property
    def key(self) -> str:
        """The member of an item that names it: ``name``, ``uri`` or ``uriTemplate``."""
        return _KEYS[self]

    @property
    def renames(self) -> bool:
        """Whether a collision is solved by a derived name (tools, prompts) or by hiding."""
        return self in (Kind.TOOLS, Kind.PROMPTS)

    @property
    def list_method(self) -> str:
        """The MCP method that lists this kind, e.g. ``tools/list``."""
        return _LIST_METHODS[self]

    @property
    def capability(self) -> str:
        """The server capability that announces this kind (templates come with resources)."""
        return "resources" if self is Kind.RESOURCE_TEMPLATES else self.value

    @property
    def list_changed(self) -> str:
        """The notification telling callers this kind's list changed."""
        return f"notifications/{self.capability}/list_changed"


_KEYS: Final = {
    Kind.TOOLS: "name",
    Kind.PROMPTS: "name",
    Kind.RESOURCES: "uri",
    Kind.RESOURCE_TEMPLATES: "uriTemplate",
}
_LIST_METHODS: Final = {
    Kind.TOOLS: "tools/list",
    Kind.PROMPTS: "prompts/list",
    Kind.RESOURCES: "resources/list",
    Kind.RESOURCE_TEMPLATES: "resources/templates/list",
}


# --------------------------------------------------------------------------- models


def _patterns(value: Iterable[str]) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    return tuple(value)


@attrs.frozen
class ToolFilter:
    """Which tools to show, by ``fnmatch`` patterns on the tool's original name.

    A tool is shown when ``allow`` is empty or one of its patterns matches, and none of
    ``deny`` matches (deny wins). Matching is case-sensitive, as tool names are.

    Attributes:
        allow: patterns of the tools to show; empty: all.
        deny: patterns of the tools to hide.
    """

    allow: tuple[str, ...] = attrs.field(default=(), converter=_patterns)
    deny: tuple[str, ...] = attrs.field(default=(), converter=_patterns)

    def allows(self, name: str) -> bool:
        """Whether a tool of this original name is shown."""
        if self.allow and not any(fnmatchcase(name, p) for p in self.allow):
            return False
        return not any(fnmatchcase(name, p) for p in self.deny)


#: The filter that shows everything.
_SHOW_ALL: Final = ToolFilter()


class Route(NamedTuple):
    """Where a listed name leads: the server's identity and the server's own name (or URI)."""

    server: str
    name: str


@attrs.frozen
class Change:
    """What a change to the catalog changed, as callers see it.

    Attributes:
        kinds: the kinds whose visible list differs from before.
        ignored: items that were left out for having no usable key or a repeated one.
    """

    kinds: frozenset[Kind] = frozenset()
    ignored: int = 0

    @property
    def notifications(self) -> tuple[str, ...]:
        """The ``notifications/*/list_changed`` methods to send, each once, in Kind order."""
        return tuple(dict.fromkeys(k.list_changed for k in Kind if k in self.kinds))

    def __or__(self, other: Change) -> Change:
        """Both changes together (for coalescing several into one notification)."""
        return Change(self.kinds | other.kinds, self.ignored + other.ignored)

    def __bool__(self) -> bool:
        return bool(self.kinds)


@attrs.frozen
class Page:
    """One page of a list: its items, and the cursor of the next page (None: the last)."""

    items: tuple[Any, ...]
    next_cursor: str | None

    def to_result(self, key: str) -> dict[str, Any]:
        """The list result, e.g. ``{"tools": [...], "nextCursor": "..."}``."""
        result: dict[str, Any] = {key: list(self.items)}
        if self.next_cursor is not None:
            result["nextCursor"] = self.next_cursor
        return result


@attrs.frozen
class ServerView:
    """A server as the catalog holds it (for status pages and the session).

    Attributes:
        identity: its identity.
        since: its place in the connection order (smaller: connected earlier).
        pending: initializing (a new server, or the replacement of this identity).
        items: per kind, what the server listed (for a pending replacement: what the
            replaced connection listed, which the catalog still shows).
        capabilities: the capabilities of its ``initialize`` result.
        server_info: the ``serverInfo`` of its ``initialize`` result, if any.
        instructions: the ``instructions`` of its ``initialize`` result, if any.
    """

    identity: str
    since: int
    pending: bool
    items: Mapping[Kind, tuple[dict[str, Any], ...]]
    capabilities: Mapping[str, Any]
    server_info: Mapping[str, Any] | None
    instructions: str | None


@attrs.define
class _Snapshot:
    """What one connection of a server listed and said at initialization."""

    items: dict[Kind, tuple[dict[str, Any], ...]] = attrs.Factory(
        lambda: {kind: () for kind in Kind}
    )
    capabilities: dict[str, Any] = attrs.Factory(dict)
    server_info: dict[str, Any] | None = None
    instructions: str | None = None


@attrs.define
class _Server:
    identity: str
    since: int
    #: What the catalog lists for it; None until a new server is first ready.
    live: _Snapshot | None
    #: What it is building while pending; None once ready.
    staged: _Snapshot | None


# --------------------------------------------------------------------------- names


def derived_name(identity: str, name: str, taken: Iterable[str] | Mapping[str, Any] = ()) -> str:
    """The name a colliding item is listed under: ``<identity>_<name>``, made safe.

    Characters outside ``[A-Za-z0-9_-]`` become ``_``; the result is cut to 64 characters;
    when it is in ``taken``, a suffix ``_2``, ``_3``... makes it unique (the stem is cut
    further so that the suffix fits).
    """
    used = taken if isinstance(taken, Mapping | set | frozenset) else set(taken)
    stem = _NOT_IN_NAMES.sub("_", f"{identity}_{name}")[:MAX_NAME_LENGTH]
    candidate = stem
    number = 1
    while candidate in used:
        number += 1
        suffix = f"_{number}"
        candidate = stem[: MAX_NAME_LENGTH - len(suffix)] + suffix
    return candidate


# --------------------------------------------------------------------------- templates

_EXPRESSION: Final = re.compile(r"\{([+#./;?&]?)[^{}]*\}")
_EXPANSIONS: Final = {
    "": r"[^/?#]*",
    "+": r".*",
    "#": r"(?:#.*)?",
    ".": r"(?:\.[^/?#]*)*",
    "/": r"(?:/[^/?#]*)*",
    ";": r"(?:;[^/?#]*)*",
    "?": r"(?:[?&][^#]*)?",
    "&": r"(?:&[^#]*)?",
}


def _template_pattern(template: str) -> re.Pattern[str]:
    parts: list[str] = []
    position = 0
    for match in _EXPRESSION.finditer(template):
        parts.append(re.escape(template[position : match.start()]))
        parts.append(_EXPANSIONS[match.group(1)])
        position = match.end()
    parts.append(re.escape(template[position:]))
    return re.compile("".join(parts), re.S)


def template_matches(template: str, uri: str) -> bool:
    """Whether ``uri`` could be an expansion of the RFC 6570 URI ``template``.

    An approximation that errs on the side of matching: a simple expression (``{x}``) is
    any text without ``/``, ``?`` or ``#``; ``{+x}`` any text; the other operators their
    prefix character followed by such text, any number of times.
    """
    return _template_pattern(template).fullmatch(uri) is not None


# --------------------------------------------------------------------------- paging


def encode_cursor(offset: int) -> str:
    """The opaque cursor of the page that starts at ``offset``."""
    return base64.urlsafe_b64encode(f"o:{offset}".encode()).decode().rstrip("=")


def decode_cursor(cursor: object, limit: int) -> int:
    """The offset a cursor from :func:`encode_cursor` stands for.

    Raises:
        CursorError: not a string, not one of ours, or not strictly between 0 and ``limit``
            (a cursor is only given out for a page that has items after the first page).
    """
    if not isinstance(cursor, str):
        raise CursorError("Invalid cursor: must be a string")
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        tag, _, digits = text.partition(":")
        offset = int(digits) if tag == "o" and digits.isdigit() else -1
    except (binascii.Error, UnicodeDecodeError, ValueError):
        offset = -1
    if not 0 < offset < limit:
        raise CursorError("Invalid cursor")
    return offset


def paginate(items: Sequence[T], cursor: object = None, page_size: int | None = None) -> Page:
    """The page of ``items`` that ``cursor`` points to (None: the first).

    Args:
        items: the whole list.
        cursor: the ``cursor`` parameter of the list request; None (or absent) for the first
            page.
        page_size: items per page; None: everything from the cursor on, in one page (the
            relay's merged lists, since manager-api ignores ``nextCursor``).

    Raises:
        CursorError: ``cursor`` is not a cursor this list gives out.
        ValueError: ``page_size`` is below 1.
    """
    if page_size is not None and page_size < 1:
        raise ValueError(f"page_size must be at least 1, not {page_size}")
    start = 0 if cursor is None else decode_cursor(cursor, len(items))
    end = len(items) if page_size is None else min(len(items), start + page_size)
    return Page(tuple(items[start:end]), encode_cursor(end) if end < len(items) else None)


# --------------------------------------------------------------------------- initialize


def negotiate_version(requested: object) -> str:
    """The protocol version to answer ``initialize`` with, per the MCP specification.

    The caller's version when it is supported, else the newest supported one.
    """
    if isinstance(requested, str) and requested in SUPPORTED_PROTOCOL_VERSIONS:
        return requested
    return LATEST_PROTOCOL_VERSION


def _union(into: dict[str, Any], other: Mapping[str, Any]) -> None:
    for key, value in other.items():
        mine = into.get(key)
        if key not in into:
            into[key] = _copy(value)
        elif isinstance(mine, dict) and isinstance(value, Mapping):
            _union(mine, value)
        elif isinstance(mine, bool) and isinstance(value, bool):
            into[key] = mine or value
        # Otherwise the earlier server's value stands.


def _copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _copy(v) for k, v in value.items()}
    return value


_LISTED_CAPABILITIES: Final = ("tools", "prompts", "resources")


def merge_capabilities(
    capabilities: Iterable[Mapping[str, Any]],
    *,
    listed: Iterable[str] = ("tools",),
) -> dict[str, Any]:
    """The capabilities the relay declares for several servers: their union, with
    ``listChanged: true`` for every list capability present.

    Nested objects are merged, booleans or-ed (``resources.subscribe`` is declared when any
    server supports it: the relay routes it by URI), other values taken from the earliest
    server. Since the catalog tells callers when a list changes, ``listChanged`` is true for
    each of ``tools``, ``prompts`` and ``resources`` that is present.

    Args:
        capabilities: the servers' capabilities, earliest-connected first (non-objects are
            skipped).
        listed: list capabilities to declare even when no server does: ``tools`` by
            default, so a caller can list tools of servers that join later.
    """
    merged: dict[str, Any] = {}
    for declared in capabilities:
        if isinstance(declared, Mapping):
            _union(merged, declared)
    for name in listed:
        merged.setdefault(name, {})
    for name in _LISTED_CAPABILITIES:
        if name in merged:
            if not isinstance(merged[name], dict):
                merged[name] = {}
            merged[name]["listChanged"] = True
    return merged


def merge_instructions(instructions: Iterable[str | None]) -> str | None:
    """The servers' non-empty instructions joined by blank lines; None when there are none."""
    kept = [text.strip() for text in instructions if isinstance(text, str) and text.strip()]
    return "\n\n".join(kept) if kept else None


# --------------------------------------------------------------------------- the catalog


@attrs.define
class _Listing:
    """The computed view of one kind: what callers see, and where each name leads."""

    items: tuple[dict[str, Any], ...] = ()
    routes: dict[str, Route] = attrs.Factory(dict)
    by_name: dict[str, dict[str, Any]] = attrs.Factory(dict)
    #: (identity, original key) -> listed key; the sticky part.
    assigned: dict[tuple[str, str], str] = attrs.Factory(dict)
    patterns: tuple[tuple[re.Pattern[str], Route], ...] = ()


#: The listing of a kind no server lists: shared by every catalog, never changed (a listing
#: is only filled while :meth:`Catalog._relist` builds it).
_EMPTY_LISTING: Final = _Listing()


class Catalog:
    """The servers of one agent and the merged lists callers see.

    Args:
        tool_filter: the agent's filter, applied to every server's tools.
        server_filters: filters per server identity (servers not named here: none).

    See the module docstring for the rules.
    """

    def __init__(
        self,
        *,
        tool_filter: ToolFilter = _SHOW_ALL,
        server_filters: Mapping[str, ToolFilter] | None = None,
    ) -> None:
        self._servers: dict[str, _Server] = {}
        self._order: list[_Server] = []
        self._next_since = 0
        self._tool_filter = tool_filter
        self._server_filters: dict[str, ToolFilter] = dict(server_filters or {})
        self._listings: dict[Kind, _Listing] = dict.fromkeys(Kind, _EMPTY_LISTING)

    # ------------------------------------------------------------------ servers

    def add_server(self, identity: str, *, since: int | None = None, ready: bool = False) -> Change:
        """A server joins, or replaces the connected server of the same identity.

        A new server takes its place in the connection order: ``since`` when given, else
        after every server so far. A replacement keeps the place of the server it replaces
        (``since`` is then ignored), and the catalog keeps listing the replaced connection's
        items until the replacement is ready.

        Args:
            identity: the server's identity.
            since: its place in the connection order (smaller: earlier).
            ready: ready at once (no initialization to wait for: items set from now on are
                listed as they come), rather than pending until :meth:`mark_ready`.
        """
        server = self._servers.get(identity)
        if server is not None:
            if ready:
                server.live = _Snapshot()
                server.staged = None
                return self._recompute(Kind)
            server.staged = _Snapshot()
            return Change()
        if since is None:
            since = self._next_since
        self._next_since = max(self._next_since, since + 1)
        server = _Server(
            identity, since, _Snapshot() if ready else None, None if ready else _Snapshot()
        )
        self._servers[identity] = server
        self._order.append(server)
        self._order.sort(key=lambda s: s.since)  # stable: equal places keep joining order
        return Change()

    def remove_server(self, identity: str) -> Change:
        """A server leaves (or failed its initialization): its items leave the lists.

        Removing an identity that is not there changes nothing.
        """
        server = self._servers.pop(identity, None)
        if server is None:
            return Change()
        self._order.remove(server)
        return self._recompute(Kind) if server.live is not None else Change()

    def mark_ready(self, identity: str) -> Change:
        """A pending server finished initializing: what it listed meanwhile is listed now.

        Kinds it did not list are empty for it (a replacement's lists replace the replaced
        connection's entirely). Marking a ready server ready changes nothing.

        Raises:
            UnknownServer: no server of that identity.
        """
        server = self._server(identity)
        if server.staged is None:
            return Change()
        server.live, server.staged = server.staged, None
        return self._recompute(Kind)

    def set_items(self, identity: str, kind: Kind, items: Iterable[Mapping[str, Any]]) -> Change:
        """A server's whole list of one kind (its answer to ``tools/list`` and the like,
        all pages joined), in the server's order.

        For a pending server the list is kept for :meth:`mark_ready`; for a ready one it is
        listed at once.

        Raises:
            UnknownServer: no server of that identity.
        """
        server = self._server(identity)
        kept: list[dict[str, Any]] = []
        keys: set[str] = set()
        ignored = 0
        for item in items:
            key = item.get(kind.key) if isinstance(item, Mapping) else None
            if not isinstance(key, str) or not key or key in keys:
                ignored += 1
                continue
            keys.add(key)
            kept.append(dict(item))
        target = server.staged if server.staged is not None else server.live
        assert target is not None  # a server is always either pending or live
        target.items[kind] = tuple(kept)
        if target is server.staged:
            return Change(ignored=ignored)
        return attrs.evolve(self._recompute((kind,)), ignored=ignored)

    def set_info(self, identity: str, initialize_result: Mapping[str, Any]) -> Change:
        """A server's ``initialize`` result: capabilities, serverInfo, instructions.

        Values of the wrong JSON type are ignored. Kept for :meth:`mark_ready` when pending.
        Lists do not change, so neither does the returned :class:`Change`.

        Raises:
            UnknownServer: no server of that identity.
        """
        server = self._server(identity)
        target = server.staged if server.staged is not None else server.live
        assert target is not None
        capabilities = initialize_result.get("capabilities")
        info = initialize_result.get("serverInfo")
        instructions = initialize_result.get("instructions")
        target.capabilities = _copy(capabilities) if isinstance(capabilities, Mapping) else {}
        target.server_info = _copy(info) if isinstance(info, Mapping) else None
        target.instructions = instructions if isinstance(instructions, str) else None
        return Change()

    def set_filters(
        self,
        *,
        tool_filter: ToolFilter | None = None,
        server_filters: Mapping[str, ToolFilter] | None = None,
    ) -> Change:
        """Change the agent's filter and/or the per-server filters (None: keep as is)."""
        if tool_filter is not None:
            self._tool_filter = tool_filter
        if server_filters is not None:
            self._server_filters = dict(server_filters)
        return self._recompute((Kind.TOOLS,))

    # ------------------------------------------------------------------ reading

    def __contains__(self, identity: object) -> bool:
        return identity in self._servers

    def __len__(self) -> int:
        return len(self._servers)

    @property
    def pending(self) -> tuple[str, ...]:
        """Identities of the servers still initializing, earliest-connected first.

        A request for a name the catalog does not resolve may belong to one of them: the
        relay waits for them (bounded by their initialization timeout) before answering
        "unknown", and a name that resolves to a pending server waits for it too.
        """
        return tuple(s.identity for s in self._order if s.staged is not None)

    @property
    def servers(self) -> tuple[ServerView, ...]:
        """Every server, earliest-connected first."""
        return tuple(self._view(server) for server in self._order)

    def server(self, identity: str) -> ServerView | None:
        """The server of that identity, or None."""
        server = self._servers.get(identity)
        return None if server is None else self._view(server)

    def items(self, kind: Kind) -> tuple[dict[str, Any], ...]:
        """The merged list of one kind as callers see it, in connection order, then in each
        server's order. Do not modify the dicts."""
        return self._listings[kind].items

    def list_result(
        self, kind: Kind, cursor: object = None, page_size: int | None = None
    ) -> dict[str, Any]:
        """The answer to ``tools/list`` (or the list method of ``kind``), one page of it.

        Raises:
            CursorError: a cursor this list never gave out.
        """
        return paginate(self.items(kind), cursor, page_size).to_result(kind.value)

    def listed_item(self, kind: Kind, listed: str) -> dict[str, Any] | None:
        """The listed item (with its listed name) under a listed name or URI, or None."""
        return self._listings[kind].by_name.get(listed)

    def resolve(self, kind: Kind, listed: str) -> Route | None:
        """Where a listed name (or URI, or URI template) leads; None when nothing is listed
        under it (unknown, hidden by a filter, or a pending server's)."""
        return self._listings[kind].routes.get(listed)

    def resolve_tool(self, listed: str) -> Route | None:
        """The server and its own tool name for a listed tool name, or None."""
        return self._listings[Kind.TOOLS].routes.get(listed)

    def resolve_prompt(self, listed: str) -> Route | None:
        """The server and its own prompt name for a listed prompt name, or None."""
        return self._listings[Kind.PROMPTS].routes.get(listed)

    def resolve_resource(self, uri: str) -> Route | None:
        """The server that serves ``uri``: the owner of a listed resource of that URI, else
        of the first listed template that matches it; None when none does."""
        route = self._listings[Kind.RESOURCES].routes.get(uri)
        if route is not None:
            return Route(route.server, uri)
        for pattern, owner in self._listings[Kind.RESOURCE_TEMPLATES].patterns:
            if pattern.fullmatch(uri):
                return Route(owner.server, uri)
        return None

    def resolve_template(self, uri_template: str) -> Route | None:
        """The server that listed this ``uriTemplate`` (e.g. for ``completion/complete``)."""
        return self._listings[Kind.RESOURCE_TEMPLATES].routes.get(uri_template)

    def owners(self, kind: Kind, original: str) -> tuple[str, ...]:
        """Identities of the ready servers that have a shown item of this original name (or
        URI), earliest-connected first, whatever it is listed as (or hidden behind)."""
        found: list[str] = []
        for server in self._order:
            if server.live is None:
                continue
            for item in server.live.items[kind]:
                if item[kind.key] == original and self._shows(server.identity, kind, original):
                    found.append(server.identity)
                    break
        return tuple(found)

    def listed_name(self, identity: str, kind: Kind, original: str) -> str | None:
        """What a server's item is listed as; None when it is not listed."""
        return self._listings[kind].assigned.get((identity, original))

    def initialize_result(
        self, requested_version: object, relay_info: Mapping[str, Any]
    ) -> dict[str, Any]:
        """The relay's answer to a caller's ``initialize``, from the ready servers.

        ``protocolVersion`` per :func:`negotiate_version`; ``capabilities`` per
        :func:`merge_capabilities` (plus each kind that has listed items); ``serverInfo`` of
        the only server when there is exactly one (and it gave a valid one, with ``name`` and
        ``version``), else ``relay_info``;
        ``instructions`` per :func:`merge_instructions`, left out when there are none.
        """
        ready = [s.live for s in self._order if s.live is not None]
        present = ["tools"] + [kind.capability for kind in Kind if self._listings[kind].items]
        result: dict[str, Any] = {
            "protocolVersion": negotiate_version(requested_version),
            "capabilities": merge_capabilities(
                (snapshot.capabilities for snapshot in ready), listed=present
            ),
            "serverInfo": dict(relay_info),
        }
        info = ready[0].server_info if len(ready) == 1 else None
        if info is not None and all(isinstance(info.get(k), str) for k in ("name", "version")):
            result["serverInfo"] = _copy(info)  # only a valid Implementation (both required)
        instructions = merge_instructions(snapshot.instructions for snapshot in ready)
        if instructions is not None:
            result["instructions"] = instructions
        return result

    # ------------------------------------------------------------------ internals

    def _server(self, identity: str) -> _Server:
        try:
            return self._servers[identity]
        except KeyError:
            raise UnknownServer(identity) from None

    def _view(self, server: _Server) -> ServerView:
        shown = server.live if server.live is not None else _Snapshot()
        return ServerView(
            identity=server.identity,
            since=server.since,
            pending=server.staged is not None,
            items=dict(shown.items),
            capabilities=shown.capabilities,
            server_info=shown.server_info,
            instructions=shown.instructions,
        )

    def _shows(self, identity: str, kind: Kind, original: str) -> bool:
        if kind is not Kind.TOOLS:
            return True
        server_filter = self._server_filters.get(identity, _SHOW_ALL)
        return self._tool_filter.allows(original) and server_filter.allows(original)

    def _recompute(self, kinds: Iterable[Kind]) -> Change:
        changed = frozenset(kind for kind in kinds if self._relist(kind))
        return Change(changed)

    def _relist(self, kind: Kind) -> bool:
        """Recompute one kind's listing; whether the visible list changed."""
        key = kind.key
        exposed: list[tuple[tuple[str, str], dict[str, Any]]] = []
        for server in self._order:
            if server.live is None:
                continue
            for item in server.live.items[kind]:
                original: str = item[key]
                if self._shows(server.identity, kind, original):
                    exposed.append(((server.identity, original), item))
        old = self._listings[kind]
        present = {pair for pair, _ in exposed}
        assigned = {pair: name for pair, name in old.assigned.items() if pair in present}
        taken = {name: pair for pair, name in assigned.items()}
        # A free original name goes to its earliest exposer. That may free the derived name
        # it had, which may be another item's original name: hence the work list. The
        # earliest exposer of a name is fixed, so the order of the work does not matter.
        first: dict[str, tuple[str, str]] = {}
        for pair, _ in exposed:
            first.setdefault(pair[1], pair)
        work = [name for name in first if name not in taken]
        while work:
            name = work.pop()
            if name in taken:
                continue
            pair = first[name]
            previous = assigned.get(pair)
            if previous is not None:
                del taken[previous]
                if previous in first:
                    work.append(previous)
            assigned[pair] = name
            taken[name] = pair
        if kind.renames:
            for pair, _ in exposed:
                if pair not in assigned:
                    derived = derived_name(pair[0], pair[1], taken)
                    assigned[pair] = derived
                    taken[derived] = pair
        listing = _Listing(assigned=assigned)
        shown: list[dict[str, Any]] = []
        for pair, item in exposed:
            listed = assigned.get(pair)
            if listed is None:
                continue  # a URI another server owns
            entry = item if listed == pair[1] else {**item, key: listed}
            shown.append(entry)
            route = Route(*pair)
            listing.routes[listed] = route
            listing.by_name[listed] = entry
        listing.items = tuple(shown)
        if kind is Kind.RESOURCE_TEMPLATES:
            listing.patterns = tuple(
                (_template_pattern(name), route) for name, route in listing.routes.items()
            )
        if not assigned:
            listing = _EMPTY_LISTING  # shared: most agents' servers list few kinds
        self._listings[kind] = listing
        return listing.items != old.items
