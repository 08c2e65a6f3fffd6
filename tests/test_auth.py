"""Tokens: the reference server's AES-ECB-PKCS7 scheme, and the URLs built from them."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
from collections.abc import Callable
from urllib.parse import parse_qs, quote, urlsplit

import attrs
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given
from hypothesis import strategies as st

from trio_mcp_relay._auth import (
    REASON_AGENT_ID_NOT_STRING,
    REASON_MISSING,
    REASON_NO_AGENT_ID,
    REASON_NOT_BASE64,
    REASON_NOT_JSON,
    REASON_WRONG_KEY,
    AesTokenAuthenticator,
    Authenticator,
    AuthError,
    Endpoint,
    RedactingFilter,
    caller_url,
    decrypt_agent_id,
    encrypt_token,
    health_url,
    pad_key,
    redact,
    tool_url,
)

KEY = "0123456789abcdef0123456789abcdef"  # the reference generates 32 hex characters


def raw_encrypt(key_bytes: bytes, plaintext: bytes) -> str:
    """AES-ECB with hand-written PKCS#7 padding: independent of the module under test."""
    pad = 16 - len(plaintext) % 16
    encryptor = Cipher(algorithms.AES(key_bytes), modes.ECB()).encryptor()
    ciphertext = encryptor.update(plaintext + bytes([pad]) * pad) + encryptor.finalize()
    return base64.b64encode(ciphertext).decode("ascii")


def raw_decrypt(key_bytes: bytes, token: str) -> bytes:
    decryptor = Cipher(algorithms.AES(key_bytes), modes.ECB()).decryptor()
    padded = decryptor.update(base64.b64decode(token)) + decryptor.finalize()
    return padded[: -padded[-1]]


def token_with(predicate: Callable[[str], bool], key: str = KEY) -> tuple[str, str]:
    """Find an agent id whose token satisfies ``predicate`` (deterministic: ECB has no IV).

    The number leads the id so that it changes the first cipher block too.
    """
    for number in range(100_000):
        agent_id = f"{number}-agent"
        token = encrypt_token(key, agent_id)
        if predicate(token):
            return agent_id, token
    raise AssertionError("no such token found")


# --- Key bytes ------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [16, 24, 32])
def test_pad_key_uses_aes_sized_keys_as_is(length: int) -> None:
    key = "k" * length
    assert pad_key(key) == key.encode()


def test_pad_key_counts_utf8_bytes_not_characters() -> None:
    key = "é" * 8  # 8 characters, 16 bytes
    assert pad_key(key) == key.encode("utf-8")


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("", b"\0" * 32),
        ("abc", b"abc" + b"\0" * 29),
        ("x" * 17, b"x" * 17 + b"\0" * 15),
        ("y" * 40, b"y" * 32),
        ("é" * 20, ("é" * 16).encode()),
    ],
)
def test_pad_key_zero_pads_or_cuts_to_32_bytes(key: str, expected: bytes) -> None:
    assert pad_key(key) == expected
    assert len(pad_key(key)) == 32


# --- Round trips and known answers -----------------------------------------------------------


@pytest.mark.parametrize("key_length", [1, 5, 16, 24, 31, 32, 33, 64])
def test_round_trip_for_every_key_length(key_length: int) -> None:
    key = "s" * key_length
    token = encrypt_token(key, "my-agent")
    assert decrypt_agent_id(key, token) == "my-agent"


def test_known_answer_computed_from_cryptography_primitives() -> None:
    expected = raw_encrypt(KEY.encode(), b'{"agentId": "single_module"}')
    assert encrypt_token(KEY, "single_module") == expected
    assert decrypt_agent_id(KEY, expected) == "single_module"


