"""Tests of the frame layer: what parse_frame accepts, how it classifies, what dumps writes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from tests.strategies import floats, frames, ids, ints, json_values, typed
from trio_mcp_relay import testing
from trio_mcp_relay._frames import (
    INVALID_REQUEST,
    MAX_DEPTH,
    MISSING,
    PARSE_ERROR,
    ErrorObject,
    ErrorResponse,
    Frame,
    FrameError,
    Notification,
    Request,
    Result,
    dumps,
    error_frame,
    parse_frame,
)

DATA = Path(__file__).parent / "data"


def parse_error(data: str | bytes) -> FrameError:
    with pytest.raises(FrameError) as info:
        parse_frame(data)
    return info.value


def assert_rejected(data: str | bytes, code: int) -> FrameError:
    error = parse_error(data)
    assert error.code == code
    assert error.reason
    response = json.loads(dumps(error.to_response().to_json()))
    assert response == {
        "jsonrpc": "2.0",
        "id": None,
        "error": {
            "code": code,
            "message": "Parse error" if code == PARSE_ERROR else "Invalid Request",
            "data": error.reason,
        },
    }
    assert "result" not in response
    return error


def frame(**members: Any) -> bytes:
    return json.dumps({"jsonrpc": "2.0", **members}).encode()


# ---------------------------------------------------------------------- -32700


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"   ",
        b"{",
        b"not json",
        b"{'jsonrpc': '2.0'}",
        b'{"jsonrpc":"2.0","method":"m",}',
        b'{"jsonrpc":"2.0","method":"m"} {}',
        '{"jsonrpc":"2.0","method":"m"',
    ],
)
def test_not_json_is_a_parse_error(data: str | bytes) -> None:
    assert_rejected(data, PARSE_ERROR)


@pytest.mark.parametrize(
    "data",
    [
        b'{"jsonrpc":"2.0","method":"\xff"}',
        b'{"jsonrpc":"2.0","method":"m","params":"\xc3"}',
        # a surrogate written as raw UTF-8 bytes (CESU-8) is not UTF-8 either
        b'{"jsonrpc":"2.0","method":"\xed\xa0\x80"}',
        # the same with a long digit run, which takes the exact-integer parser
        b'{"jsonrpc":"2.0","method":"\xff","id":123456789012345678901234567890}',
        b"\xef\xbb\xbf" + frame(method="m"),
    ],
)
def test_invalid_utf8_is_a_parse_error(data: bytes) -> None:
    assert_rejected(data, PARSE_ERROR)


def test_text_with_a_lone_surrogate_is_a_parse_error() -> None:
    assert_rejected('{"jsonrpc":"2.0","method":"\ud800"}', PARSE_ERROR)


@pytest.mark.parametrize("long_digits", [False, True])
@pytest.mark.parametrize("escape", ["\\ud800", "\\udfff", "a\\ud83d", "\\ude00\\ud83d"])
def test_escaped_lone_surrogate_is_a_parse_error(escape: str, long_digits: bool) -> None:
    # Such a string cannot be written back as UTF-8; both parsers must refuse it the same way.
    id_text = "123456789012345678901234567890" if long_digits else "1"
    data = f'{{"jsonrpc":"2.0","id":{id_text},"method":"m","params":"{escape}"}}'
    assert_rejected(data, PARSE_ERROR)


@pytest.mark.parametrize("long_digits", [False, True])
def test_escaped_surrogate_pair_is_accepted(long_digits: bool) -> None:
    id_text = "123456789012345678901234567890" if long_digits else "1"
    data = f'{{"jsonrpc":"2.0","id":{id_text},"method":"m","params":"\\ud83d\\ude00"}}'
    parsed = parse_frame(data)
    assert isinstance(parsed, Request)
    assert parsed.params == "\U0001f600"
    assert json.loads(dumps(parsed.to_json()))["params"] == "\U0001f600"


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity", "1e400", "-1e400"])
@pytest.mark.parametrize("long_digits", [False, True])
def test_non_finite_numbers_are_a_parse_error(constant: str, long_digits: bool) -> None:
    extra = ',"n":123456789012345678901234567890' if long_digits else ""
    data = f'{{"jsonrpc":"2.0","method":"m","params":[{constant}]{extra}}}'
    assert_rejected(data, PARSE_ERROR)
    assert_rejected(f'{{"jsonrpc":"2.0","id":{constant},"method":"m"{extra}}}', PARSE_ERROR)


@pytest.mark.parametrize(
    "data",
    [
        b"[" * 100_000,
        b"[" * 100_000 + b"]" * 100_000,
        b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
        # with a long digit run, which takes the stdlib parser
        b"[" * 100_000 + b"123456789012345678901234567890" + b"]" * 100_000,
        b'{"jsonrpc":"2.0","method":"m","n":123456789012345678901234567890,"params":'
        + b"[" * 5000
        + b"]" * 5000
        + b"}",
    ],
    ids=["open-arrays", "arrays", "objects", "arrays-exact-parser", "frame-exact-parser"],
)
def test_deeply_nested_json_is_a_parse_error(data: bytes) -> None:
    assert_rejected(data, PARSE_ERROR)


@pytest.mark.parametrize("depth", [200, 253, 300, 600, 1000, 1020])
@pytest.mark.parametrize("long_digits", [False, True])
def test_any_accepted_frame_can_be_written_back(depth: int, long_digits: bool) -> None:
    # Whatever nesting parse_frame accepts, dumps must be able to write (the router forwards
    # every frame it accepts), whatever the depth of the Python stack at that point.
    extra = ',"n":123456789012345678901234567890' if long_digits else ""
    data = (
        b'{"jsonrpc":"2.0","id":1,"method":"m","params":'
        + b"[" * depth
        + b"]" * depth
        + extra.encode()
        + b"}"
    )
    try:
        parsed = parse_frame(data)
    except FrameError as exc:
        assert exc.code == PARSE_ERROR
        return
    assert json.loads(_dumps_on_a_deep_stack(parsed.to_json(), 150)) == json.loads(data)


def _dumps_on_a_deep_stack(obj: Any, frames_left: int) -> bytes:
    if frames_left:
        return _dumps_on_a_deep_stack(obj, frames_left - 1)
    return dumps(obj)


def _nested(depth: int, *, objects: bool, long_digits: bool) -> bytes:
    """A frame whose deepest value sits ``depth`` containers down (the frame itself is one)."""
    inner = depth - 1
    opening, closing = (b'{"a":', b"}") if objects else (b"[", b"]")
    extra = b',"n":123456789012345678901234567890' if long_digits else b""
    return (
        b'{"jsonrpc":"2.0","method":"m"'
        + extra
        + b',"params":'
        + opening * inner
        + (b"1" if objects else b"")
        + closing * inner
        + b"}"
    )


@pytest.mark.parametrize("objects", [False, True])
@pytest.mark.parametrize("long_digits", [False, True])
def test_both_parsers_share_one_nesting_limit(objects: bool, long_digits: bool) -> None:
    deepest = _nested(MAX_DEPTH, objects=objects, long_digits=long_digits)
    parsed = parse_frame(deepest)
    assert json.loads(dumps(parsed.to_json())) == json.loads(deepest)
    assert (
        "nested"
        in assert_rejected(
            _nested(MAX_DEPTH + 1, objects=objects, long_digits=long_digits), PARSE_ERROR
        ).reason
    )


def test_moderately_nested_frames_are_accepted() -> None:
    data = b'{"jsonrpc":"2.0","method":"m","params":' + b"[" * 100 + b"]" * 100 + b"}"
    parsed = parse_frame(data)
    assert isinstance(parsed, Notification)
    assert dumps(parsed.to_json()) == data


# ---------------------------------------------------------------------- -32600


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"[]", "batch"),
        (b'[{"jsonrpc":"2.0","method":"m"}]', "batch"),
        (b'[{"jsonrpc":"2.0","id":1,"method":"m"},{"jsonrpc":"2.0","id":2,"method":"m"}]', "batch"),
        (b"1", "object"),
        (b'"text"', "object"),
        (b"null", "object"),
        (b"true", "object"),
        (b"12345678901234567890", "object"),
    ],
)
def test_non_objects_are_invalid_requests(data: bytes, words: str) -> None:
    assert words in assert_rejected(data, INVALID_REQUEST).reason


@pytest.mark.parametrize(
    "obj",
    [
        {"id": 1, "method": "m"},
        {"jsonrpc": "1.0", "id": 1, "method": "m"},
        {"jsonrpc": 2.0, "id": 1, "method": "m"},
        {"jsonrpc": 2, "method": "m"},
        {"jsonrpc": None, "result": {}},
        {"jsonrpc": "2.0 ", "method": "m"},
    ],
)
def test_missing_or_wrong_jsonrpc_is_invalid(obj: dict[str, Any]) -> None:
    assert "jsonrpc" in assert_rejected(json.dumps(obj), INVALID_REQUEST).reason


@pytest.mark.parametrize("method", [1, 1.5, None, True, [], {}, ["m"]])
@pytest.mark.parametrize("with_id", [True, False])
def test_non_string_method_is_invalid(method: Any, with_id: bool) -> None:
    members = {"method": method, **({"id": 1} if with_id else {})}
    assert "method" in assert_rejected(frame(**members), INVALID_REQUEST).reason


@pytest.mark.parametrize(
    ("rid", "described"),
    [(True, "boolean"), (False, "boolean"), (None, "null"), ({}, "object"), ([1], "array")],
)
def test_request_ids_must_be_strings_or_numbers(rid: Any, described: str) -> None:
    reason = assert_rejected(frame(id=rid, method="m"), INVALID_REQUEST).reason
    assert '"id"' in reason
    assert described in reason


@pytest.mark.parametrize("rid", [True, {}, [], [1]])
@pytest.mark.parametrize("body", [{"result": {}}, {"error": {"code": 1, "message": "m"}}])
def test_response_ids_must_be_strings_numbers_or_null(rid: Any, body: dict[str, Any]) -> None:
    assert '"id"' in assert_rejected(frame(id=rid, **body), INVALID_REQUEST).reason


@pytest.mark.parametrize(
    "members",
    [
        {"id": 1, "result": 1, "error": {"code": 1, "message": "m"}},
        {"result": None, "error": None},
        {"id": 1, "method": "m", "result": 1},
        {"method": "m", "error": {"code": 1, "message": "m"}},
        {"id": 1},
        {},
        {"params": {}},
    ],
)
def test_response_shape_is_checked(members: dict[str, Any]) -> None:
    assert_rejected(frame(**members), INVALID_REQUEST)


@pytest.mark.parametrize(
    "error",
    [
        None,
        "boom",
        1,
        [],
        {},
        {"code": 1},
        {"message": "m"},
        {"code": "1", "message": "m"},
        {"code": 1.0, "message": "m"},
        {"code": True, "message": "m"},
        {"code": None, "message": "m"},
        {"code": 1, "message": 1},
        {"code": 1, "message": None},
        {"code": 1, "message": ["m"]},
    ],
)
def test_malformed_error_objects_are_invalid(error: Any) -> None:
    reason = assert_rejected(frame(id=1, error=error), INVALID_REQUEST).reason
    assert "error" in reason


# ---------------------------------------------------------------------- classification


def test_request() -> None:
    parsed = parse_frame(b'{"jsonrpc":"2.0","id":7,"method":"tools/list","params":{"a":1}}')
    assert parsed == Request(id=7, method="tools/list", params={"a": 1})


def test_notification() -> None:
    parsed = parse_frame(b'{"jsonrpc":"2.0","method":"notifications/initialized"}')
    assert parsed == Notification(method="notifications/initialized")
    assert "id" not in parsed.to_json()


def test_result() -> None:
    assert parse_frame(b'{"jsonrpc":"2.0","id":"x","result":null}') == Result(id="x", result=None)


def test_error_response() -> None:
    parsed = parse_frame(b'{"jsonrpc":"2.0","id":3,"error":{"code":-32601,"message":"nope"}}')
    assert parsed == ErrorResponse(id=3, error=ErrorObject(code=-32601, message="nope"))
    assert "result" not in parsed.to_json()


@pytest.mark.parametrize("body", [{"result": {}}, {"error": {"code": 0, "message": "m"}}])
def test_response_id_may_be_missing_or_null(body: dict[str, Any]) -> None:
    missing = parse_frame(frame(**body))
    null = parse_frame(frame(id=None, **body))
    assert isinstance(missing, Result | ErrorResponse)
    assert isinstance(null, Result | ErrorResponse)
    assert missing.id is MISSING
    assert null.id is None
    assert "id" not in missing.to_json()
    assert null.to_json()["id"] is None


def test_xiaozhi_client_idless_result_parses() -> None:
    assert parse_frame(b'{"jsonrpc":"2.0","result":{}}') == Result(id=MISSING, result={})


@pytest.mark.parametrize("rid", [0, "", 1, 1.0, "1", -5, 1.5, 2**64, -(2**70), 1e300])
def test_request_id_type_and_value_are_kept(rid: Any) -> None:
    parsed = parse_frame(frame(id=rid, method="m"))
    assert isinstance(parsed, Request)
    assert typed(parsed.id) == typed(rid)
    assert typed(json.loads(dumps(parsed.to_json()))["id"]) == typed(rid)


def test_params_absent_and_null_are_different() -> None:
    absent = parse_frame(b'{"jsonrpc":"2.0","id":1,"method":"m"}')
    null = parse_frame(b'{"jsonrpc":"2.0","id":1,"method":"m","params":null}')
    assert isinstance(absent, Request)
    assert isinstance(null, Request)
    assert absent.params is MISSING
    assert null.params is None
    assert absent != null
    assert "params" not in json.loads(dumps(absent.to_json()))
    assert json.loads(dumps(null.to_json())) == {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "m",
        "params": None,
    }
    note = parse_frame(b'{"jsonrpc":"2.0","method":"m","params":null}')
    assert isinstance(note, Notification)
    assert note.params is None
    assert json.loads(dumps(note.to_json()))["params"] is None


def test_unknown_members_and_error_data_pass_through() -> None:
    data = (
        b'{"jsonrpc":"2.0","id":1,"error":{"code":-1,"message":"m","data":{"why":[1,null]},'
        b'"vendor":true},"trace":"abc","x-n":12}'
    )
    parsed = parse_frame(data)
    assert isinstance(parsed, ErrorResponse)
    assert parsed.error.data == {"why": [1, None]}
    assert parsed.error.extra == {"vendor": True}
    assert parsed.extra == {"trace": "abc", "x-n": 12}
    assert json.loads(dumps(parsed.to_json())) == json.loads(data)

    request = parse_frame(b'{"jsonrpc":"2.0","id":1,"method":"m","extension":{"k":[]}}')
    assert isinstance(request, Request)
    assert request.extra == {"extension": {"k": []}}
    assert json.loads(dumps(request.to_json()))["extension"] == {"k": []}


def test_error_data_absent_and_null_are_different() -> None:
    absent = parse_frame(b'{"jsonrpc":"2.0","id":1,"error":{"code":1,"message":"m"}}')
    null = parse_frame(b'{"jsonrpc":"2.0","id":1,"error":{"code":1,"message":"m","data":null}}')
    assert isinstance(absent, ErrorResponse)
    assert isinstance(null, ErrorResponse)
    assert absent.error.data is MISSING
    assert null.error.data is None
    assert "data" not in json.loads(dumps(absent.to_json()))["error"]
    assert json.loads(dumps(null.to_json()))["error"]["data"] is None


@pytest.mark.parametrize("ending", ["\n", "\r\n", " \n", "\n\n", "\t"])
@pytest.mark.parametrize("binary", [False, True])
def test_trailing_whitespace_is_accepted(ending: str, binary: bool) -> None:
    text = '{"jsonrpc":"2.0","id":1,"method":"tools/list"}' + ending
    parsed = parse_frame(text.encode() if binary else text)
    assert parsed == Request(id=1, method="tools/list")


def test_bytes_and_text_parse_the_same() -> None:
    text = '{"jsonrpc":"2.0","id":"é🙂","method":"tools/call","params":{"q":"日本"}}'
    assert parse_frame(text) == parse_frame(text.encode("utf-8"))
    assert parse_frame(text.encode()) == Request(
        id="é🙂", method="tools/call", params={"q": "日本"}
    )


def test_huge_integers_are_exact() -> None:
    big = 2**64 + 1
    data = f'{{"jsonrpc":"2.0","id":{big},"method":"m","params":{{"n":-{big},"f":1.5}}}}'
    parsed = parse_frame(data)
    assert isinstance(parsed, Request)
    assert parsed.id == big
    assert type(parsed.id) is int
    assert parsed.params == {"n": -big, "f": 1.5}
    assert dumps(parsed.to_json()) == data.encode()


def test_long_digit_runs_inside_strings_do_not_change_the_result() -> None:
    data = '{"jsonrpc":"2.0","id":"12345678901234567890","method":"m","params":[1.0,2]}'
    parsed = parse_frame(data)
    assert isinstance(parsed, Request)
    assert typed(parsed.id) == typed("12345678901234567890")
    assert typed(parsed.params) == typed([1.0, 2])


@pytest.mark.parametrize("path", sorted(DATA.glob("*.jsonl")), ids=lambda p: p.name)
def test_recorded_client_frames_parse(path: Path) -> None:
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if "frame" not in row:
            continue
        parsed = parse_frame(row["frame"])
        assert json.loads(dumps(parsed.to_json())) == json.loads(row["frame"])


# ---------------------------------------------------------------------- output


def test_dumps_is_compact() -> None:
    obj = {"a": [1, 2.5, None, True], "b": {"c": "line\nbreak"}, "d": "é"}
    assert dumps(obj) == '{"a":[1,2.5,null,true],"b":{"c":"line\\nbreak"},"d":"é"}'.encode()


def test_dumps_is_compact_for_huge_integers_too() -> None:
    obj = {"a": [2**70, 1], "b": {"c": "line\nbreak"}, "d": "é"}
    expected = '{"a":[1180591620717411303424,1],"b":{"c":"line\\nbreak"},"d":"é"}'
    assert dumps(obj) == expected.encode()


def test_error_frame() -> None:
    assert json.loads(error_frame(0, -32001, "Tool not connected")) == {
        "jsonrpc": "2.0",
        "id": 0,
        "error": {"code": -32001, "message": "Tool not connected"},
    }
    data = error_frame("", -32003, "Connection error", {"k": 1})
    assert json.loads(data) == {
        "jsonrpc": "2.0",
        "id": "",
        "error": {"code": -32003, "message": "Connection error", "data": {"k": 1}},
    }
    assert typed(json.loads(error_frame(1.0, 1, "m"))["id"]) == typed(1.0)
    assert json.loads(error_frame(None, 1, "m"))["id"] is None


def test_frame_error_is_an_exception_with_a_reason() -> None:
    error = FrameError(INVALID_REQUEST, "why")
    assert str(error) == "why"
    with pytest.raises(FrameError, match="why"):
        raise error


# ---------------------------------------------------------------------- properties


def assert_same_frame(a: Frame, b: Frame) -> None:
    assert type(a) is type(b)
    assert a == b
    assert typed(a.to_json()) == typed(b.to_json())


@given(frames)
@example(Request(id=1, method="m"))
@example(Request(id=1.0, method="m"))
@example(Request(id="1", method="m"))
@example(Request(id=0, method="", params=None))
@example(Request(id="", method="m", params={}))
@example(Request(id=2**64, method="m", params=[-(2**100), 0.1]))
@example(Result(id=MISSING, result={}))
@example(Result(id=None, result=None))
@example(ErrorResponse(id=-0.0, error=ErrorObject(code=2**70, message="", data=None)))
def test_round_trip(original: Frame) -> None:
    data = dumps(original.to_json())
    assert b"\n" not in data
    assert b"\r" not in data
    assert_same_frame(parse_frame(data), original)
    assert_same_frame(parse_frame(data.decode("utf-8")), original)
    assert_same_frame(parse_frame(data + b"\r\n"), original)


@given(ids)
def test_id_round_trip_keeps_the_json_type(rid: Any) -> None:
    for parsed in (
        parse_frame(dumps(Request(id=rid, method="m").to_json())),
        parse_frame(dumps(Result(id=rid, result=1).to_json())),
    ):
        assert isinstance(parsed, Request | Result)
        assert typed(parsed.id) == typed(rid)


@given(json_values)
def test_dumps_agrees_with_the_standard_library(value: Any) -> None:
    data = dumps(value)
    assert b"\n" not in data
    assert typed(json.loads(data)) == typed(value)


@given(st.binary(max_size=64))
def test_arbitrary_bytes_parse_or_raise_frame_error(data: bytes) -> None:
    try:
        parsed = parse_frame(data)
    except FrameError as exc:
        assert exc.code in (PARSE_ERROR, INVALID_REQUEST)
    else:
        dumps(parsed.to_json())


@given(json_values)
def test_arbitrary_json_parses_or_is_an_invalid_request(value: Any) -> None:
    try:
        parsed = parse_frame(json.dumps(value))
    except FrameError as exc:
        assert exc.code == INVALID_REQUEST
    else:
        assert typed(json.loads(dumps(parsed.to_json()))) == typed(value)


@given(testing.hostile_frames())
def test_the_public_hostile_frames_are_all_refused(data: str | bytes) -> None:
    assert parse_error(data).code in (PARSE_ERROR, INVALID_REQUEST)


@given(st.one_of(testing.requests(), testing.notifications(), testing.responses()))
def test_the_public_well_formed_frames_all_parse(obj: dict[str, Any]) -> None:
    parsed = parse_frame(json.dumps(obj))
    assert typed(json.loads(dumps(parsed.to_json()))) == typed(obj)


# ------------------------------------------------ large frames: the walk and the scan


def standard_library(data: bytes) -> Any:
    """What the frame means: the standard library's exact reading."""
    return json.loads(data)


