"""JSON-RPC 2.0 frames: parsing with validation, and compact serialization.

Theory of operation: a WebSocket message (text, or binary holding UTF-8) is parsed once into
one of four attrs models, decided by which members are present, as pygls/lsprotocol do:

* ``method`` and ``id``: :class:`Request`
* ``method`` and no ``id``: :class:`Notification`
* no ``method``, ``result``: :class:`Result`
* no ``method``, ``error``: :class:`ErrorResponse`

Anything else is a :class:`FrameError` carrying the JSON-RPC error the sender should get
(``-32700`` for text that is not JSON, ``-32600`` for JSON that is not one valid JSON-RPC
object). ``params``, ``result``, ``error.data`` and unknown top-level members are kept as
parsed and written back untouched. An absent member is :data:`MISSING`, which is not the same
as JSON ``null``.

Exactness: orjson turns integers outside [-2**63, 2**64) into floats, and refuses to write
them. Such a frame is parsed (and written) with the standard library instead, so huge integer
ids and arguments survive unchanged. Which frames: a small one (up to 508 bytes) when its text
holds a run of 19 or more digits (a scan that costs less than a microsecond at that size); a
larger one when orjson's result holds a float of magnitude 2**63 or more (what a rounded
integer becomes), found by one walk of its values that also measures its nesting, so that a
frame of mostly text, as MCP frames are, is never scanned byte by byte. A frame with more
values than a thirty-second of its bytes is scanned instead (the walk would cost more).
Both parsers must accept exactly the frames :func:`dumps` can write back: nesting deeper than
orjson writes (:data:`MAX_DEPTH`) and strings holding a lone UTF-16 surrogate (the stdlib
parser takes ``"\\ud800"``, but no UTF-8 text can hold it) are ``-32700``.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Final, TypeAlias

import attrs
import orjson

__all__ = [
    "MISSING",
    "ErrorObject",
    "ErrorResponse",
    "Frame",
    "FrameError",
    "Id",
    "Missing",
    "Notification",
    "Request",
    "Response",
    "Result",
    "dumps",
    "error_frame",
    "parse_frame",
]


class Missing(enum.Enum):
    """Marks a member that is absent from the frame (as opposed to JSON ``null``)."""

    MISSING = "MISSING"

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Final = Missing.MISSING
#: "No override" for the ``to_json`` arguments (``None`` and MISSING are values there).
KEEP: Final[Any] = object()

#: A request id as JSON-RPC allows it: a string or a number (booleans excluded).
Id: TypeAlias = str | int | float

# JSON-RPC error codes used by the relay (protocol.md section 6).
PARSE_ERROR: Final = -32700
INVALID_REQUEST: Final = -32600
METHOD_NOT_FOUND: Final = -32601
INVALID_PARAMS: Final = -32602
INTERNAL_ERROR: Final = -32603
TOOL_NOT_CONNECTED: Final = -32001
FORWARD_FAILED: Final = -32002
CONNECTION_ERROR: Final = -32003
AUTHENTICATION_ERROR: Final = -32004
NO_CALLER: Final = -32005
REQUEST_TIMEOUT: Final = -32006
LIMIT_EXCEEDED: Final = -32007

_RESERVED: Final = frozenset({"jsonrpc", "id", "method", "params", "result", "error"})
# A run of 19 ASCII digits, found by mapping digits to 1 and the rest to 0: ten times faster
# than a regular expression on large frames (a regex pays per position; translate is memcpy).
_DIGIT_TABLE: Final = bytes(1 if 0x30 <= i <= 0x39 else 0 for i in range(256))
_LONG_DIGIT_RUN: Final = b"\x01" * 19
_SURROGATE_ESCAPE: Final = re.compile(rb"\\u[dD][89a-fA-F]")

#: Deepest nesting of arrays and objects a frame may have, the frame itself counting as 1.
#: orjson writes no deeper; the stdlib writer, which dumps would fall back to, recurses on the
#: Python stack and fails at a depth that depends on the caller's stack.
MAX_DEPTH: Final = 254


def _with_params(out: dict[str, Any], params: Any, extra: Mapping[str, Any]) -> dict[str, Any]:
    """A request's or notification's dict finished: its params (unless absent), its extras."""
    if params is not MISSING:
        out["params"] = params
    if extra:
        out.update(extra)
    return out


@attrs.frozen
class Request:
    """A call that expects exactly one response with the same ``id``."""

    id: Id
    method: str
    params: Any = MISSING
    extra: Mapping[str, Any] = attrs.field(factory=dict)

    def to_json(self, id: Any = KEEP, params: Any = KEEP) -> dict[str, Any]:
        """The frame as a JSON-ready dict; with ``id`` or ``params``, those instead of its own
        (what forwarding writes, without building another frame first)."""
        out: dict[str, Any] = {
            "jsonrpc": "2.0",
            "id": self.id if id is KEEP else id,
            "method": self.method,
        }
        return _with_params(out, self.params if params is KEEP else params, self.extra)


@attrs.frozen
class Notification:
    """A one-way message: no ``id``, never answered."""

    method: str
    params: Any = MISSING
    extra: Mapping[str, Any] = attrs.field(factory=dict)

    def to_json(self, params: Any = KEEP) -> dict[str, Any]:
        """The frame as a JSON-ready dict; with ``params``, those instead of its own."""
        out: dict[str, Any] = {"jsonrpc": "2.0", "method": self.method}
        return _with_params(out, self.params if params is KEEP else params, self.extra)


@attrs.frozen
class Result:
    """A successful response. ``id`` may be MISSING or None on malformed peers' frames."""

    id: Id | Missing | None
    result: Any
    extra: Mapping[str, Any] = attrs.field(factory=dict)

    def to_json(self, id: Any = KEEP) -> dict[str, Any]:
        """The frame as a JSON-ready dict; with ``id``, that one instead of its own."""
        out: dict[str, Any] = {"jsonrpc": "2.0"}
        if id is KEEP:
            id = self.id
        if id is not MISSING:
            out["id"] = id
        out["result"] = self.result
        if self.extra:
            out.update(self.extra)
        return out


