"""Hypothesis strategies for JSON values, JSON-RPC ids and frames, and a strict JSON equality.

``typed`` exists because Python's ``==`` says ``1 == 1.0`` and ``0 == False``: the relay must
give ids back with their JSON type, so tests compare ``typed(a) == typed(b)`` instead.
"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from trio_mcp_relay._frames import (
    MISSING,
    ErrorObject,
    ErrorResponse,
    Notification,
    Request,
    Result,
)

RESERVED = frozenset({"jsonrpc", "id", "method", "params", "result", "error"})

#: Integers well beyond the 64-bit range that orjson handles (but far below the 4300-digit
#: limit of Python's int/str conversion).
big_ints = st.integers(min_value=-(2**200), max_value=2**200)
ints = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    big_ints,
    st.sampled_from([0, -1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63) - 1, 10**30]),
)
floats = st.floats(allow_nan=False, allow_infinity=False)
texts = st.text(max_size=20)

json_scalars = st.one_of(st.none(), st.booleans(), ints, floats, texts)
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.text(max_size=8), children, max_size=4),
    ),
    max_leaves=12,
)
json_objects = st.dictionaries(st.text(max_size=8), json_values, max_size=4)

#: Ids a JSON-RPC request may carry, with a bias towards the values real clients trip on.
tricky_ids = st.sampled_from([0, "", 1, 1.0, "1", -1, 0.0, 1.5, "0", 2**64, "ид-🙂"])
ids = st.one_of(tricky_ids, ints, floats, st.text(max_size=12))

#: Small pools make callers collide with each other and reuse ids.
colliding_ids = st.sampled_from([0, "", 1, 1.0, "1", 2, 2**70])

extra_members = st.dictionaries(
    st.text(max_size=8).filter(lambda k: k not in RESERVED), json_values, max_size=3
)
methods = st.one_of(st.sampled_from(["tools/call", "tools/list", "initialize"]), texts)
params = st.one_of(st.just(MISSING), st.none(), json_values)

requests = st.builds(Request, id=ids, method=methods, params=params, extra=extra_members)
notifications = st.builds(Notification, method=methods, params=params, extra=extra_members)
response_ids = st.one_of(ids, st.none(), st.just(MISSING))
results = st.builds(Result, id=response_ids, result=json_values, extra=extra_members)
error_objects = st.builds(
    ErrorObject,
    code=ints,
    message=texts,
    data=st.one_of(st.just(MISSING), json_values),
    extra=st.dictionaries(
        st.text(max_size=8).filter(lambda k: k not in ("code", "message", "data")),
        json_values,
        max_size=2,
    ),
)
error_responses = st.builds(
    ErrorResponse, id=response_ids, error=error_objects, extra=extra_members
)
frames = st.one_of(requests, notifications, results, error_responses)


def typed(value: Any) -> Any:
    """A hashable form of a JSON value in which values of different JSON types never compare
    equal (``1``, ``1.0``, ``"1"``, ``True``), and ``-0.0`` differs from ``0.0``."""
    if value is None or isinstance(value, bool):
        return (type(value).__name__, value)
    if isinstance(value, int):
        return ("int", value)
    if isinstance(value, float):
        return ("float", repr(value))
    if isinstance(value, str):
        return ("str", value)
    if isinstance(value, list):
        return ("list", tuple(typed(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((k, typed(v)) for k, v in value.items())))
    raise TypeError(f"not a JSON value: {value!r}")