#: Floats of every size, those beyond 2**63 included (orjson's rounded integers look so).
wide_floats = st.one_of(floats, st.floats(min_value=2.0**63, max_value=1e300), st.just(-1e19))
large_values = st.recursive(
    st.one_of(st.none(), st.booleans(), ints, wide_floats, st.text(max_size=40)),
    lambda children: st.one_of(
        st.lists(children, max_size=8),
        st.dictionaries(st.text(max_size=8), children, max_size=6),
    ),
    max_leaves=40,
)


@given(
    value=large_values,
    pad=st.integers(0, 4000),
    many=st.integers(0, 600),
    where=st.sampled_from(["params", "result"]),
)
@example(value=2**64, pad=600, many=0, where="params")  # a rounded integer found by the walk
@example(value=2**64, pad=0, many=600, where="result")  # ... and by the scan
@example(value=-(2**63) - 1, pad=600, many=0, where="params")
@example(value=1e19, pad=600, many=0, where="result")  # a true float that large
@example(value=2**64 - 1, pad=600, many=0, where="params")  # orjson keeps it exact
@example(value="12345678901234567890123", pad=600, many=600, where="params")
@example(value=10**400, pad=600, many=0, where="params")  # orjson refuses it: "infinity"
@example(value=-(10**400), pad=0, many=600, where="result")
def test_any_frame_parses_to_what_the_standard_library_reads(
    value: Any, pad: int, many: int, where: str
) -> None:
    """Whichever way a frame is checked (a small one scanned for digit runs, a large one's
    values walked, or scanned when it holds too many of them), it parses to exactly what the
    standard library reads, integers of any size and the JSON type of every number kept."""
    body = {"value": value, "pad": "x" * pad, "many": [0] * many}
    frame_json: dict[str, Any] = {"jsonrpc": "2.0", "id": 1}
    if where == "params":
        frame_json |= {"method": "m", "params": body}
    else:
        frame_json["result"] = body
    data = json.dumps(frame_json, ensure_ascii=False).encode()
    parsed = parse_frame(data)
    assert typed(parsed.to_json()) == typed(standard_library(data))
    assert typed(json.loads(dumps(parsed.to_json()))) == typed(standard_library(data))


