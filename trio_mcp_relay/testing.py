"""Property-based testing of MCP endpoint relays: hypothesis strategies and a live checker.

For anyone testing an MCP peer or a relay (this one, the reference mcp-endpoint-server, or
another). Needs ``hypothesis`` (installed with trio-mcp-relay).

Frame strategies (all return hypothesis ``SearchStrategy`` objects):

* :func:`json_values`, :func:`ids`: JSON values and JSON-RPC ids, biased towards the values
  real clients trip on (``0``, ``""``, ``1`` vs ``1.0`` vs ``"1"``, integers beyond 64 bits,
  unicode).
* :func:`requests`, :func:`notifications`, :func:`responses`: well-formed JSON-RPC 2.0 frames
  as dicts.
* :func:`tool_notifications`, :func:`server_requests`: what a tool (an MCP server) sends to
  the caller side on its own: notifications for every caller, and requests (``ping``,
  ``roots/list``, ``sampling/createMessage``, ``elicitation/create``).
* :func:`hostile_frames`: WebSocket messages a relay must answer with ``-32700``/``-32600``
  (``str`` for text frames, ``bytes`` for binary ones), never crash on.

Script strategies: :func:`caller_steps` and :func:`tool_steps` (see :class:`Step` for every
kind: colliding ids, progress, cancellation, leaving; late, duplicate and stray answers,
notifications, tool-to-caller requests, garbage), combined by :func:`sessions` into
:class:`Session` scripts.

The live checker, :func:`run_session` (or :func:`check_session`, which returns only the
violations), connects one tool and several callers to a relay (any ``ws://`` endpoint speaking
the mcp-endpoint-server protocol), plays a script and checks the invariants of
:data:`FAMILIES`. It synchronises only on answers to requests, never on a behaviour it tests.
``trio-mcp-relay fuzz`` drives it with hypothesis and prints the minimal failing scripts.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

import attrs
import trio
from hypothesis import strategies as st
from trio_websocket import ConnectionClosed, ConnectionRejected, HandshakeError

from ._endpoint import describe_connect_failure
from .client import connect_websocket

__all__ = [
    "FAMILIES",
    "CannotConnect",
    "Session",
    "SessionResult",
    "Step",
    "Violation",
    "caller_steps",
    "check_session",
    "hostile_frames",
    "ids",
    "json_values",
    "notifications",
    "requests",
    "responses",
    "run_session",
    "same_json",
    "server_requests",
    "sessions",
    "step_family",
    "tool_notifications",
    "tool_steps",
]

_RESERVED = frozenset({"jsonrpc", "id", "method", "params", "result", "error"})


def json_values(max_leaves: int = 12) -> st.SearchStrategy[Any]:
    """Any JSON value: null, booleans, integers of any size, finite floats, text, nesting."""
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=16),
    )
    return st.recursive(
        scalars,
        lambda children: st.one_of(
            st.lists(children, max_size=4),
            st.dictionaries(st.text(max_size=8), children, max_size=4),
        ),
        max_leaves=max_leaves,
    )


def ids() -> st.SearchStrategy[str | int | float]:
    """JSON-RPC request ids: strings and numbers, with the values that break naive relays."""
    return st.one_of(
        st.sampled_from([0, "", 1, 1.0, "1", -1, 0.5, 2**63, 2**64, -(2**63) - 1, 2**70, "ид-🙂"]),
        st.integers(),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=12),
    )


def _extra() -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(
        st.text(max_size=8).filter(lambda k: k not in _RESERVED), json_values(4), max_size=2
    )


def requests(
    id_strategy: st.SearchStrategy[Any] | None = None,
    methods: st.SearchStrategy[str] | None = None,
) -> st.SearchStrategy[dict[str, Any]]:
    """Well-formed JSON-RPC requests (dicts), params absent, null, or structured."""
    return st.builds(
        lambda rid, method, params, extra: {
            **extra,
            "jsonrpc": "2.0",
            "id": rid,
            "method": method,
            **({} if params is _ABSENT else {"params": params}),
        },
        id_strategy if id_strategy is not None else ids(),
        methods if methods is not None else st.sampled_from(["tools/call", "tools/list", "ping"]),
        st.one_of(
            st.just(_ABSENT), st.none(), st.dictionaries(st.text(max_size=8), json_values(6))
        ),
        _extra(),
    )


_ABSENT = object()


def notifications() -> st.SearchStrategy[dict[str, Any]]:
    """Well-formed JSON-RPC notifications (no id)."""
    return st.builds(
        lambda method, params: {"jsonrpc": "2.0", "method": method, "params": params},
        st.sampled_from(
            ["notifications/message", "notifications/tools/list_changed", "notifications/x"]
        ),
        st.dictionaries(st.text(max_size=8).filter(lambda k: k != "progressToken"), json_values(6)),
    )


def responses(
    id_strategy: st.SearchStrategy[Any] | None = None,
) -> st.SearchStrategy[dict[str, Any]]:
    """Well-formed JSON-RPC responses: results and errors."""
    rid = id_strategy if id_strategy is not None else ids()
    result = st.builds(lambda i, r: {"jsonrpc": "2.0", "id": i, "result": r}, rid, json_values(6))
    error = st.builds(
        lambda i, code, message: {
            "jsonrpc": "2.0",
            "id": i,
            "error": {"code": code, "message": message},
        },
        rid,
        st.integers(min_value=-32768, max_value=32767),
        st.text(max_size=20),
    )
    return st.one_of(result, error)


def hostile_frames() -> st.SearchStrategy[str | bytes]:
    """Messages that are not one valid JSON-RPC object: a relay must answer, never crash.

    Text (``str``) and binary (``bytes``) messages: text that is not JSON, invalid UTF-8,
    batches, bare scalars, wrong ``jsonrpc``, ids of the wrong type, both ``result`` and
    ``error``, deep nesting, NaN.
    """
    not_json = st.sampled_from(
        ["", "{", "}", "nope", "{'single': 'quotes'}", '{"a":1,}', "NaN", '{"id": NaN}', "[1,"]
    )
    structural = st.sampled_from(
        [
            "[]",
            '[{"jsonrpc":"2.0","id":1,"method":"ping"}]',
            "null",
            "42",
            '"text"',
            "{}",
            '{"jsonrpc":"1.0","id":1,"method":"ping"}',
            '{"id":1,"method":"ping"}',
            '{"jsonrpc":"2.0","id":true,"method":"ping"}',
            '{"jsonrpc":"2.0","id":null,"method":"ping"}',
            '{"jsonrpc":"2.0","id":[1],"method":"ping"}',
            '{"jsonrpc":"2.0","id":{},"method":"ping"}',
            '{"jsonrpc":"2.0","id":1,"method":7}',
            '{"jsonrpc":"2.0","id":1,"result":1,"error":{"code":1,"message":"x"}}',
            '{"jsonrpc":"2.0","id":1,"error":{"code":"x","message":"x"}}',
            '{"jsonrpc":"2.0","id":1}',
        ]
    )
    nested = st.integers(min_value=300, max_value=5000).map(lambda n: "[" * n + "]" * n)
    bad_utf8 = st.sampled_from([b"\xff\xfe", b'{"jsonrpc":"2.0","method":"\xc3\x28"}', b"\x80"])
    return st.one_of(not_json, structural, nested, bad_utf8)


def tool_notifications() -> st.SearchStrategy[dict[str, Any]]:
    """Notifications a tool (an MCP server) sends to the caller side, as dicts.

    ``notifications/message`` (logging), which a relay must deliver to every caller of the
    agent, the ``list_changed`` family (an aggregating relay lists the tool again instead and
    tells only callers that initialized) and ``resources/updated`` (for subscribers only).
    (Progress is per request: see the ``progress`` step of :func:`caller_steps`.)
    """
    message = st.builds(
        lambda level, data: {"level": level, "data": data},
        st.sampled_from(["debug", "info", "warning", "error"]),
        json_values(4),
    )
    empty: st.SearchStrategy[dict[str, Any]] = st.just({})
    uri = st.builds(lambda u: {"uri": u}, st.text(max_size=12).map(lambda s: f"file:///{s}"))
    method_params = st.one_of(
        st.tuples(st.just("notifications/message"), message),
        st.tuples(st.just("notifications/tools/list_changed"), empty),
        st.tuples(st.just("notifications/resources/list_changed"), empty),
        st.tuples(st.just("notifications/prompts/list_changed"), empty),
        st.tuples(st.just("notifications/resources/updated"), uri),
    )
    return method_params.map(lambda mp: {"jsonrpc": "2.0", "method": mp[0], "params": mp[1]})


def server_requests(
    id_strategy: st.SearchStrategy[Any] | None = None,
) -> st.SearchStrategy[dict[str, Any]]:
    """Requests a tool (an MCP server) sends to the caller side, as dicts.

    ``ping``, ``roots/list``, ``sampling/createMessage`` and ``elicitation/create``, with ids
    from ``id_strategy`` (default :func:`ids`). A relay must route each to a caller and bring
    the caller's answer back with exactly the tool's id, or answer the tool itself.
    """
    sampling = {
        "messages": [{"role": "user", "content": {"type": "text", "text": "fuzz"}}],
        "maxTokens": 8,
    }
    elicitation = {"message": "fuzz?", "requestedSchema": {"type": "object", "properties": {}}}
    method_params = st.sampled_from(
        [
            ("ping", None),
            ("roots/list", {}),
            ("sampling/createMessage", sampling),
            ("elicitation/create", elicitation),
        ]
    )

    def build(mp: tuple[str, Any], rid: Any) -> dict[str, Any]:
        frame: dict[str, Any] = {"jsonrpc": "2.0", "id": rid, "method": mp[0]}
        if mp[1] is not None:
            frame["params"] = mp[1]
        return frame

    return st.builds(build, method_params, id_strategy if id_strategy is not None else ids())


# ----------------------------------------------------------------------------- invariants

#: The invariant families :func:`check_session` checks, by name, in the order findings are
#: reported. ``trio-mcp-relay fuzz --only/--skip`` take these names.
FAMILIES: Mapping[str, str] = {
    "liveness": "the endpoint stays up: it closes no connection and keeps forwarding",
    "answers": "every well-formed request is answered exactly once",
    "ids": "answers carry exactly their request's id, and ids the tool sees never collide",
    "isolation": "nothing reaches a peer it was not meant for",
    "invalid-frames": "an invalid frame from a caller is answered -32700/-32600, not forwarded",
    "notifications": "a tool's notification reaches every caller of the agent",
    "tool-requests": "a tool's request to the caller side is answered once, with its own id",
    "progress": "a tool's progress notification reaches the caller that asked, with its token",
    "cancellation": "a caller's cancellation reaches the tool with the id the tool saw",
    "late-answers": "a late, duplicate or stray answer from the tool reaches no caller",
}

# Step kinds that only serve one family: not generated when that family is not checked.
_KIND_FAMILY: Final = {
    ("caller", "progress"): "progress",
    ("caller", "cancel"): "cancellation",
    ("caller", "hostile"): "invalid-frames",
    ("tool", "notify"): "notifications",
    ("tool", "ask"): "tool-requests",
    ("caller", "leave"): "late-answers",
    ("tool", "duplicate"): "late-answers",
    ("tool", "stray"): "late-answers",
}


def step_family(step: Step) -> str | None:
    """The one family a step serves, if its kind serves only one (None: it serves them all)."""
    return _KIND_FAMILY.get(("tool" if step.who == "tool" else "caller", step.kind))


def _families(families: Iterable[str] | None) -> frozenset[str]:
    if families is None:
        return frozenset(FAMILIES)
    chosen = frozenset(families)
    unknown = chosen - FAMILIES.keys()
    if unknown:
        raise ValueError(f"unknown invariant families: {', '.join(sorted(unknown))}")
    return chosen


@attrs.frozen
class Violation:
    """One broken invariant: its family (a key of :data:`FAMILIES`) and what happened."""

    family: str
    text: str

    def __str__(self) -> str:
        return self.text


@attrs.frozen
class SessionResult:
    """What :func:`run_session` saw: the violations, and every frame exchanged, in order."""

    violations: tuple[Violation, ...]
    transcript: tuple[str, ...]


class CannotConnect(Exception):
    """The endpoint could not be tested at all (nothing listening, refused handshake, wrong
    key...): not a violation. The message is one line that says what to fix.

    ``refused`` is true when the endpoint turned us away on purpose (HTTP 401, 403 or 429,
    or a 1008 close for the token): that is never a defect of what was being tested.
    """

    def __init__(self, message: str, *, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused


# ----------------------------------------------------------------------------- scripts


@attrs.frozen
class Step:
    """One thing a peer does.

    ``who`` is ``"tool"`` or a caller index. Caller kinds: ``"request"`` (a ``tools/call``
    with id ``value``), ``"progress"`` (the same with ``value = (id, progressToken)``; the
    tool answers it with one ``notifications/progress``), ``"cancel"`` (``notifications/
    cancelled`` for the caller's newest unanswered request if ``value`` is true, else its
    oldest), ``"hostile"`` (``value`` is an invalid message), ``"leave"`` (the caller
    disconnects; its later steps are skipped). Tool kinds: ``"answer"`` (the tool answers its
    newest unanswered request if ``value`` is true, else its oldest; answers to cancelled
    requests and to callers that left are *late*), ``"duplicate"`` (it sends an answer it
    already sent again), ``"stray"`` (an answer with id ``value`` that it was never asked),
    ``"notify"`` (``value`` is a notification for every caller), ``"ask"`` (``value`` is a
    request to the caller side), ``"hostile"``.

    The relay aggregating several tool servers per agent will add server kinds (a named
    server joining and leaving mid-script) alongside these, with ``who`` naming the server.
    """

    who: str | int
    kind: str
    value: Any = None


@attrs.frozen
class Session:
    """A script for :func:`check_session`: how many callers connect, and the steps."""

    callers: int
    steps: tuple[Step, ...]


def caller_steps(callers: int, families: Iterable[str] | None = None) -> st.SearchStrategy[Step]:
    """Steps of callers ``0 .. callers-1``: requests with colliding ids, requests with a
    progress token, cancellations, invalid frames, leaving. Kinds that serve only families
    not in ``families`` (default: all) are left out."""
    chosen = _families(families)
    who = st.integers(min_value=0, max_value=callers - 1)
    colliding = st.sampled_from([0, "", 1, 1.0, "1", 2**70, -(2**63) - 1, "☃"])
    rid = st.one_of(colliding, ids())
    options = {
        "request": rid,
        "leave": st.none(),
        "progress": st.tuples(rid, st.one_of(colliding, ids())),
        "cancel": st.booleans(),
        "hostile": hostile_frames(),
    }
    return _steps(who, "caller", options, chosen)


def tool_steps(families: Iterable[str] | None = None) -> st.SearchStrategy[Step]:
    """Steps of the tool: answers in any order (late ones included), duplicate and stray
    answers, notifications, requests to the caller side, garbage. Kinds that serve only
    families not in ``families`` (default: all) are left out."""
    chosen = _families(families)
    tool = st.just("tool")
    options = {
        "answer": st.booleans(),
        "hostile": hostile_frames(),
        "notify": tool_notifications(),
        "ask": server_requests(),
        "duplicate": st.booleans(),
        "stray": ids(),
    }
    return _steps(tool, "tool", options, chosen)


def _steps(
    who: st.SearchStrategy[Any],
    side: str,
    values: Mapping[str, st.SearchStrategy[Any]],
    chosen: frozenset[str],
) -> st.SearchStrategy[Step]:
    kinds = [k for k in values if _KIND_FAMILY.get((side, k)) in (None, *chosen)]
    return st.one_of([st.builds(Step, who, st.just(k), values[k]) for k in kinds])


def sessions(
    max_callers: int = 4, max_steps: int = 30, families: Iterable[str] | None = None
) -> st.SearchStrategy[Session]:
    """Scripts of interleaved caller and tool steps (see :class:`Step`) for up to
    ``max_callers`` callers, with only the step kinds that ``families`` (default: all of
    :data:`FAMILIES`) need."""

    @st.composite
    def build(draw: Callable[..., Any]) -> Session:
        n = draw(st.integers(min_value=1, max_value=max_callers))
        step = st.one_of(caller_steps(n, families), tool_steps(families))
        return Session(n, tuple(draw(st.lists(step, max_size=max_steps))))

    return build()


def same_json(a: Any, b: Any) -> bool:
    """Equality of JSON values that also requires the same JSON types (``1`` is not ``1.0``)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(same_json(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_json(a[k], b[k]) for k in a)
    if isinstance(a, float) and math.isnan(a):
        return False
    return bool(a == b)


# ----------------------------------------------------------------------------- the checker

_NONE: Final = object()
_SYNC = "fuzz-sync"
_BARRIER = "fuzz-barrier"
_INVALID_CODES = (-32700, -32600)


@attrs.define(eq=False)
class _Request:
    caller: int
    seq: int
    id: Any
    token: Any = _NONE
    tool_id: Any = _NONE
    tool_token: Any = _NONE
    tool_answered: bool = False
    duplicated: bool = False
    answers: int = 0
    cancelled: bool = False
    progress_sent: bool = False
    progress_seen: int = 0


@attrs.define(eq=False)
class _Caller:
    index: int
    ws: Any = None
    gone: bool = False  # left on purpose
    closed: str | None = None  # closed by the endpoint: how
    synced: bool = False
    sync_error: Any = None
    barrier: bool = False
    expected_notes: list[int] = attrs.Factory(list)
    notes: list[int] = attrs.Factory(list)
    hostile_sent: int = 0
    hostile_answered: int = 0

    @property
    def live(self) -> bool:
        return not self.gone and self.closed is None

    @property
    def name(self) -> str:
        return f"caller {self.index}"


@attrs.define(eq=False)
class _Ask:
    frame: dict[str, Any]
    answers: int = 0


@attrs.define(eq=False)
class _Cancel:
    request: _Request
    candidates: list[_Request]


@attrs.define(eq=False)
class _Run:
    """What one session has seen so far; reader tasks update it as frames arrive."""

    callers: list[_Caller]
    tool: Any = None
    tool_closed: str | None = None
    requests: dict[int, _Request] = attrs.Factory(dict)
    forwarded: list[_Request] = attrs.Factory(list)  # seen by the tool, not yet answered
    asks: list[_Ask] = attrs.Factory(list)
    cancels: list[_Cancel] = attrs.Factory(list)
    tool_cancelled: list[Any] = attrs.Factory(list)  # requestIds the tool was sent
    note_methods: list[str] = attrs.Factory(list)
    strays: int = 0
    hostile_from_callers: bool = False
    refused: str | None = None  # the endpoint refused us at the start: CannotConnect
    token_refused: bool = False  # ... by closing with 1008
    violations: list[Violation] = attrs.Factory(list)
    transcript: list[str] = attrs.Factory(list)
    quiet: bool = True  # do not log frames (while synchronising)
    changed: trio.Event = attrs.Factory(trio.Event)

    def poke(self) -> None:
        """Something changed: wake whoever waits in :meth:`until`."""
        self.changed.set()
        self.changed = trio.Event()

    async def until(self, condition: Callable[[], bool]) -> None:
        while not condition():
            await self.changed.wait()

    def violate(self, family: str, text: str) -> None:
        self.violations.append(Violation(family, text))

    def log(self, who: str, verb: str, message: str | bytes, *, force: bool = False) -> None:
        if self.quiet and not force:
            return
        shown = message if isinstance(message, str) else f"(binary) {message!r}"
        if len(shown) > 200:
            shown = shown[:200] + f"… ({len(shown)} characters)"
        self.transcript.append(f"{who:<8} {verb:<8} {shown}")

    def phase(self, text: str) -> None:
        self.transcript.append(f"-- {text}")

    def reached_tool(self) -> bool:
        """Every request sent so far reached the tool, was answered, or does not count."""
        return all(
            r.tool_id is not _NONE or r.answers or r.cancelled or not self.callers[r.caller].live
            for r in self.requests.values()
        )

    def settled(self) -> bool:
        for r in self.requests.values():
            if not self.callers[r.caller].live or r.cancelled:
                continue
            if r.answers == 0 or (r.progress_sent and r.progress_seen == 0):
                return False
        for c in self.callers:
            if c.live and (
                c.hostile_answered < c.hostile_sent or set(c.expected_notes) - set(c.notes)
            ):
                return False
        if any(a.answers == 0 for a in self.asks):
            return False
        return all(self._cancel_arrived(c) for c in self.cancels if self._cancel_expected(c))

    def _cancel_expected(self, cancel: _Cancel) -> bool:
        return self.callers[cancel.request.caller].live and any(
            r.tool_id is not _NONE for r in cancel.candidates
        )

    def _cancel_arrived(self, cancel: _Cancel) -> bool:
        return any(
            same_json(rid, r.tool_id)
            for rid in self.tool_cancelled
            for r in cancel.candidates
            if r.tool_id is not _NONE
        )


def _parse(message: str | bytes) -> Any:
    try:
        return json.loads(message)
    except ValueError:
        return _NONE


def _dumps(frame: Any) -> str:
    return json.dumps(frame, ensure_ascii=False, separators=(",", ":"))


def _close_text(exc: ConnectionClosed) -> str:
    if exc.reason is None:
        return "closed (1006)"
    reason = f" {exc.reason.reason}" if exc.reason.reason else ""
    return f"closed with {exc.reason.code}{reason}"


async def _send(run: _Run, who: str, ws: Any, message: str | bytes) -> bool:
    """Send, and log it; False if the connection is gone (its reader reports why)."""
    run.log(who, "sent", message)
    try:
        await ws.send_message(message)
    except ConnectionClosed:
        return False
    return True


async def run_session(
    tool_url: str,
    caller_url: str,
    session: Session,
    *,
    patience: float = 10.0,
    grace: float = 0.3,
) -> SessionResult:
    """Play ``session`` against a live endpoint; return the violations and the frames.

    A tool and ``session.callers`` callers connect for one agent. The tool is an MCP server
    listing the tools the checker calls: when the endpoint initializes it (as an aggregating
    relay does), it answers ``initialize`` and the lists, at any time. Before the script, each
    caller sends requests until one comes back answered by the tool, which proves that both
    are registered (answers to requests are the only thing any relay must deliver, so
    nothing the script tests is relied on to synchronise). After it, the tool answers every
    request still open, and each caller sends a last request and waits for its answer (a
    relay that keeps per-connection order has then delivered everything); then the
    checker waits up to ``grace`` seconds more for anything still missing.

    Args:
        tool_url: ``ws://…/mcp_endpoint/mcp/?token=…`` of a fresh agent (nothing else may
            be connected to it).
        caller_url: ``ws://…/mcp_endpoint/call/?token=…`` for the same agent.
        session: The script (see :func:`sessions`).
        patience: Seconds to wait for each phase that must complete (registration, requests
            reaching the tool, the last requests' answers).
        grace: Seconds to wait, after those, for frames still missing: what has not arrived
            by then is reported lost.

    Returns:
        The violations (each with its :data:`FAMILIES` name) and the transcript.

    Raises:
        CannotConnect: The endpoint refused or failed a connection before the script
            started: it could not be tested.
    """
    run = _Run([_Caller(i) for i in range(session.callers)])
    try:
        async with contextlib.AsyncExitStack() as stack:
            run.tool = await _open(stack, tool_url, patience)
            for caller in run.callers:
                caller.ws = await _open(stack, caller_url, patience)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_tool_reader, run)
                for caller in run.callers:
                    nursery.start_soon(_caller_reader, run, caller)
                if await _sync(run, patience):
                    run.quiet = False
                    run.phase("script")
                    await _play(session, run, patience, grace)
                    run.phase("the tool answers what is left; each caller sends a last request")
                    await _settle(run, patience, grace)
                nursery.cancel_scope.cancel()
    except (HandshakeError, OSError, trio.TooSlowError) as exc:
        refused = isinstance(exc, ConnectionRejected) and exc.status_code in (401, 403, 429)
        raise CannotConnect(describe_connect_failure(exc, tool_url), refused=refused) from None
    if run.refused is not None:
        raise CannotConnect(run.refused, refused=run.token_refused)
    if not run.quiet:
        _final_report(run)
        await _still_accepts(run, caller_url, patience)
    return SessionResult(tuple(run.violations), tuple(run.transcript))


