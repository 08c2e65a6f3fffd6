"""What the routing core decided, counted in plain integers for the shell's metrics.

The core knows how each caller request ended (answered by a server, refused by the relay with
a code, cancelled) and when it came in; the shell knows nothing of that without parsing every
frame again. So each :class:`~trio_mcp_relay.core.session.Session` adds its outcomes to the
:class:`Tally` its router shares, and the shell reads the tally when ``/metrics`` is scraped
(``server/metrics.py``). No Prometheus here, no Trio, no locks: an outcome costs a few dict
operations.

Label cardinality is bounded here, where the keys are made:

* the method is one of :data:`METHODS` or ``"other"`` (a caller may send any method name);
* the agent is its own name only when it is *labelled*: named by the operator
  (:attr:`Tally.named`), or holding one of ``slots`` dynamic labels. The shell gives the
  dynamic labels to the agents with the most connections at each scrape
  (:meth:`Tally.relabel`); between scrapes a new agent takes a free one, if any. Every other
  agent counts as ``"other"``. When an agent loses its label, what it counted moves to
  ``"other"``, so every series only ever grows.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from typing import Final

__all__ = [
    "LATENCY_BUCKETS",
    "METHODS",
    "OTHER",
    "RELAY_CODES",
    "TOOL_METHODS",
    "Tally",
    "outcome_of_code",
]

#: The label of everything not named on its own (agents, methods, relay error codes).
OTHER: Final = "other"
#: Caller methods counted under their own name.
METHODS: Final = frozenset(
    {
        "initialize",
        "ping",
        "tools/list",
        "tools/call",
        "prompts/list",
        "prompts/get",
        "resources/list",
        "resources/templates/list",
        "resources/read",
        "resources/subscribe",
        "resources/unsubscribe",
        "completion/complete",
        "logging/setLevel",
    }
)
#: Tool-initiated methods counted under their own name.
TOOL_METHODS: Final = frozenset(
    {"sampling/createMessage", "roots/list", "elicitation/create", "ping"}
)
#: The error codes the relay answers with itself, each an outcome of its own.
RELAY_CODES: Final = frozenset(
    {-32001, -32002, -32003, -32004, -32005, -32006, -32007, -32602, -32603}
)
#: Upper bounds (seconds) of the request latency histogram's buckets.
LATENCY_BUCKETS: Final = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)

RESULT: Final = "result"  # answered by a server with a result (or by the relay itself)
ERROR: Final = "error"  # answered by a server with an error
CANCELLED: Final = "cancelled"  # cancelled by its caller, or its caller left
_OUTCOMES: Final = {code: str(code) for code in RELAY_CODES}


def outcome_of_code(code: int) -> str:
    """The outcome label of a relay error ``code`` (one not in :data:`RELAY_CODES`: other)."""
    return _OUTCOMES.get(code, "relay_other")


class Tally:
    """Counts shared by the sessions of one router.

    Args:
        named: agents that always get their own label.
        slots: how many other agents may have their own label at once.

    Attributes:
        rows: ``(agent label, method label, outcome) -> [count, count per latency bucket
            (the last for +Inf)..., sum of seconds]`` of caller requests that ended; the
            latency only of those that were answered. One row, so one dict lookup, per
            request.
        tool_requests: ``(method label, outcome) -> count`` of requests servers sent to the
            caller side: ``routed``, or the relay's error code (``-32005``, ``-32007``).
        tool_request_timeouts: ``method label -> count`` of those no caller answered in time.
    """

    __slots__ = (
        "dynamic",
        "named",
        "rows",
        "slots",
        "tool_request_timeouts",
        "tool_requests",
    )

    def __init__(self, named: Iterable[str] = (), slots: int = 10) -> None:
        self.named = frozenset(named)
        self.slots = slots
        self.dynamic: set[str] = set()
        self.rows: dict[tuple[str, str, str], list[float]] = {}
        self.tool_requests: dict[tuple[str, str], int] = {}
        self.tool_request_timeouts: dict[str, int] = {}

    @property
    def requests(self) -> dict[tuple[str, str, str], int]:
        """``(agent label, method label, outcome) -> count`` of caller requests that ended."""
        return {key: int(row[0]) for key, row in self.rows.items()}

    @property
    def latency(self) -> dict[str, list[float]]:
        """``method label -> [count per bucket (the last for +Inf)..., sum]``: seconds from a
        request's arrival to its answer, over the requests that were answered."""
        out: dict[str, list[float]] = {}
        for (_, method, _), row in self.rows.items():
            if not row[-1] and not any(row[1:-1]):
                continue  # only cancelled requests: no answer to time
            total = out.setdefault(method, [0.0] * (len(row) - 1))
            for index, count in enumerate(row[1:]):
                total[index] += count
        return out

    def label(self, agent: str) -> str:
        """The agent's label: its name if it has (or can take) one, else ``"other"``."""
        if agent in self.named or agent in self.dynamic:
            return agent
        if len(self.dynamic) < self.slots:
            self.dynamic.add(agent)
            return agent
        return OTHER

    def relabel(self, top: Iterable[str]) -> None:
        """Give the dynamic labels to ``top`` (the first ``slots`` not named); the counts of
        agents that lose theirs move to ``"other"``."""
        wanted: set[str] = set()
        for agent in top:
            if len(wanted) >= self.slots:
                break
            if agent not in self.named and agent != OTHER:
                wanted.add(agent)
        lost = self.dynamic - wanted
        self.dynamic = wanted
        if not lost:
            return
        rows = self.rows
        for key in [k for k in rows if k[0] in lost]:
            row = rows.pop(key)
            folded = rows.setdefault((OTHER, key[1], key[2]), [0.0] * len(row))
            for index, count in enumerate(row):
                folded[index] += count

    def answered(
        self,
        agent: str,
        method: str,
        outcome: str,
        seconds: float | None,
        # Bound once: this runs for every request (module globals cost a lookup each).
        _methods: frozenset[str] = METHODS,
        _bounds: tuple[float, ...] = LATENCY_BUCKETS,
        _bisect: Callable[[Sequence[float], float], int] = bisect_left,
        _size: int = len(LATENCY_BUCKETS) + 3,
    ) -> None:
        """A caller request of ``agent`` ended with ``outcome``; ``seconds`` after it came in
        when it was answered (None: cancelled, no answer)."""
        if method not in _methods:
            method = OTHER
        if agent not in self.dynamic and agent not in self.named:
            agent = self.label(agent)
        key = (agent, method, outcome)
        row = self.rows.get(key)
        if row is None:
            row = self.rows[key] = [0.0] * _size
        row[0] += 1
        if seconds is not None:
            row[1 + _bisect(_bounds, seconds)] += 1
            row[-1] += seconds

    def tool_request(self, method: str, outcome: str) -> None:
        """A server's request to the caller side was routed (or refused with ``outcome``)."""
        key = (method if method in TOOL_METHODS else OTHER, outcome)
        self.tool_requests[key] = self.tool_requests.get(key, 0) + 1

    def tool_request_timeout(self, method: str) -> None:
        """No caller answered a server's request in time."""
        if method not in TOOL_METHODS:
            method = OTHER
        self.tool_request_timeouts[method] = self.tool_request_timeouts.get(method, 0) + 1