@attrs.frozen
class ErrorObject:
    """The ``error`` member of an error response."""

    code: int
    message: str
    data: Any = MISSING
    extra: Mapping[str, Any] = attrs.field(factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The error object as a JSON-ready dict."""
        out: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not MISSING:
            out["data"] = self.data
        out.update(self.extra)
        return out


@attrs.frozen
class ErrorResponse:
    """A failed response. It has no ``result`` member."""

    id: Id | Missing | None
    error: ErrorObject
    extra: Mapping[str, Any] = attrs.field(factory=dict)

    def to_json(self, id: Any = KEEP) -> dict[str, Any]:
        """The frame as a JSON-ready dict; with ``id``, that one instead of its own."""
        out: dict[str, Any] = {"jsonrpc": "2.0"}
        if id is KEEP:
            id = self.id
        if id is not MISSING:
            out["id"] = id
        out["error"] = self.error.to_json()
        if self.extra:
            out.update(self.extra)
        return out


Response: TypeAlias = Result | ErrorResponse
Frame: TypeAlias = Request | Notification | Result | ErrorResponse


@attrs.frozen
class FrameError(Exception):
    """A remote error: the frame is not acceptable. ``code`` and ``reason`` say what to answer."""

    code: int
    reason: str

    def __str__(self) -> str:
        return self.reason

    def to_response(self) -> ErrorResponse:
        """The JSON-RPC error to send back (``id`` is null: the frame's id is not trusted)."""
        message = "Parse error" if self.code == PARSE_ERROR else "Invalid Request"
        return ErrorResponse(
            id=None, error=ErrorObject(code=self.code, message=message, data=self.reason)
        )


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError("number out of range")
    return value


def _nested_too_deeply(obj: Any, exact: bool) -> bool:
    if not exact:
        # What orjson parsed without a long digit run, only the depth can stop it writing,
        # and trying is ten times faster than walking a large tree in Python.
        try:
            orjson.dumps(obj)
        except orjson.JSONEncodeError:
            return True
        return False
    level = [obj] if isinstance(obj, dict | list) else []
    for _ in range(MAX_DEPTH):
        if not level:
            return False
        level = [
            child
            for container in level
            for child in (container.values() if isinstance(container, dict) else container)
            if isinstance(child, dict | list)
        ]
    return bool(level)


_FITS: Final = 0  # the tree is exact and shallow enough
_TOO_DEEP: Final = 1
_INEXACT: Final = 2  # a float orjson may have made of an integer beyond 64 bits
_TOO_MANY: Final = 3  # more values than the walk may visit: check by scanning instead
#: orjson keeps every integer of [-2**63, 2**64) exact and turns the others into floats, all
#: at least this large: only such a float can stand for an integer the stdlib keeps exact.
_BIG_FLOAT: Final = 9223372036854775808.0  # 2**63


def _check_tree(obj: Any, budget: int) -> int:
    """What orjson parsed, checked in one walk of its values (level by level): nesting
    deeper than :data:`MAX_DEPTH`, or a float that may be a rounded integer. Gives up after
    ``budget`` values, so a frame of many small values costs no more than a byte scan."""
    if type(obj) is not dict and type(obj) is not list:
        return _INEXACT if type(obj) is float and not -_BIG_FLOAT < obj < _BIG_FLOAT else _FITS
    level: list[Any] = [obj]
    depth = 1
    while True:
        below: list[Any] = []
        for container in level:
            values = container.values() if type(container) is dict else container
            budget -= len(values)
            if budget < 0:
                return _TOO_MANY
            for value in values:
                kind = type(value)
                if kind is dict or kind is list:
                    below.append(value)
                elif kind is float and not -_BIG_FLOAT < value < _BIG_FLOAT:
                    return _INEXACT
        if not below:
            return _FITS
        depth += 1
        if depth > MAX_DEPTH:
            return _TOO_DEEP
        level = below


def _has_long_digit_run(data: bytes) -> bool:
    return _LONG_DIGIT_RUN in data.translate(_DIGIT_TABLE)


def _stdlib_loads(data: bytes) -> Any:
    """The standard library's parse: integers of any size stay exact."""
    try:
        return json.loads(
            data.decode("utf-8"), parse_constant=_reject_constant, parse_float=_finite_float
        )
    except UnicodeDecodeError:
        raise FrameError(PARSE_ERROR, "not UTF-8 text") from None
    except RecursionError:
        raise FrameError(PARSE_ERROR, "not JSON: nested too deeply") from None
    except ValueError as exc:
        raise FrameError(PARSE_ERROR, f"not JSON: {exc}") from None


#: What :func:`_quick_loads` gives when only the standard library's parse is exact.
_RETRY_EXACT: Final[Any] = object()


def _loads(data: bytes) -> Any:
    """Parse JSON exactly: orjson normally, the stdlib for integers orjson would round.

    Small frames are scanned for a run of 19 digits first (cheap at that size); a larger
    one is parsed by orjson and its values walked once for depth and for floats that may
    be rounded integers (cheap when its bytes are mostly strings, as MCP frames are), with
    the scan as the fallback when it holds too many values for the walk.
    """
    obj = _quick_loads(data)
    return _exact_loads(data) if obj is _RETRY_EXACT else obj


def _quick_loads(data: bytes) -> Any:
    """orjson's parse when it is exact and nests no deeper than MAX_DEPTH, else
    :data:`_RETRY_EXACT`."""
    small = len(data) <= 2 * MAX_DEPTH  # nesting deeper than MAX_DEPTH takes 2 bytes a level
    if small and _has_long_digit_run(data):
        return _RETRY_EXACT
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        # orjson refuses integers of 309 digits and more ("infinity"): the stdlib's.
        if small or not _has_long_digit_run(data):
            raise FrameError(PARSE_ERROR, f"not JSON: {exc}") from None
        return _RETRY_EXACT
    if small:
        return obj
    verdict = _check_tree(obj, len(data) >> 5)
    if verdict == _FITS:
        return obj
    if verdict == _TOO_DEEP:
        raise FrameError(PARSE_ERROR, "not JSON: nested too deeply")
    if verdict == _INEXACT:
        return _RETRY_EXACT
    # Too many values for the walk: scan the bytes instead.
    if _has_long_digit_run(data):
        return _RETRY_EXACT
    # Fewer brackets than MAX_DEPTH (strings' included) cannot nest too deeply.
    if data.count(b"[") + data.count(b"{") > MAX_DEPTH and _nested_too_deeply(obj, exact=False):
        raise FrameError(PARSE_ERROR, "not JSON: nested too deeply")
    return obj


def _exact_loads(data: bytes) -> Any:
    """The standard library's parse, held to what :func:`dumps` can write back."""
    obj = _stdlib_loads(data)
    if len(data) > 2 * MAX_DEPTH and _nested_too_deeply(obj, exact=True):
        raise FrameError(PARSE_ERROR, "not JSON: nested too deeply")
    if _SURROGATE_ESCAPE.search(data) is not None:
        # orjson refuses lone surrogates itself; the stdlib parser lets them through.
        try:
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise FrameError(PARSE_ERROR, "not JSON: lone surrogate in a string") from None
    return obj


def dumps(obj: Any) -> bytes:
    """Compact single-line JSON, UTF-8, exact for integers of any size."""
    try:
        return orjson.dumps(obj)
    except orjson.JSONEncodeError:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


def _is_id(value: object) -> bool:
    return type(value) is str or type(value) is int or type(value) is float


def _describe(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


#: A frame's extra members when it has none (most frames): one shared, read-only mapping.
_NO_EXTRA: Final[Mapping[str, Any]] = MappingProxyType({})


def _extra(obj: dict[str, Any], known: int) -> Mapping[str, Any]:
    """The members beyond the ``known`` reserved ones the frame has."""
    if len(obj) == known:
        return _NO_EXTRA
    return {k: v for k, v in obj.items() if k not in _RESERVED}


def parse_frame(data: str | bytes) -> Frame:
    """Parse one WebSocket message into a frame.

    Args:
        data: the message; text, or binary holding UTF-8 JSON. A trailing newline is fine.

    Returns:
        The frame model.

    Raises:
        FrameError: the message is not JSON (``-32700``) or not one valid JSON-RPC 2.0
            object (``-32600``); ``reason`` says why.
    """
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    obj = _loads(raw)
    if not isinstance(obj, dict):
        if isinstance(obj, list):
            raise FrameError(INVALID_REQUEST, "batches (JSON arrays) are not supported")
        raise FrameError(INVALID_REQUEST, f"a frame must be a JSON object, not {_describe(obj)}")
    if obj.get("jsonrpc") != "2.0":
        raise FrameError(INVALID_REQUEST, 'missing or wrong "jsonrpc": must be "2.0"')
    method = obj.get("method", MISSING)
    params = obj.get("params", MISSING)
    if method is not MISSING:
        if type(method) is not str:
            raise FrameError(INVALID_REQUEST, f'"method" must be a string, not {_describe(method)}')
        if "result" in obj or "error" in obj:
            raise FrameError(INVALID_REQUEST, 'a request cannot carry "result" or "error"')
        known = 2 if params is MISSING else 3  # jsonrpc, method, params
        if "id" not in obj:
            return Notification(method=method, params=params, extra=_extra(obj, known))
        rid = obj["id"]
        if not _is_id(rid):
            raise FrameError(
                INVALID_REQUEST, f'"id" must be a string or a number, not {_describe(rid)}'
            )
        return Request(id=rid, method=method, params=params, extra=_extra(obj, known + 1))
    rid = obj.get("id", MISSING)
    if rid is not MISSING and rid is not None and not _is_id(rid):
        raise FrameError(
            INVALID_REQUEST, f'"id" must be a string or a number, not {_describe(rid)}'
        )
    has_result = "result" in obj
    if has_result and "error" in obj:
        raise FrameError(INVALID_REQUEST, 'a response has "result" or "error", not both')
    known = 2 if rid is MISSING else 3  # jsonrpc, id, result or error
    if has_result:
        return Result(id=rid, result=obj["result"], extra=_extra(obj, known))
    if "error" not in obj:
        raise FrameError(INVALID_REQUEST, 'no "method", "result" or "error" member')
    err = obj["error"]
    if not isinstance(err, dict):
        raise FrameError(INVALID_REQUEST, f'"error" must be an object, not {_describe(err)}')
    code = err.get("code")
    message = err.get("message")
    if type(code) is not int:
        raise FrameError(INVALID_REQUEST, '"error.code" must be an integer')
    if type(message) is not str:
        raise FrameError(INVALID_REQUEST, '"error.message" must be a string')
    error = ErrorObject(
        code=code,
        message=message,
        data=err.get("data", MISSING),
        extra={k: v for k, v in err.items() if k not in ("code", "message", "data")},
    )
    return ErrorResponse(id=rid, error=error, extra=_extra(obj, known))


def error_frame(rid: Id | None, code: int, message: str, data: Any = MISSING) -> bytes:
    """Serialize an error response with the given id."""
    return dumps(
        ErrorResponse(id=rid, error=ErrorObject(code=code, message=message, data=data)).to_json()
    )