async def check_session(
    tool_url: str,
    caller_url: str,
    session: Session,
    *,
    patience: float = 10.0,
    grace: float = 0.3,
) -> list[Violation]:
    """Play ``session`` against a live endpoint and return the violations (empty: every
    invariant held). See :func:`run_session`, which also returns the frames exchanged."""
    result = await run_session(tool_url, caller_url, session, patience=patience, grace=grace)
    return list(result.violations)


async def _open(stack: contextlib.AsyncExitStack, url: str, patience: float) -> Any:
    try:
        return await stack.enter_async_context(connect_websocket(url, connect_timeout=patience))
    except BaseExceptionGroup as group:
        leaf = _leaf(group)
        if isinstance(leaf, HandshakeError | OSError | trio.TooSlowError):
            raise leaf from None
        raise


def _leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


async def _sync(run: _Run, patience: float) -> bool:
    """Each caller repeats a request until the tool has answered one: then the tool and the
    caller are both registered. False (with the reason recorded) if that does not happen."""
    attempts = 0
    with trio.move_on_after(patience):
        while True:
            pending = [c for c in run.callers if not c.synced]
            if not pending or run.refused is not None:
                break
            if run.tool_closed is not None or any(c.closed for c in run.callers):
                break
            attempts += 1
            for caller in pending:
                caller.sync_error = None
                request = {
                    "jsonrpc": "2.0",
                    "id": f"{_SYNC}-{caller.index}-{attempts}",
                    "method": "tools/call",
                    "params": {"name": _SYNC, "arguments": {}},
                }
                await _send(run, caller.name, caller.ws, _dumps(request))
            # An error answer (the tool is not registered yet) means: ask again, soon.
            with trio.move_on_after(min(0.05 * attempts, 0.5)):
                await run.until(
                    lambda: (
                        all(c.synced or c.sync_error is not None for c in run.callers)
                        or run.refused is not None
                        or run.tool_closed is not None
                        or any(c.closed for c in run.callers)
                    )
                )
            if not all(c.synced for c in run.callers):
                await trio.sleep(min(0.005 * attempts, 0.1))
    if run.refused is not None:
        return False
    closed = [("the tool", run.tool_closed)] + [(c.name, c.closed) for c in run.callers]
    for who, how in closed:
        if how is not None:
            run.refused = (
                f"the endpoint {how.replace('closed', 'closed the connection of ' + who, 1)}"
            )
            return False
    if all(c.synced for c in run.callers):
        return True
    errors = [c.sync_error for c in run.callers if c.sync_error is not None]
    detail = f" (it answered {_dumps(errors[-1])[:120]})" if errors else ""
    run.refused = (
        f"the endpoint accepted a tool and a caller for one agent, but forwarded no request "
        f"from the caller to the tool within {patience:g} s{detail}"
    )
    return False