@pytest.mark.parametrize("filler", ["none", "values", "text"])
@pytest.mark.parametrize("objects", [False, True])
@pytest.mark.parametrize("exact", [False, True])
def test_the_nesting_limit_holds_in_large_frames_however_they_are_checked(
    filler: str, objects: bool, exact: bool
) -> None:
    """MAX_DEPTH nests, one more is -32700, whichever check decides: padded with text (the
    walk has the budget to reach the bottom), with many values (past its budget: the bracket
    count, then dumps), or neither; with an integer beyond 64 bits (the standard library's
    parse, then its own walk) or not."""
    many = b",".join([b"0"] * 2000) if filler == "values" else b""
    text = b"x" * 20_000 if filler == "text" else b""
    for depth, accepted in ((MAX_DEPTH, True), (MAX_DEPTH + 1, False)):
        inner = depth - 1
        opening, closing = (b'{"a":', b"}") if objects else (b"[", b"]")
        data = (
            b'{"jsonrpc":"2.0","method":"m","many":['
            + many
            + b'],"text":"'
            + text
            + (b'","n":123456789012345678901234567890' if exact else b'"')
            + b',"params":'
            + opening * inner
            + (b"1" if objects else b"")
            + closing * inner
            + b"}"
        )
        if accepted:
            parsed = parse_frame(data)
            assert typed(parsed.to_json()) == typed(standard_library(data))
        else:
            assert "nested" in assert_rejected(data, PARSE_ERROR).reason