@pytest.mark.parametrize(
    ("key", "token", "agent_id"),
    [
        # Produced with `openssl enc -aes-256-ecb -K <hex key>` and `base64`.
        (KEY, "1+08xP+MVKq52fk6fDG5rCZyUoDIVSjfvMOI4QEMqpQ=", "single_module"),
        # A short key, zero-padded to 32 bytes; a non-ASCII id written as raw UTF-8.
        ("abc", "8+Uhj8jum8afoiqYn2qTzF8i524DL8dOTJFHxoZ0bsg=", "单模块"),
        # The reference's own spelling, '{"agentId":"single_module"}' (no space), AES-128.
        ("sixteen byte key", "L0DwMvfGa410LfEwwNj6FMV5YNDPhs1lYwHqZdoCo8o=", "single_module"),
    ],
)
def test_known_answers_from_openssl(key: str, token: str, agent_id: str) -> None:
    assert decrypt_agent_id(key, token) == agent_id


def test_plaintext_is_manager_api_json_with_a_space() -> None:
    token = encrypt_token(KEY, "agent-7")
    assert raw_decrypt(pad_key(KEY), token) == b'{"agentId": "agent-7"}'


def test_manager_api_md5_token() -> None:
    agent_id = "f6c0a1c2d1a94b0fa4c2f3b7a1d2e3f4"
    digest = hashlib.md5(agent_id.encode()).hexdigest()
    token = encrypt_token(KEY, agent_id, md5=True)
    assert raw_decrypt(pad_key(KEY), token) == f'{{"agentId": "{digest}"}}'.encode()
    assert decrypt_agent_id(KEY, token) == digest
    # The same token as manager-api's Java code would build it.
    assert token == raw_encrypt(pad_key(KEY), f'{{"agentId": "{digest}"}}'.encode())


def test_odd_characters_in_agent_id_are_escaped() -> None:
    agent_id = 'a "quoted" \\ back\nslash\u0000'
    token = encrypt_token(KEY, agent_id)
    plaintext = raw_decrypt(pad_key(KEY), token)
    assert json.loads(plaintext) == {"agentId": agent_id}
    assert decrypt_agent_id(KEY, token) == agent_id


def test_token_is_plain_base64_not_url_quoted() -> None:
    _, token = token_with(lambda t: "+" in t and "/" in t)
    assert "%" not in token
    base64.b64decode(token, validate=True)


def test_extra_json_keys_are_ignored() -> None:
    token = raw_encrypt(pad_key(KEY), b'{"agentId": "a1", "exp": 0}')
    assert decrypt_agent_id(KEY, token) == "a1"


# --- Tokens mangled on the way --------------------------------------------------------------


def test_url_quoted_token_is_accepted() -> None:
    agent_id, token = token_with(lambda t: "+" in t or "/" in t or "=" in t)
    quoted = quote(token, safe="")
    assert quoted != token
    assert decrypt_agent_id(KEY, quoted) == agent_id


def test_plus_turned_into_space_by_query_parsing_is_accepted() -> None:
    agent_id, token = token_with(lambda t: "+" in t[1:-1])
    query_value = parse_qs(f"token={token}")["token"][0]  # "+" unquoted: becomes " "
    assert " " in query_value
    assert decrypt_agent_id(KEY, query_value) == agent_id


def test_leading_plus_turned_into_space_is_accepted() -> None:
    agent_id, token = token_with(lambda t: t.startswith("+"))
    assert decrypt_agent_id(KEY, " " + token[1:]) == agent_id


@pytest.mark.parametrize("wrap", ["{}\n", "\t{}\r\n", "  {}  ", "{} "])
def test_surrounding_whitespace_is_stripped(wrap: str) -> None:
    agent_id, token = token_with(lambda t: not t.startswith("+") and t.endswith("="))
    assert decrypt_agent_id(KEY, wrap.format(token)) == agent_id


def test_missing_base64_padding_is_tolerated() -> None:
    token = encrypt_token(KEY, "pad")
    assert token.endswith("=")
    assert decrypt_agent_id(KEY, token.rstrip("=")) == "pad"


# --- Every rejection reason -----------------------------------------------------------------


def encrypted_payload(payload: bytes) -> str:
    return raw_encrypt(pad_key(KEY), payload)