async def _play(session: Session, run: _Run, patience: float, grace: float) -> None:
    for step in session.steps:
        if run.tool_closed is not None:
            return
        if step.who == "tool":
            if not await _tool_step(step, run, patience, grace):
                return
        else:
            assert isinstance(step.who, int)
            caller = run.callers[step.who]
            if caller.live:
                await _caller_step(step, caller, run)


async def _caller_step(step: Step, caller: _Caller, run: _Run) -> None:
    if step.kind in ("request", "progress"):
        seq = len(run.requests)
        rid, token = step.value if step.kind == "progress" else (step.value, _NONE)
        request = _Request(caller.index, seq, rid, token)
        run.requests[seq] = request
        params: dict[str, Any] = {
            "name": "fuzz",
            "arguments": {"fuzzRequest": {"caller": caller.index, "seq": seq}},
        }
        if token is not _NONE:
            params["_meta"] = {"progressToken": token}
        frame = {"jsonrpc": "2.0", "id": rid, "method": "tools/call", "params": params}
        await _send(run, caller.name, caller.ws, _dumps(frame))
    elif step.kind == "cancel":
        open_requests = [
            r for r in run.requests.values() if r.caller == caller.index and not r.answers
        ]
        open_requests = [r for r in open_requests if not r.cancelled]
        if not open_requests:
            return
        target = open_requests[-1 if step.value else 0]
        same = [r for r in open_requests if same_json(r.id, target.id)]
        for r in same:
            r.cancelled = True
        candidates = [r for r in same if not r.tool_answered]
        if candidates:
            run.cancels.append(_Cancel(target, candidates))
        frame = {
            "jsonrpc": "2.0",
            "method": "notifications/cancelled",
            "params": {"requestId": target.id, "reason": "fuzz"},
        }
        await _send(run, caller.name, caller.ws, _dumps(frame))
    elif step.kind == "hostile":
        caller.hostile_sent += 1
        run.hostile_from_callers = True
        await _send(run, caller.name, caller.ws, step.value)
    elif step.kind == "leave":
        caller.gone = True
        run.log(caller.name, "leaves", "(closes its connection)", force=True)
        with trio.move_on_after(1):
            await caller.ws.aclose()
        run.poke()


