"""The catalog (trio_mcp_relay.core.catalog): pure, so no Trio and no sockets here.

First one unit test per rule, as the module docstring states them; then hypothesis: paging
round trips, derived names, and a state machine of servers joining, leaving, replacing each
other, changing their lists and filters, checked against a model after every step.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from trio_mcp_relay.core.catalog import (
    LATEST_PROTOCOL_VERSION,
    SUPPORTED_PROTOCOL_VERSIONS,
    Catalog,
    Change,
    CursorError,
    Kind,
    Route,
    ToolFilter,
    UnknownServer,
    decode_cursor,
    derived_name,
    encode_cursor,
    merge_capabilities,
    merge_instructions,
    negotiate_version,
    paginate,
    template_matches,
)

SAFE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def tools(*names: str) -> list[dict[str, Any]]:
    return [{"name": n, "inputSchema": {"type": "object"}} for n in names]


def names(catalog: Catalog, kind: Kind = Kind.TOOLS) -> list[str]:
    return [item[kind.key] for item in catalog.items(kind)]


def joined(*servers: tuple[str, list[str]], **kwargs: Any) -> Catalog:
    """A catalog whose servers joined in this order, each ready with these tools."""
    catalog = Catalog(**kwargs)
    for identity, listed in servers:
        catalog.add_server(identity, ready=True)
        catalog.set_items(identity, Kind.TOOLS, tools(*listed))
    return catalog


# ----------------------------------------------------------------------------- collisions


def test_the_first_server_keeps_the_bare_name_the_later_one_is_prefixed() -> None:
    catalog = joined(("alpha", ["search", "add"]), ("beta", ["search", "mul"]))
    assert names(catalog) == ["search", "add", "beta_search", "mul"]
    assert catalog.resolve_tool("search") == Route("alpha", "search")
    assert catalog.resolve_tool("beta_search") == Route("beta", "search")
    assert catalog.resolve_tool("mul") == ("beta", "mul")
    assert catalog.resolve_tool("alpha_search") is None
    # The listed item is the server's own, under its listed name.
    assert catalog.listed_item(Kind.TOOLS, "beta_search") == {
        "name": "beta_search",
        "inputSchema": {"type": "object"},
    }
    assert catalog.listed_name("beta", Kind.TOOLS, "search") == "beta_search"


def test_derived_names_are_safe_short_and_unique() -> None:
    assert derived_name("my server.v2", "web/search") == "my_server_v2_web_search"
    long = derived_name("s" * 50, "t" * 50)
    assert len(long) == 64
    assert long == ("s" * 50 + "_" + "t" * 50)[:64]
    assert derived_name("a", "b", {"a_b"}) == "a_b_2"
    assert derived_name("a", "b", {"a_b", "a_b_2"}) == "a_b_3"
    suffixed = derived_name("s" * 50, "t" * 50, {long})
    assert len(suffixed) == 64
    assert suffixed.endswith("_2")
    # Two identities that become the same text: the second gets the suffix.
    catalog = joined(("x", ["go"]), ("a.b", ["go"]), ("a_b", ["go"]))
    assert names(catalog) == ["go", "a_b_go", "a_b_go_2"]
    assert catalog.resolve_tool("a_b_go_2") == Route("a_b", "go")


def test_when_the_first_owner_leaves_the_longest_connected_remaining_one_takes_the_name() -> None:
    catalog = joined(("a", ["search"]), ("b", ["search"]), ("c", ["search"]))
    assert names(catalog) == ["search", "b_search", "c_search"]
    change = catalog.remove_server("a")
    assert change.kinds == {Kind.TOOLS}
    assert names(catalog) == ["search", "c_search"]
    assert catalog.resolve_tool("search") == Route("b", "search")
    assert catalog.resolve_tool("b_search") is None
    assert catalog.resolve_tool("c_search") == Route("c", "search")


def test_the_bare_name_stays_with_the_server_that_had_it_first() -> None:
    # a connected first but only later gained the tool: b keeps the name it had first.
    catalog = joined(("a", ["other"]), ("b", ["search"]))
    catalog.set_items("a", Kind.TOOLS, tools("other", "search"))
    assert catalog.resolve_tool("search") == Route("b", "search")
    assert catalog.resolve_tool("a_search") == Route("a", "search")
    # b dropping it passes it on; the derived name goes.
    catalog.set_items("b", Kind.TOOLS, [])
    assert names(catalog) == ["other", "search"]
    assert catalog.resolve_tool("search") == Route("a", "search")


def test_a_derived_name_keeps_its_meaning_over_a_real_tool_of_that_name() -> None:
    catalog = joined(("a", ["search"]), ("b", ["search"]), ("x", ["b_search"]))
    assert catalog.resolve_tool("b_search") == Route("b", "search")
    assert catalog.resolve_tool("x_b_search") == Route("x", "b_search")
    # a leaves: b takes "search", which frees "b_search" for x's real tool.
    catalog.remove_server("a")
    assert names(catalog) == ["search", "b_search"]
    assert catalog.resolve_tool("search") == Route("b", "search")
    assert catalog.resolve_tool("b_search") == Route("x", "b_search")


def test_a_name_freed_by_a_promotion_goes_to_the_earliest_server_that_has_it() -> None:
    catalog = joined(("a", ["search"]), ("x", ["other"]), ("b", ["search"]), ("y", ["b_search"]))
    catalog.set_items("x", Kind.TOOLS, tools("b_search"))
    assert names(catalog) == ["search", "x_b_search", "b_search", "y_b_search"]
    # a leaves: b takes "search", which frees "b_search"; x connected before y.
    catalog.remove_server("a")
    assert catalog.resolve_tool("search") == Route("b", "search")
    assert catalog.resolve_tool("b_search") == Route("x", "b_search")
    assert catalog.resolve_tool("y_b_search") == Route("y", "b_search")


def test_prompts_follow_the_same_rule() -> None:
    catalog = Catalog()
    for identity in ("a", "b"):
        catalog.add_server(identity, ready=True)
        catalog.set_items(identity, Kind.PROMPTS, [{"name": "summary", "arguments": []}])
    assert names(catalog, Kind.PROMPTS) == ["summary", "b_summary"]
    assert catalog.resolve_prompt("b_summary") == Route("b", "summary")
    catalog.remove_server("a")
    assert catalog.resolve_prompt("summary") == Route("b", "summary")


def test_a_uri_belongs_to_its_first_server_and_is_hidden_for_the_others() -> None:
    catalog = Catalog()
    for identity in ("a", "b"):
        catalog.add_server(identity, ready=True)
        catalog.set_items(
            identity, Kind.RESOURCES, [{"uri": "file:///notes", "name": f"notes of {identity}"}]
        )
        catalog.set_items(identity, Kind.RESOURCE_TEMPLATES, [{"uriTemplate": "db://{table}"}])
    assert catalog.items(Kind.RESOURCES) == ({"uri": "file:///notes", "name": "notes of a"},)
    assert catalog.resolve_resource("file:///notes") == Route("a", "file:///notes")
    assert catalog.resolve_template("db://{table}") == Route("a", "db://{table}")
    assert catalog.owners(Kind.RESOURCES, "file:///notes") == ("a", "b")
    catalog.remove_server("a")
    assert catalog.items(Kind.RESOURCES) == ({"uri": "file:///notes", "name": "notes of b"},)
    assert catalog.resolve_resource("file:///notes") == Route("b", "file:///notes")
    assert catalog.resolve_template("db://{table}") == Route("b", "db://{table}")


def test_resources_resolve_by_uri_then_by_template() -> None:
    catalog = Catalog()
    catalog.add_server("files", ready=True)
    catalog.set_items("files", Kind.RESOURCE_TEMPLATES, [{"uriTemplate": "file:///{+path}"}])
    catalog.add_server("db", ready=True)
    catalog.set_items("db", Kind.RESOURCES, [{"uri": "file:///special"}])
    catalog.set_items("db", Kind.RESOURCE_TEMPLATES, [{"uriTemplate": "db://{table}/{id}"}])
    assert catalog.resolve_resource("file:///special") == Route("db", "file:///special")
    assert catalog.resolve_resource("file:///etc/hosts") == Route("files", "file:///etc/hosts")
    assert catalog.resolve_resource("db://users/7") == Route("db", "db://users/7")
    assert catalog.resolve_resource("db://users/7/more") is None
    assert catalog.resolve_resource("http://elsewhere") is None


@pytest.mark.parametrize(
    ("template", "uri", "matches"),
    [
        ("db://{table}", "db://users", True),
        ("db://{table}", "db://users/1", False),
        ("file:///{+path}", "file:///a/b/c", True),
        ("weather://{city}{?units}", "weather://Paris?units=metric", True),
        ("weather://{city}{?units}", "weather://Paris", True),
        ("repo://{owner}{/path}", "repo://me/a/b", True),
        ("a.b://{x}", "aXb://y", False),
        ("plain://literal", "plain://literal", True),
        ("plain://literal", "plain://other", False),
    ],
)
def test_template_matching(template: str, uri: str, matches: bool) -> None:
    assert template_matches(template, uri) is matches


# ----------------------------------------------------------------------------- lifecycle


def test_a_pending_server_is_neither_listed_nor_resolved_until_ready() -> None:
    catalog = joined(("a", ["add"]))
    assert catalog.add_server("b") == Change()
    assert catalog.pending == ("b",)
    assert catalog.set_items("b", Kind.TOOLS, tools("mul", "add")) == Change()
    assert names(catalog) == ["add"]
    assert catalog.resolve_tool("mul") is None
    change = catalog.mark_ready("b")
    assert change.kinds == {Kind.TOOLS}
    assert change.notifications == ("notifications/tools/list_changed",)
    assert catalog.pending == ()
    assert names(catalog) == ["add", "mul", "b_add"]
    assert catalog.mark_ready("b") == Change()
    # A server that fails its initialization leaves without a trace.
    catalog.add_server("c")
    catalog.set_items("c", Kind.TOOLS, tools("div"))
    assert catalog.remove_server("c") == Change()
    assert "c" not in catalog
    assert len(catalog) == 2


def test_a_replacement_keeps_its_place_and_its_lists_until_ready() -> None:
    catalog = joined(("a", ["search", "old"]), ("b", ["search"]))
    assert catalog.add_server("a") == Change()  # the same identity: a replacement
    assert catalog.pending == ("a",)
    assert names(catalog) == ["search", "old", "b_search"]
    assert catalog.resolve_tool("search") == Route("a", "search")  # the relay waits for "a"
    catalog.set_items("a", Kind.TOOLS, tools("search", "new"))
    change = catalog.mark_ready("a")
    assert change.kinds == {Kind.TOOLS}
    # It kept its place: still the first, still the bare name.
    assert names(catalog) == ["search", "new", "b_search"]
    assert [s.identity for s in catalog.servers] == ["a", "b"]
    # A replacement that lists the same as before changes nothing callers see.
    catalog.add_server("a")
    catalog.set_items("a", Kind.TOOLS, tools("search", "new"))
    assert catalog.mark_ready("a") == Change()


def test_connection_order_can_be_given() -> None:
    catalog = Catalog()
    catalog.add_server("late", since=10, ready=True)
    catalog.add_server("early", since=3, ready=True)
    catalog.set_items("late", Kind.TOOLS, tools("t"))
    catalog.set_items("early", Kind.TOOLS, tools("t"))
    assert [s.identity for s in catalog.servers] == ["early", "late"]
    # "late" had it first, so it keeps it, but the list follows the connection order.
    assert names(catalog) == ["early_t", "t"]
    catalog.add_server("next", ready=True)
    assert catalog.server("next") is not None
    assert catalog.server("next").since == 11  # type: ignore[union-attr]


def test_changes_name_only_the_visible_lists_that_changed() -> None:
    catalog = Catalog()
    catalog.add_server("a", ready=True)
    assert catalog.set_items("a", Kind.TOOLS, tools("x")).kinds == {Kind.TOOLS}
    assert not catalog.set_items("a", Kind.TOOLS, tools("x"))
    # A new description is a change; a new order of the same items too.
    described = [{"name": "x", "description": "new"}]
    assert catalog.set_items("a", Kind.TOOLS, described).kinds == {Kind.TOOLS}
    assert catalog.set_items("a", Kind.RESOURCES, [{"uri": "u://1"}]).notifications == (
        "notifications/resources/list_changed",
    )
    both = catalog.set_items("a", Kind.RESOURCE_TEMPLATES, [{"uriTemplate": "u://{x}"}]) | (
        catalog.set_items("a", Kind.RESOURCES, [])
    )
    assert both.kinds == {Kind.RESOURCES, Kind.RESOURCE_TEMPLATES}
    assert both.notifications == ("notifications/resources/list_changed",)
    # Another server's hidden duplicate URI changes nothing visible.
    catalog.add_server("b", ready=True)
    assert not catalog.set_items("b", Kind.RESOURCE_TEMPLATES, [{"uriTemplate": "u://{x}"}])
    # When a leaves, b's identical template takes over: the list callers see is the same.
    assert catalog.remove_server("a").kinds == {Kind.TOOLS}
    assert catalog.resolve_template("u://{x}") == Route("b", "u://{x}")


def test_items_without_a_usable_key_are_ignored_and_counted() -> None:
    catalog = Catalog()
    catalog.add_server("a", ready=True)
    listed: list[Any] = [{"name": "ok"}, {"name": ""}, {"name": 3}, {}, "text", {"name": "ok"}]
    change = catalog.set_items("a", Kind.TOOLS, listed)
    assert change.ignored == 5
    assert names(catalog) == ["ok"]


def test_unknown_servers() -> None:
    catalog = Catalog()
    with pytest.raises(UnknownServer):
        catalog.set_items("ghost", Kind.TOOLS, [])
    with pytest.raises(UnknownServer):
        catalog.mark_ready("ghost")
    with pytest.raises(UnknownServer):
        catalog.set_info("ghost", {})
    assert catalog.remove_server("ghost") == Change()
    assert catalog.server("ghost") is None


# ----------------------------------------------------------------------------- filters


def test_tool_filter_patterns() -> None:
    assert ToolFilter().allows("anything")
    only_reads = ToolFilter(allow=["read_*", "list"])
    assert only_reads.allows("read_file")
    assert only_reads.allows("list")
    assert not only_reads.allows("write_file")
    assert not only_reads.allows("READ_file")  # case-sensitive
    no_deletes = ToolFilter(allow="*", deny=("delete*", "rm"))
    assert no_deletes.allow == ("*",)
    assert not no_deletes.allows("delete_all")
    assert not no_deletes.allows("rm")
    assert no_deletes.allows("rmdir")


def test_hidden_tools_are_not_listed_do_not_resolve_and_do_not_collide() -> None:
    catalog = joined(
        ("a", ["search", "shell", "read"]),
        ("b", ["search", "shell"]),
        tool_filter=ToolFilter(deny=["shell"]),
        server_filters={"a": ToolFilter(deny=["search"])},
    )
    # a's search is hidden, so b's is listed under the bare name.
    assert names(catalog) == ["read", "search"]
    assert catalog.resolve_tool("search") == Route("b", "search")
    assert catalog.resolve_tool("shell") is None
    assert catalog.resolve_tool("b_shell") is None
    assert catalog.owners(Kind.TOOLS, "search") == ("b",)
    # Lifting the server filter shows a's search again, but b keeps the name it had.
    change = catalog.set_filters(server_filters={})
    assert change.kinds == {Kind.TOOLS}
    assert names(catalog) == ["a_search", "read", "search"]
    assert catalog.resolve_tool("search") == Route("b", "search")
    assert catalog.resolve_tool("a_search") == Route("a", "search")
    assert not catalog.set_filters(tool_filter=ToolFilter(deny=["shell"]))


def test_filters_are_for_tools_only() -> None:
    catalog = Catalog(tool_filter=ToolFilter(deny=["*"]))
    catalog.add_server("a", ready=True)
    catalog.set_items("a", Kind.PROMPTS, [{"name": "p"}])
    catalog.set_items("a", Kind.TOOLS, tools("t"))
    assert names(catalog, Kind.PROMPTS) == ["p"]
    assert names(catalog) == []


# ----------------------------------------------------------------------------- paging


def test_paging_with_cursors() -> None:
    items = list(range(7))
    first = paginate(items, None, 3)
    assert first.items == (0, 1, 2)
    assert first.next_cursor == encode_cursor(3)
    second = paginate(items, first.next_cursor, 3)
    assert second.items == (3, 4, 5)
    last = paginate(items, second.next_cursor, 3)
    assert last.items == (6,)
    assert last.next_cursor is None
    assert paginate(items).to_result("tools") == {"tools": items}
    assert paginate(items, None, 3).to_result("x")["nextCursor"] == first.next_cursor
    with pytest.raises(ValueError, match="page_size"):
        paginate(items, None, 0)


@pytest.mark.parametrize(
    ("cursor", "message"),
    [
        (5, "Invalid cursor: must be a string"),
        ("nonsense", "Invalid cursor"),
        ("", "Invalid cursor"),
        (encode_cursor(0), "Invalid cursor"),  # the first page has no cursor
        (encode_cursor(7), "Invalid cursor"),  # past the end
        ("bzotMQ", "Invalid cursor"),  # "o:-1"
        ("////", "Invalid cursor"),
    ],
)
def test_bad_cursors_are_refused(cursor: object, message: str) -> None:
    with pytest.raises(CursorError) as caught:
        paginate(list(range(7)), cursor, 3)
    assert str(caught.value) == message
    assert caught.value.code == -32602


def test_the_merged_list_comes_in_one_page() -> None:
    catalog = joined(*((f"s{i}", [f"t{i}_{j}" for j in range(20)]) for i in range(3)))
    result = catalog.list_result(Kind.TOOLS)
    assert len(result["tools"]) == 60
    assert "nextCursor" not in result
    assert catalog.list_result(Kind.PROMPTS) == {"prompts": []}
    paged = catalog.list_result(Kind.TOOLS, page_size=50)
    assert len(paged["tools"]) == 50
    rest = catalog.list_result(Kind.TOOLS, paged["nextCursor"], 50)
    assert [t["name"] for t in paged["tools"] + rest["tools"]] == names(catalog)


@given(st.lists(st.integers(), max_size=30), st.integers(min_value=1, max_value=8))
def test_following_cursors_yields_the_list_once(items: list[int], page_size: int) -> None:
    seen: list[int] = []
    cursor: str | None = None
    pages = 0
    while True:
        page = paginate(items, cursor, page_size)
        assert len(page.items) <= page_size
        seen += page.items
        pages += 1
        cursor = page.next_cursor
        if cursor is None:
            break
        assert decode_cursor(cursor, len(items)) == len(seen)
    assert seen == items
    assert pages == max(1, -(-len(items) // page_size))


@given(st.text(max_size=12))
def test_anything_else_is_not_a_cursor(cursor: str) -> None:
    valid = {encode_cursor(offset) for offset in range(1, 10)}
    if cursor in valid:
        return
    with pytest.raises(CursorError):
        paginate(list(range(10)), cursor, 2)


# ----------------------------------------------------------------------------- initialize


def test_protocol_version_negotiation() -> None:
    assert SUPPORTED_PROTOCOL_VERSIONS == ("2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25")
    for version in SUPPORTED_PROTOCOL_VERSIONS:
        assert negotiate_version(version) == version
    for other in ("2099-01-01", "1999-01-01", None, 5, ""):
        assert negotiate_version(other) == LATEST_PROTOCOL_VERSION == "2025-11-25"


def test_capabilities_are_a_union_with_list_changed() -> None:
    merged = merge_capabilities(
        [
            {"tools": {"listChanged": False}, "logging": {}},
            {"resources": {"subscribe": False}, "experimental": {"x": {"a": 1}}},
            {"resources": {"subscribe": True}, "experimental": {"x": {"b": 2}}},
            "not an object",  # type: ignore[list-item]
        ]
    )
    assert merged == {
        "tools": {"listChanged": True},
        "logging": {},
        "resources": {"subscribe": True, "listChanged": True},
        "experimental": {"x": {"a": 1, "b": 2}},
    }
    assert merge_capabilities([]) == {"tools": {"listChanged": True}}
    assert merge_capabilities([{"prompts": True}], listed=()) == {"prompts": {"listChanged": True}}


def test_instructions_are_joined() -> None:
    assert merge_instructions([None, "", "  "]) is None
    assert merge_instructions(["Use add.", None, "Use mul.\n"]) == "Use add.\n\nUse mul."


def test_initialize_result_from_the_servers() -> None:
    relay = {"name": "trio-mcp-relay", "version": "1"}
    catalog = Catalog()
    assert catalog.initialize_result("2024-11-05", relay) == {
        "protocolVersion": "2024-11-05",
        "capabilities": {"tools": {"listChanged": True}},
        "serverInfo": relay,
    }
    catalog.add_server("calc")
    catalog.set_info(
        "calc",
        {
            "capabilities": {"tools": {}, "logging": {}},
            "serverInfo": {"name": "calc", "version": "2"},
            "instructions": "Use add.",
        },
    )
    # Pending: not yet part of the answer.
    assert catalog.initialize_result(None, relay)["serverInfo"] == relay
    catalog.mark_ready("calc")
    one = catalog.initialize_result("2099-01-01", relay)
    assert one == {
        "protocolVersion": "2025-11-25",
        "capabilities": {"tools": {"listChanged": True}, "logging": {}},
        "serverInfo": {"name": "calc", "version": "2"},
        "instructions": "Use add.",
    }
    catalog.add_server("docs", ready=True)
    catalog.set_info("docs", {"capabilities": 3, "instructions": "Read docs."})
    catalog.set_items("docs", Kind.PROMPTS, [{"name": "p"}])
    two = catalog.initialize_result("2025-06-18", relay)
    assert two["serverInfo"] == relay
    assert two["instructions"] == "Use add.\n\nRead docs."
    assert two["capabilities"]["prompts"] == {"listChanged": True}  # listed, not declared
    view = catalog.server("calc")
    assert view is not None
    assert view.server_info == {"name": "calc", "version": "2"}
    assert not view.pending


# ----------------------------------------------------------------------------- properties


@given(
    st.text(max_size=80),
    st.text(min_size=1, max_size=80),
    st.sets(st.text(max_size=70), max_size=5),
)
def test_derived_names_match_what_providers_accept(
    identity: str, name: str, taken: set[str]
) -> None:
    derived = derived_name(identity, name, taken)
    assert SAFE_NAME.match(derived)
    assert derived not in taken


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["a", "b", "c", "d"]),
            st.lists(st.sampled_from(["x", "y", "z", "b_x"]), max_size=4),
        ),
        max_size=6,
        unique_by=lambda t: t[0],
    )
)
def test_servers_that_join_with_their_lists_give_bare_names_to_the_earliest(
    servers: list[tuple[str, list[str]]],
) -> None:
    catalog = joined(*servers)
    order = [identity for identity, _ in servers]
    for item in catalog.items(Kind.TOOLS):
        route = catalog.resolve_tool(item["name"])
        assert route is not None
        if route.name == item["name"]:
            owners = [i for i, listed in servers if route.name in listed]
            assert route.server == owners[0]
        else:
            # Only when the bare name is taken by an earlier-connected server's item.
            holder = catalog.resolve_tool(route.name)
            assert holder is not None
            assert order.index(holder.server) <= order.index(route.server)


# ----------------------------------------------------------------------------- state machine

IDENTITIES = ("a", "b", "a.b", "a_b", "s" * 70, "x y")
ORIGINALS = {
    Kind.TOOLS: ("search", "add", "b_search", "a_b_search", "t" * 70, "web.fetch", "x_y_add"),
    Kind.PROMPTS: ("summary", "b_summary", "plan"),
    Kind.RESOURCES: ("file:///a", "file:///b", "mem://x"),
    Kind.RESOURCE_TEMPLATES: ("db://{t}", "file:///{+p}"),
}
PATTERNS = ("*", "search", "a*", "*_*", "t*", "web.*")
filters = st.builds(
    ToolFilter,
    allow=st.lists(st.sampled_from(PATTERNS), max_size=2),
    deny=st.lists(st.sampled_from(PATTERNS), max_size=2),
)


class _Model:
    """A server as the test sees it: lists as given, no catalog logic."""

    def __init__(self) -> None:
        self.live: dict[Kind, list[dict[str, Any]]] | None = None
        self.staged: dict[Kind, list[dict[str, Any]]] | None = None


class CatalogMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.catalog = Catalog()
        self.models: dict[str, _Model] = {}
        self.order: list[str] = []  # connection order, as the test keeps it
        self.agent_filter = ToolFilter()
        self.server_filters: dict[str, ToolFilter] = {}
        self.before = self.snapshot()

    # -------------------------------------------------------------- rules

    def apply(self, change: Change) -> None:
        """Every step's change names exactly the kinds whose visible list differs."""
        after = self.snapshot()
        differs = {kind for kind in Kind if after[kind][0] != self.before[kind][0]}
        assert change.kinds == differs
        self.check_stability(after)
        self.before = after

    @rule(identity=st.sampled_from(IDENTITIES), ready=st.booleans())
    def join(self, identity: str, ready: bool) -> None:
        model = self.models.get(identity)
        if model is None:
            model = self.models[identity] = _Model()
            self.order.append(identity)
        if ready:
            model.live = {kind: [] for kind in Kind}
            model.staged = None
        else:
            model.staged = {kind: [] for kind in Kind}
        self.apply(self.catalog.add_server(identity, ready=ready))

    @rule(
        identity=st.sampled_from(IDENTITIES),
        keys=st.lists(st.sampled_from(ORIGINALS[Kind.TOOLS][:3]), min_size=1, max_size=3),
    )
    def join_with_tools(self, identity: str, keys: list[str]) -> None:
        """A server that is ready at once with tools others likely have: collisions."""
        self.join(identity, ready=True)
        items = [{"name": key} for key in keys]
        live = self.models[identity].live
        assert live is not None
        live[Kind.TOOLS] = items
        self.apply(self.catalog.set_items(identity, Kind.TOOLS, items))

    @precondition(lambda self: self.models)
    @rule(data=st.data())
    def leave(self, data: st.DataObject) -> None:
        identity = data.draw(st.sampled_from(sorted(self.models)))
        del self.models[identity]
        self.order.remove(identity)
        self.apply(self.catalog.remove_server(identity))

    @precondition(lambda self: self.models)
    @rule(data=st.data())
    def ready(self, data: st.DataObject) -> None:
        identity = data.draw(st.sampled_from(sorted(self.models)))
        model = self.models[identity]
        if model.staged is not None:
            model.live, model.staged = model.staged, None
        self.apply(self.catalog.mark_ready(identity))

    @precondition(lambda self: self.models)
    @rule(data=st.data(), kind=st.sampled_from(list(Kind)))
    def set_list(self, data: st.DataObject, kind: Kind) -> None:
        identity = data.draw(st.sampled_from(sorted(self.models)))
        keys = data.draw(st.lists(st.sampled_from(ORIGINALS[kind]), max_size=5))
        items = [
            {kind.key: key, "description": data.draw(st.sampled_from(["", "v2"]))} for key in keys
        ]
        model = self.models[identity]
        target = model.staged if model.staged is not None else model.live
        assert target is not None
        target[kind] = items
        change = self.catalog.set_items(identity, kind, items)
        assert change.ignored == len(keys) - len(set(keys))
        self.apply(change)

    @rule(agent=filters, server=st.sampled_from(IDENTITIES), server_filter=filters)
    def set_filters(self, agent: ToolFilter, server: str, server_filter: ToolFilter) -> None:
        self.agent_filter = agent
        self.server_filters = {server: server_filter}
        self.apply(self.catalog.set_filters(tool_filter=agent, server_filters=self.server_filters))

    # -------------------------------------------------------------- the model's view

    def shown(self, identity: str, kind: Kind, key: str) -> bool:
        if kind is not Kind.TOOLS:
            return True
        server_filter = self.server_filters.get(identity, ToolFilter())
        return self.agent_filter.allows(key) and server_filter.allows(key)

    def exposed(self, kind: Kind) -> list[tuple[str, str, dict[str, Any]]]:
        """What the servers show of one kind, in connection order: (identity, key, item)."""
        out = []
        for identity in self.order:
            live = self.models[identity].live
            if live is None:
                continue
            seen: set[str] = set()
            for item in live[kind]:
                key = item[kind.key]
                if key not in seen and self.shown(identity, kind, key):
                    seen.add(key)
                    out.append((identity, key, item))
        return out

    def snapshot(self) -> dict[Kind, tuple[tuple[dict[str, Any], ...], dict[str, Route]]]:
        out = {}
        for kind in Kind:
            items = self.catalog.items(kind)
            routes = {}
            for item in items:
                route = self.catalog.resolve(kind, item[kind.key])
                assert route is not None
                routes[item[kind.key]] = route
            out[kind] = (items, routes)
        return out

    def check_stability(
        self, after: dict[Kind, tuple[tuple[dict[str, Any], ...], dict[str, Route]]]
    ) -> None:
        """A listed name keeps its meaning while its item stays; a name newly held bare
        goes to the earliest-connected server that has the item."""
        for kind in Kind:
            old = {route: name for name, route in self.before[kind][1].items()}
            new = {route: name for name, route in after[kind][1].items()}
            exposers: dict[str, list[str]] = {}
            for identity, key, _ in self.exposed(kind):
                exposers.setdefault(key, []).append(identity)
            for route, name in new.items():
                if route in old and old[route] != name:
                    assert name == route.name, (kind, route, old[route], name)
                if name == route.name and old.get(route) != name:
                    assert route.server == exposers[name][0], (kind, route, exposers[name])
            for name, route in self.before[kind][1].items():
                now = after[kind][1].get(name)
                if now is not None and now != route:
                    # A name changes hands only when its holder no longer shows its item, or
                    # took its bare name instead.
                    still_shown = any(
                        i == route.server and k == route.name for i, k, _ in self.exposed(kind)
                    )
                    assert not still_shown or new.get(route) == route.name, (kind, name, route)

    # -------------------------------------------------------------- invariants

    @invariant()
    def lists_match_the_servers(self) -> None:
        for kind in Kind:
            items = self.catalog.items(kind)
            listed = [item[kind.key] for item in items]
            assert len(listed) == len(set(listed)), listed
            exposed = self.exposed(kind)
            by_pair = {(identity, key): item for identity, key, item in exposed}
            routes = []
            for item in items:
                name = item[kind.key]
                route = self.catalog.resolve(kind, name)
                assert route is not None
                # Resolves to a connected, ready server that shows that original item.
                assert route in by_pair, (kind, name, route)
                assert item == {**by_pair[route], kind.key: name}
                if name != route.name:
                    assert kind.renames
                    assert SAFE_NAME.match(name), name
                routes.append(route)
            # Listed in connection order, then each server's order.
            order = [(identity, key) for identity, key, _ in exposed]
            assert routes == sorted(routes, key=order.index)
            if kind.renames:
                # Every shown item stays callable, once.
                assert sorted(routes) == sorted(by_pair)
            else:
                # Every shown URI is listed once, by the server that owns it.
                assert sorted(listed) == sorted({key for _, key, _ in exposed})

    @invariant()
    def nothing_of_departed_or_new_pending_servers_resolves(self) -> None:
        for kind in Kind:
            for item in self.catalog.items(kind):
                route = self.catalog.resolve(kind, item[kind.key])
                assert route is not None
                assert route.server in self.models
                assert self.models[route.server].live is not None
        for kind in (Kind.TOOLS, Kind.PROMPTS):
            for key in ORIGINALS[kind]:
                for identity in IDENTITIES:
                    if identity not in self.models or self.models[identity].live is None:
                        assert self.catalog.listed_name(identity, kind, key) is None

    @invariant()
    def filters_hold(self) -> None:
        for item in self.catalog.items(Kind.TOOLS):
            route = self.catalog.resolve_tool(item["name"])
            assert route is not None
            assert self.shown(route.server, Kind.TOOLS, route.name)

    @invariant()
    def pending_servers_are_known(self) -> None:
        expected = tuple(i for i in self.order if self.models[i].staged is not None)
        assert self.catalog.pending == expected
        assert [s.identity for s in self.catalog.servers] == self.order


TestCatalogMachine = CatalogMachine.TestCase