REJECTIONS = [
    ("", REASON_MISSING),
    ("   ", REASON_MISSING),
    ("\n", REASON_MISSING),
    ("not base64!", REASON_NOT_BASE64),
    ("abc$def", REASON_NOT_BASE64),
    ("ünïcode", REASON_NOT_BASE64),
    (base64.b64encode(b"short").decode(), REASON_WRONG_KEY),
    (base64.b64encode(b"x" * 17).decode(), REASON_WRONG_KEY),
    (encrypt_token("another key entirely", "agent"), REASON_WRONG_KEY),
    (encrypted_payload(b"not json"), REASON_NOT_JSON),
    (encrypted_payload(b"\xff\xfe{}"), REASON_NOT_JSON),
    (encrypted_payload(b'{"agent": "x"}'), REASON_NO_AGENT_ID),
    (encrypted_payload(b'{"agentId": ""}'), REASON_NO_AGENT_ID),
    (encrypted_payload(b'{"agentId": null}'), REASON_NO_AGENT_ID),
    (encrypted_payload(b'["agentId", "x"]'), REASON_NO_AGENT_ID),
    (encrypted_payload(b'"agentId"'), REASON_NO_AGENT_ID),
    (encrypted_payload(b'{"agentId": 42}'), REASON_AGENT_ID_NOT_STRING),
    (encrypted_payload(b'{"agentId": ["x"]}'), REASON_AGENT_ID_NOT_STRING),
]


@pytest.mark.parametrize(("token", "reason"), REJECTIONS)
def test_rejections_carry_a_short_reason_without_secrets(token: str, reason: str) -> None:
    with pytest.raises(AuthError) as caught:
        decrypt_agent_id(KEY, token)
    assert caught.value.reason == reason
    assert str(caught.value) == reason
    assert len(reason.encode("utf-8")) <= 100
    assert reason.isascii()
    assert KEY not in reason
    assert token.strip() == "" or token.strip() not in reason


def test_every_reason_is_exercised() -> None:
    reasons = {
        REASON_MISSING,
        REASON_NOT_BASE64,
        REASON_WRONG_KEY,
        REASON_NOT_JSON,
        REASON_NO_AGENT_ID,
        REASON_AGENT_ID_NOT_STRING,
    }
    assert {reason for _, reason in REJECTIONS} == reasons


def test_reason_longer_than_100_bytes_is_refused() -> None:
    AuthError("x" * 100)
    with pytest.raises(ValueError, match="100 bytes"):
        AuthError("é" * 51)


# --- The authenticator hook -----------------------------------------------------------------


def test_endpoint_values() -> None:
    assert Endpoint.TOOL.value == "tool"
    assert Endpoint.CALLER.value == "caller"
    assert Endpoint("caller") is Endpoint.CALLER


@pytest.mark.parametrize("endpoint", list(Endpoint))
def test_aes_authenticator_accepts_the_same_token_on_both_endpoints(endpoint: Endpoint) -> None:
    authenticate: Authenticator = AesTokenAuthenticator(KEY)
    assert authenticate(encrypt_token(KEY, "agent-1"), endpoint) == "agent-1"


def test_aes_authenticator_rejects_with_auth_error() -> None:
    authenticate = AesTokenAuthenticator(KEY)
    with pytest.raises(AuthError):
        authenticate(encrypt_token("other key", "agent-1"), Endpoint.TOOL)


def test_aes_authenticator_is_frozen_and_hides_its_key() -> None:
    authenticate = AesTokenAuthenticator(KEY)
    assert KEY not in repr(authenticate)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        authenticate.key = "changed"  # type: ignore[misc]


# --- URLs -----------------------------------------------------------------------------------


def test_tool_and_caller_urls() -> None:
    agent_id, token = token_with(lambda t: "+" in t and "/" in t)
    for build, path in ((tool_url, "/mcp_endpoint/mcp/"), (caller_url, "/mcp_endpoint/call/")):
        url = build("ws://192.168.1.2:8004", KEY, agent_id)
        parts = urlsplit(url)
        assert (parts.scheme, parts.netloc, parts.path) == ("ws", "192.168.1.2:8004", path)
        assert parts.query == f"token={quote(token, safe='')}"
        assert not {"+", "/", "="} & set(parts.query.removeprefix("token="))
        # What a server's query parser gets back is the plain token.
        assert parse_qs(parts.query)["token"] == [token]