async def _let_cancels_arrive(run: _Run, grace: float) -> None:
    """Give cancellations already sent up to ``grace`` seconds to reach the tool before it
    answers: a cancellation and an answer on two connections race at the relay, and an
    answer that wins makes the cancellation moot. (Not a synchronisation on the behaviour
    under test: what has not arrived by then is still reported.)"""
    waiting = [c for c in run.cancels if run._cancel_expected(c) and not run._cancel_arrived(c)]
    if waiting:
        with trio.move_on_after(grace):
            await run.until(lambda: all(run._cancel_arrived(c) for c in waiting))


async def _tool_step(step: Step, run: _Run, patience: float, grace: float) -> bool:
    """Play one tool step; False if the script cannot go on."""
    tool = run.tool
    if step.kind == "hostile":
        await _send(run, "tool", tool, step.value)
    elif step.kind == "notify":
        marker = len(run.note_methods)
        run.note_methods.append(step.value["method"])
        for caller in run.callers:
            if caller.live and _broadcast(step.value["method"]):
                caller.expected_notes.append(marker)
        params = dict(step.value.get("params") or {})
        params["_meta"] = {**(params.get("_meta") or {}), "fuzz": marker}
        await _send(run, "tool", tool, _dumps({**step.value, "params": params}))
    elif step.kind == "ask":
        if any(same_json(a.frame["id"], step.value["id"]) for a in run.asks):
            return True  # a tool never reuses its own request ids
        run.asks.append(_Ask(step.value))
        await _send(run, "tool", tool, _dumps(step.value))
    else:  # answer, duplicate, stray: first the tool gets every request sent so far
        with trio.move_on_after(patience) as waited:
            await run.until(run.reached_tool)
        if waited.cancelled_caught:
            missing = [r.seq for r in run.requests.values() if r.tool_id is _NONE]
            run.violate(
                "liveness",
                f"requests {missing} had not reached the tool after {patience:g} s "
                "(and were not answered)",
            )
            return False
        await _let_cancels_arrive(run, grace)
        in_flight = [r for r in run.forwarded if not r.tool_answered]
        if step.kind == "answer":
            if in_flight:
                await _answer(run, in_flight[-1 if step.value else 0])
        elif step.kind == "duplicate":
            busy = [r.tool_id for r in in_flight]
            done = [
                r
                for r in run.forwarded
                if r.tool_answered and not any(same_json(r.tool_id, b) for b in busy)
            ]
            if done:
                target = done[-1 if step.value else 0]
                target.duplicated = True
                await _answer(run, target)
        else:
            if any(r.tool_id == step.value for r in in_flight):
                return True  # that would be a real answer
            run.strays += 1
            stray = {"jsonrpc": "2.0", "id": step.value, "result": {"fuzzStray": run.strays}}
            await _send(run, "tool", tool, _dumps(stray))
    return True


async def _answer(run: _Run, request: _Request) -> None:
    request.tool_answered = True
    content = {"fuzzAnswer": {"caller": request.caller, "seq": request.seq}}
    frame = {"jsonrpc": "2.0", "id": request.tool_id, "result": content}
    await _send(run, "tool", run.tool, _dumps(frame))


async def _settle(run: _Run, patience: float, grace: float) -> None:
    with trio.move_on_after(patience):
        await run.until(run.reached_tool)
    await _let_cancels_arrive(run, grace)
    for request in list(run.forwarded):
        if not request.tool_answered and run.tool_closed is None:
            await _answer(run, request)
    live = [c for c in run.callers if c.live]
    for caller in live:
        barrier = {
            "jsonrpc": "2.0",
            "id": f"{_BARRIER}-{caller.index}",
            "method": "tools/call",
            "params": {"name": _BARRIER, "arguments": {}},
        }
        await _send(run, caller.name, caller.ws, _dumps(barrier))
    with trio.move_on_after(patience) as waited:
        await run.until(lambda: all(c.barrier or not c.live for c in live))
    if waited.cancelled_caught:
        late = [c.name for c in live if c.live and not c.barrier]
        run.violate(
            "liveness",
            f"{', '.join(late)}: a request sent after the script got no answer within "
            f"{patience:g} s: the endpoint stopped forwarding",
        )
    with trio.move_on_after(grace):
        await run.until(run.settled)
    await trio.sleep(min(grace, 0.02))  # room for a duplicate to show up