def test_urls_tolerate_a_trailing_slash_on_the_base() -> None:
    assert tool_url("ws://h:1/", KEY, "a") == tool_url("ws://h:1", KEY, "a")
    assert tool_url("ws://h:1", KEY, "a").startswith("ws://h:1/mcp_endpoint/mcp/?token=")


def test_md5_urls() -> None:
    url = caller_url("ws://h:1", KEY, "agent", md5=True)
    token = parse_qs(urlsplit(url).query)["token"][0]
    assert decrypt_agent_id(KEY, token) == hashlib.md5(b"agent").hexdigest()


def test_health_url_quotes_the_key() -> None:
    assert health_url("http://10.0.0.1:8004", KEY) == (
        f"http://10.0.0.1:8004/mcp_endpoint/health?key={KEY}"
    )
    url = health_url("http://h:1", "a&b=c+d/é")
    assert parse_qs(urlsplit(url).query)["key"] == ["a&b=c+d/é"]


# --- Redaction ------------------------------------------------------------------------------


def test_redact_keeps_at_most_four_characters() -> None:
    assert redact(KEY) == "0123…"
    token = encrypt_token(KEY, "agent")
    assert redact(token) == token[:4] + "…"


@pytest.mark.parametrize("secret", ["", "a", "abcd", "abcdefgh", "abcdefghijklmno"])
def test_redact_never_shows_most_of_a_short_secret(secret: str) -> None:
    shown = redact(secret).removesuffix("…")
    assert redact(secret).endswith("…")
    assert len(shown) <= min(4, len(secret) // 4)
    assert secret.startswith(shown)


# --- Properties -----------------------------------------------------------------------------


@given(key=st.text(), agent_id=st.text(min_size=1))
def test_round_trip_property(key: str, agent_id: str) -> None:
    token = encrypt_token(key, agent_id)
    assert decrypt_agent_id(key, token) == agent_id
    assert AesTokenAuthenticator(key)(token, Endpoint.CALLER) == agent_id


@given(key=st.text(min_size=1), agent_id=st.text(min_size=1))
def test_round_trip_through_a_url_property(key: str, agent_id: str) -> None:
    url = tool_url("ws://h:1", key, agent_id)
    token = parse_qs(urlsplit(url).query)["token"][0]
    assert decrypt_agent_id(key, token) == agent_id


@given(key=st.text(), agent_id=st.text())
def test_md5_round_trip_property(key: str, agent_id: str) -> None:
    token = encrypt_token(key, agent_id, md5=True)
    assert decrypt_agent_id(key, token) == hashlib.md5(agent_id.encode()).hexdigest()


@given(key=st.text(), token=st.text())
def test_arbitrary_tokens_never_raise_anything_but_auth_error(key: str, token: str) -> None:
    try:
        decrypt_agent_id(key, token)
    except AuthError as exc:
        assert len(exc.reason.encode()) <= 100


def test_redacting_filter_hides_tokens_and_keys_in_any_record() -> None:
    token = encrypt_token(KEY, "agent")
    record = logging.LogRecord(
        "lib",
        logging.INFO,
        __file__,
        1,
        "GET /mcp_endpoint/call/?token=%s then key=%s",
        (token, KEY),
        None,
    )
    assert RedactingFilter().filter(record)
    message = record.getMessage()
    assert token not in message and KEY not in message
    assert "token=" in message and "key=" in message


def test_redacting_filter_leaves_other_records_alone() -> None:
    record = logging.LogRecord(
        "lib", logging.INFO, __file__, 1, "agent %s connected", ("a1",), None
    )
    assert RedactingFilter().filter(record)
    assert record.msg == "agent %s connected" and record.args == ("a1",)