async def _still_accepts(run: _Run, caller_url: str, patience: float) -> None:
    try:
        with trio.fail_after(patience):
            async with connect_websocket(caller_url, connect_timeout=patience):
                pass
    except (HandshakeError, OSError, trio.TooSlowError, ConnectionClosed) as exc:
        run.violate(
            "liveness",
            "after the script the endpoint no longer accepts connections: "
            + describe_connect_failure(exc, caller_url),
        )
    except BaseExceptionGroup as group:
        leaf = _leaf(group)
        if not isinstance(leaf, HandshakeError | OSError | trio.TooSlowError | ConnectionClosed):
            raise
        run.violate(
            "liveness",
            "after the script the endpoint no longer accepts connections: "
            + describe_connect_failure(leaf, caller_url),
        )


def _refusal(how: str) -> str | None:
    """A close during synchronisation that means "you may not test here"."""
    if "1008" in how:
        return (
            f"the endpoint refused the token ({how}): use the server key "
            "([server] key of its config, or SERVER_KEY)"
        )
    return None


async def _tool_reader(run: _Run) -> None:
    try:
        while True:
            message = await run.tool.get_message()
            run.log("tool", "received", message)
            await _on_tool_frame(run, message)
            run.poke()
    except ConnectionClosed as exc:
        run.tool_closed = _close_text(exc)
        if run.quiet:
            run.refused = _refusal(run.tool_closed)
            run.token_refused = run.refused is not None
        else:
            run.log("tool", "closed", f"by the endpoint: {run.tool_closed}", force=True)
        run.poke()


def _broadcast(method: str) -> bool:
    """Whether every caller must receive a tool notification of ``method``. Not the
    ``list_changed`` family, which an aggregating endpoint answers by listing the tool
    again (telling only callers that initialized), nor ``resources/updated``, which goes to
    callers subscribed to the URI: callers in a script do neither."""
    return not method.endswith("/list_changed") and method != "notifications/resources/updated"


def _garbage_family(run: _Run) -> str:
    return "invalid-frames" if run.hostile_from_callers else "isolation"


async def _on_tool_frame(run: _Run, message: str | bytes) -> None:
    frame = _parse(message)
    if not isinstance(frame, dict):
        what = "not JSON" if frame is _NONE else "not a JSON object"
        run.violate(
            _garbage_family(run), f"the tool received a frame that is {what}: {message!r:.80}"
        )
        return
    method = frame.get("method")
    if isinstance(method, str) and "id" in frame:
        await _tool_got_request(run, frame)
    elif isinstance(method, str):
        if method == "notifications/cancelled":
            params = frame.get("params")
            if isinstance(params, dict) and "requestId" in params:
                run.tool_cancelled.append(params["requestId"])
    elif "id" in frame:
        _tool_got_response(run, frame)


#: The tool's ``serverInfo.name``, for an endpoint that initializes its tools.
_TOOL_NAME = "fuzz-tool"
#: The tools the tool lists: every ``tools/call`` the checker sends names one of them.
_TOOLS: Final = tuple(
    {
        "name": name,
        "description": f"{name} (trio-mcp-relay fuzz)",
        "inputSchema": {"type": "object"},
    }
    for name in ("fuzz", _SYNC, _BARRIER)
)
#: Answers to an aggregating endpoint's own list requests (its MCP client's), by method.
_LISTS: Final = {
    "tools/list": {"tools": list(_TOOLS)},
    "resources/list": {"resources": []},
    "resources/templates/list": {"resourceTemplates": []},
    "prompts/list": {"prompts": []},
}


def _server_answer(frame: dict[str, Any]) -> Any:
    """The tool's answer to a request the endpoint itself sends it as its MCP client
    (``initialize`` and the lists: no caller in a script sends those), else ``_NONE``."""
    method = frame["method"]
    if method == "initialize":
        params = frame.get("params")
        version = params.get("protocolVersion") if isinstance(params, dict) else None
        return {
            "protocolVersion": version if isinstance(version, str) else "2025-06-18",
            "capabilities": {"tools": {"listChanged": True}},
            "serverInfo": {"name": _TOOL_NAME, "version": "1.0"},
        }
    return _LISTS.get(method, _NONE)


async def _tool_got_request(run: _Run, frame: dict[str, Any]) -> None:
    params = frame.get("params")
    params = params if isinstance(params, dict) else {}
    name = params.get("name")
    answer_value = _server_answer(frame)
    if answer_value is not _NONE:
        answer = {"jsonrpc": "2.0", "id": frame["id"], "result": answer_value}
        await _send(run, "tool", run.tool, _dumps(answer))
        return
    if frame["method"] == "tools/call" and name in (_SYNC, _BARRIER):
        answer = {"jsonrpc": "2.0", "id": frame["id"], "result": {}}
        await _send(run, "tool", run.tool, _dumps(answer))
        return
    arguments = params.get("arguments")
    mark = arguments.get("fuzzRequest") if isinstance(arguments, dict) else None
    if frame["method"] != "tools/call" or not isinstance(mark, dict):
        if frame["method"] == "ping" and not run.hostile_from_callers:
            answer = {"jsonrpc": "2.0", "id": frame["id"], "result": {}}
            await _send(run, "tool", run.tool, _dumps(answer))
            return
        run.violate(
            _garbage_family(run),
            f"the tool received a request no caller sent: {_dumps(frame):.120}",
        )
        return
    request = run.requests.get(mark.get("seq", -1))
    if request is None:
        run.violate(
            "isolation", f"the tool received a request no caller sent: {_dumps(frame):.120}"
        )
        return
    if request.tool_id is not _NONE:
        run.violate("answers", f"the tool received request #{request.seq} twice")
        return
    for other in run.forwarded:
        if not other.tool_answered and same_json(other.tool_id, frame["id"]):
            run.violate(
                "ids",
                f"the tool received requests #{other.seq} (caller {other.caller}, id "
                f"{other.id!r}) and #{request.seq} (caller {request.caller}, id "
                f"{request.id!r}) in flight with the same id {frame['id']!r}",
            )
    request.tool_id = frame["id"]
    run.forwarded.append(request)
    if request.token is _NONE:
        return
    meta = params.get("_meta")
    if not isinstance(meta, dict) or "progressToken" not in meta:
        run.violate(
            "progress", f"request #{request.seq} reached the tool without its progressToken"
        )
        return
    request.tool_token = meta["progressToken"]
    request.progress_sent = True
    progress = {
        "jsonrpc": "2.0",
        "method": "notifications/progress",
        "params": {"progressToken": request.tool_token, "progress": 1, "total": 2},
    }
    await _send(run, "tool", run.tool, _dumps(progress))


def _tool_got_response(run: _Run, frame: dict[str, Any]) -> None:
    rid = frame["id"]
    if rid is None and "error" in frame:
        return  # the endpoint's answer to one of the tool's invalid frames
    for ask in run.asks:
        if same_json(ask.frame["id"], rid):
            ask.answers += 1
            if ask.answers > 1:
                run.violate(
                    "tool-requests",
                    f"the tool got a second answer to its {ask.frame['method']} request "
                    f"(id {rid!r})",
                )
            return
    for ask in run.asks:
        if ask.answers == 0 and ask.frame["id"] == rid:
            ask.answers += 1
            run.violate(
                "tool-requests",
                f"the tool sent {ask.frame['method']} with id {ask.frame['id']!r} and got "
                f"its answer with id {rid!r}",
            )
            return
    run.violate(
        _garbage_family(run) if not run.asks else "tool-requests",
        f"the tool got an answer it never asked for: {_dumps(frame):.120}",
    )


async def _caller_reader(run: _Run, caller: _Caller) -> None:
    try:
        while True:
            message = await caller.ws.get_message()
            run.log(caller.name, "received", message)
            await _on_caller_frame(run, caller, message)
            run.poke()
    except ConnectionClosed as exc:
        if not caller.gone:
            caller.closed = _close_text(exc)
            if run.quiet:
                run.refused = _refusal(caller.closed)
                run.token_refused = run.refused is not None
            else:
                run.log(caller.name, "closed", f"by the endpoint: {caller.closed}", force=True)
        run.poke()


async def _on_caller_frame(run: _Run, caller: _Caller, message: str | bytes) -> None:
    name = caller.name
    frame = _parse(message)
    if not isinstance(frame, dict):
        what = "not JSON" if frame is _NONE else "not a JSON object"
        run.violate("isolation", f"{name} received a frame that is {what}: {message!r:.80}")
        return
    method = frame.get("method")
    if isinstance(method, str) and "id" in frame:  # from the tool side: answer it
        answer = {"jsonrpc": "2.0", "id": frame["id"], "result": {"fuzzAnswered": caller.index}}
        await _send(run, name, caller.ws, _dumps(answer))
        return
    if isinstance(method, str):
        _caller_got_notification(run, caller, frame)
        return
    rid = frame.get("id")
    if isinstance(rid, str) and rid.startswith((_SYNC, _BARRIER)):
        if rid.startswith(_BARRIER):
            caller.barrier = True
        elif "result" in frame:
            caller.synced = True
        else:
            caller.sync_error = frame.get("error")
        return
    if "error" in frame:
        _caller_got_error(run, caller, frame)
        return
    result = frame.get("result")
    mark = result.get("fuzzAnswer") if isinstance(result, dict) else None
    if isinstance(result, dict) and "fuzzStray" in result:
        run.violate(
            "late-answers",
            f"{name} received the tool's stray answer (id {rid!r}), which answers no request",
        )
        return
    if not isinstance(mark, dict) or mark.get("seq") not in run.requests:
        run.violate("isolation", f"{name} received a response nobody sent: {_dumps(frame):.120}")
        return
    request = run.requests[mark["seq"]]
    if request.caller != caller.index:
        run.violate(
            "isolation",
            f"{name} received caller {request.caller}'s answer to request #{request.seq}",
        )
        return
    request.answers += 1
    if request.answers > 1:
        if request.duplicated:
            run.violate(
                "late-answers",
                f"{name} received the tool's duplicate answer to request #{request.seq} "
                "(a second answer to one request)",
            )
        else:
            run.violate("answers", f"{name} received two answers to request #{request.seq}")
    elif not same_json(rid, request.id):
        run.violate(
            "ids",
            f"{name} sent request #{request.seq} with id {request.id!r} and got its answer "
            f"with id {rid!r}",
        )


def _caller_got_error(run: _Run, caller: _Caller, frame: dict[str, Any]) -> None:
    error = frame["error"]
    code = error.get("code") if isinstance(error, dict) else None
    rid = frame.get("id")
    if caller.hostile_answered < caller.hostile_sent and (rid is None or code in _INVALID_CODES):
        caller.hostile_answered += 1
        if code not in _INVALID_CODES:
            run.violate(
                "invalid-frames",
                f"{caller.name}'s invalid frame was answered with code {code!r}, not "
                "-32700 or -32600",
            )
        return
    mine = [r for r in run.requests.values() if r.caller == caller.index and not r.answers]
    for request in mine:
        if same_json(request.id, rid):
            request.answers += 1
            return
    for request in mine:
        if request.id == rid:
            request.answers += 1
            run.violate(
                "ids",
                f"{caller.name} sent request #{request.seq} with id {request.id!r} and got an "
                f"error answer with id {rid!r}",
            )
            return
    run.violate(
        "isolation",
        f"{caller.name} received an error answer for none of its requests: {_dumps(frame):.120}",
    )


def _caller_got_notification(run: _Run, caller: _Caller, frame: dict[str, Any]) -> None:
    params = frame.get("params")
    params = params if isinstance(params, dict) else {}
    if frame["method"] == "notifications/cancelled":
        return  # the relay withdrawing a tool request it gave this caller
    if frame["method"] == "notifications/progress":
        token = params.get("progressToken", _NONE)
        owned = [
            r
            for r in run.requests.values()
            if r.progress_sent and r.token is not _NONE and same_json(r.token, token)
        ]
        mine = [r for r in owned if r.caller == caller.index]
        if mine:
            # A token may be reused once its request is over (cancelled): credit the
            # progress to a request that still expects it first.
            waiting = [r for r in mine if not r.progress_seen]
            target = next((r for r in waiting if not r.cancelled), (waiting or mine)[0])
            target.progress_seen += 1
            if target.progress_seen > 1:
                run.violate(
                    "progress", f"{caller.name} received progress for token {token!r} twice"
                )
        elif owned:
            run.violate(
                "progress",
                f"{caller.name} received the progress of caller {owned[0].caller}'s request "
                f"#{owned[0].seq} (token {token!r})",
            )
        else:
            run.violate(
                "progress",
                f"{caller.name} received progress with token {token!r}, which none of its "
                f"requests carried: {_dumps(frame):.120}",
            )
        return
    meta = params.get("_meta")
    marker = meta.get("fuzz") if isinstance(meta, dict) else None
    if type(marker) is not int or marker >= len(run.note_methods):
        run.violate(
            "isolation", f"{caller.name} received a notification nobody sent: {_dumps(frame):.120}"
        )
        return
    if marker in caller.notes:
        run.violate("notifications", f"{caller.name} received tool notification #{marker} twice")
    caller.notes.append(marker)


def _final_report(run: _Run) -> None:
    if run.tool_closed is not None:
        run.violate(
            "liveness",
            f"the endpoint {run.tool_closed.replace('closed', 'closed the tool connection', 1)}",
        )
    for caller in run.callers:
        if caller.closed is not None:
            run.violate(
                "liveness",
                f"the endpoint {caller.closed.replace('closed', f'closed {caller.name}', 1)}",
            )
    for r in run.requests.values():
        caller = run.callers[r.caller]
        if not caller.live or r.cancelled:
            continue
        if r.answers == 0:
            seen = "" if r.tool_id is not _NONE else " (it never reached the tool)"
            run.violate(
                "answers",
                f"{caller.name} never got an answer to request #{r.seq} with id {r.id!r}{seen}",
            )
        elif r.progress_sent and r.progress_seen == 0:
            run.violate(
                "progress",
                f"{caller.name} did not receive the tool's progress for request #{r.seq} "
                f"(token {r.token!r}, sent by the tool as {r.tool_token!r})",
            )
    for caller in run.callers:
        if not caller.live:
            continue
        if caller.hostile_answered < caller.hostile_sent:
            run.violate(
                "invalid-frames",
                f"{caller.name} sent {caller.hostile_sent} invalid frame(s) and got "
                f"{caller.hostile_answered} error answer(s) (-32700/-32600)",
            )
        missing = sorted(set(caller.expected_notes) - set(caller.notes))
        if missing:
            shown = ", ".join(f"#{m} ({run.note_methods[m]})" for m in missing)
            run.violate("notifications", f"{caller.name} did not receive tool notification {shown}")
    for ask in run.asks:
        if ask.answers == 0:
            run.violate(
                "tool-requests",
                f"the tool's {ask.frame['method']} request with id {ask.frame['id']!r} got no "
                "answer (from a caller or from the endpoint)",
            )
    for cancel in run.cancels:
        if run._cancel_expected(cancel) and not run._cancel_arrived(cancel):
            tool_ids = [r.tool_id for r in cancel.candidates if r.tool_id is not _NONE]
            run.violate(
                "cancellation",
                f"caller {cancel.request.caller} cancelled request #{cancel.request.seq} (id "
                f"{cancel.request.id!r}), which the tool saw as id {tool_ids[0]!r}, but the tool "
                "got no notifications/cancelled with that requestId (it got "
                f"{run.tool_cancelled!r:.80})",
            )
