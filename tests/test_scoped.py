"""Scoped tokens and the relay's authenticator: roles, expiry, rotation, tampering, and the
words xiaozhi-server refuses in endpoint URLs. Pure: no sockets, no Trio."""

from __future__ import annotations

import base64
import json
import string
from urllib.parse import quote, unquote

import pytest
import trio
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given
from hypothesis import strategies as st

from trio_mcp_relay._auth import (
    REASON_CALLER_ON_TOOL,
    REASON_REFERENCE_REFUSED,
    REASON_TOOL_ON_CALLER,
    REASON_WRONG_KEY,
    AuthError,
    Endpoint,
    Grant,
    TokenAuthenticator,
    authenticate,
    caller_url,
    encrypt_token,
    endpoint_url,
    key_matches,
    scoped_token,
    tool_url,
)
from trio_mcp_relay._scoped import (
    PREFIX,
    REASON_EXPIRED,
    REASON_FORGED,
    REASON_MALFORMED,
    REASON_UNKNOWN_KEY,
    Claims,
    ScopedTokenError,
    TokenRole,
    key_id,
    mint_scoped,
    verify_scoped,
    xiaozhi_safe,
)

KEY = "0123456789abcdef0123456789abcdef"
OLD_KEY = "fedcba9876543210fedcba9876543210"
NOW = 1_800_000_000.0


def reference_decrypt(key: str, token: str) -> str:
    """The reference server's algorithm, written out independently of the module under test:
    AES-ECB, PKCS#7, the key's UTF-8 bytes used as is when 16, 24 or 32 long and otherwise
    zero-padded or cut to 32, standard base64; then json.loads and ``agentId``."""
    raw_key = key.encode("utf-8")
    if len(raw_key) not in (16, 24, 32):
        raw_key = raw_key[:32] + b"\0" * max(0, 32 - len(raw_key))
    decryptor = Cipher(algorithms.AES(raw_key), modes.ECB()).decryptor()
    padded = decryptor.update(base64.b64decode(token, validate=True)) + decryptor.finalize()
    pad = padded[-1]
    assert 1 <= pad <= 16 and padded.endswith(bytes([pad]) * pad)
    agent = json.loads(padded[:-pad].decode("utf-8"))["agentId"]
    assert isinstance(agent, str)
    return agent


def authenticator(*keys: str, accept_reference: bool = True) -> TokenAuthenticator:
    return TokenAuthenticator(keys or (KEY,), accept_reference=accept_reference, clock=lambda: NOW)


def reason(call: object) -> str:
    with pytest.raises(AuthError) as caught:
        call()  # type: ignore[operator]
    return caught.value.reason


# ----------------------------------------------------------------------------- roles


@pytest.mark.parametrize(
    ("role", "endpoint", "refusal"),
    [
        (TokenRole.TOOL, Endpoint.TOOL, None),
        (TokenRole.TOOL, Endpoint.CALLER, REASON_TOOL_ON_CALLER),
        (TokenRole.CALLER, Endpoint.CALLER, None),
        (TokenRole.CALLER, Endpoint.TOOL, REASON_CALLER_ON_TOOL),
        (TokenRole.BOTH, Endpoint.TOOL, None),
        (TokenRole.BOTH, Endpoint.CALLER, None),
    ],
)
def test_a_role_opens_only_its_endpoints(
    role: TokenRole, endpoint: Endpoint, refusal: str | None
) -> None:
    token = scoped_token(KEY, "agent", role)
    check = authenticator()
    if refusal is None:
        assert check(token, endpoint) == Grant("agent", role, scheme="scoped", key_index=0)
    else:
        assert reason(lambda: check(token, endpoint)) == refusal


def test_expiry_is_checked_against_the_clock() -> None:
    token = scoped_token(KEY, "agent", TokenRole.TOOL, expires_in=60, now=NOW)
    grant = TokenAuthenticator((KEY,), clock=lambda: NOW + 59.5)(token, Endpoint.TOOL)
    assert grant.expires == NOW + 60
    late = TokenAuthenticator((KEY,), clock=lambda: NOW + 60)
    assert reason(lambda: late(token, Endpoint.TOOL)) == REASON_EXPIRED


def test_expiry_rounds_up_to_a_whole_second() -> None:
    token = scoped_token(KEY, "a", TokenRole.TOOL, expires_in=1.2, now=NOW + 0.5)
    assert verify_scoped([KEY], token, now=NOW)[0].expires == NOW + 2


def test_server_id_is_carried() -> None:
    token = scoped_token(KEY, "agent", TokenRole.TOOL, server_id="kitchen")
    assert authenticator()(token, Endpoint.TOOL).server_id == "kitchen"


def test_reference_tokens_open_both_endpoints_unless_refused() -> None:
    token = encrypt_token(KEY, "legacy")
    for endpoint in Endpoint:
        assert authenticator()(token, endpoint) == Grant("legacy", key_index=0)
    strict = authenticator(accept_reference=False)
    assert reason(lambda: strict(token, Endpoint.TOOL)) == REASON_REFERENCE_REFUSED
    # Scoped tokens still work when reference ones are refused.
    assert strict(scoped_token(KEY, "new", TokenRole.BOTH), Endpoint.TOOL).agent == "new"


def test_scoped_tokens_survive_quoting_and_pasting() -> None:
    token = scoped_token(KEY, "agent", TokenRole.TOOL)
    assert quote(token, safe="") == token  # nothing to quote
    for mangled in (f" {token}\n", quote(quote(token, safe="") + "%", safe="")[:-3]):
        assert authenticator()(mangled, Endpoint.TOOL).agent == "agent"


# ----------------------------------------------------------------------------- rotation


def test_rotation_old_key_works_while_listed_and_not_after() -> None:
    old_scoped = scoped_token(OLD_KEY, "agent", TokenRole.TOOL)
    old_reference = encrypt_token(OLD_KEY, "agent")
    rotated = authenticator(KEY, OLD_KEY)
    assert rotated(old_scoped, Endpoint.TOOL).key_index == 1
    assert rotated(old_reference, Endpoint.TOOL).key_index == 1
    assert rotated(scoped_token(KEY, "agent", TokenRole.TOOL), Endpoint.TOOL).key_index == 0
    retired = authenticator(KEY)
    assert reason(lambda: retired(old_scoped, Endpoint.TOOL)) == REASON_UNKNOWN_KEY
    assert reason(lambda: retired(old_reference, Endpoint.TOOL)) == REASON_WRONG_KEY


def test_key_ids_differ_and_reveal_nothing_obvious() -> None:
    assert key_id(KEY) != key_id(OLD_KEY)
    assert len(key_id(KEY)) == 4
    assert KEY.encode()[:4] != key_id(KEY)


def test_health_keys_match_any_listed_key_and_nothing_else() -> None:
    keys = (KEY, OLD_KEY)
    assert key_matches(KEY, keys) and key_matches(OLD_KEY, keys)
    for wrong in ("", KEY[:-1], KEY + "0", KEY.upper(), "ключ"):
        assert not key_matches(wrong, keys)


# ----------------------------------------------------------------------------- refusals


def test_every_scoped_refusal_reason() -> None:
    # An agent id whose token ends in a character with unused low bits (length not 0 mod 3).
    agent = next(a for a in ("a", "ab", "abc") if len(scoped_token(KEY, a, TokenRole.TOOL)) % 4)
    token = scoped_token(KEY, agent, TokenRole.TOOL)
    body = token.removeprefix(PREFIX)
    alphabet = string.ascii_uppercase + string.ascii_lowercase + string.digits + "-_"
    # The same bytes spelled with a nonzero unused bit: lenient decoders accept it.
    loose = token[:-1] + alphabet[alphabet.index(token[-1]) | 1]
    cases = {
        PREFIX: REASON_MALFORMED,
        PREFIX + "!!!!": REASON_MALFORMED,
        PREFIX + "AAAAA": REASON_MALFORMED,  # 5 characters: no base64 has that length
        PREFIX + "A" * 40: REASON_MALFORMED,  # too short to hold a token
        loose: REASON_MALFORMED,
        scoped_token(OLD_KEY, agent, TokenRole.TOOL): REASON_UNKNOWN_KEY,
    }
    raw = bytearray(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    raw[-1] ^= 1  # the tag
    cases[PREFIX + base64.urlsafe_b64encode(raw).rstrip(b"=").decode()] = REASON_FORGED
    for bad, expected in cases.items():
        assert reason(lambda bad=bad: authenticator()(bad, Endpoint.TOOL)) == expected, bad
    for text in (*cases.values(), REASON_CALLER_ON_TOOL, REASON_TOOL_ON_CALLER):
        assert len(text.encode()) <= 100


def test_claims_are_validated_when_minting() -> None:
    for claims in (
        Claims("", TokenRole.TOOL),
        Claims("a", TokenRole.TOOL, server_id=""),
        Claims("a" * 70000, TokenRole.TOOL),
        Claims("a", TokenRole.TOOL, expires=0),
    ):
        with pytest.raises(ValueError):
            mint_scoped(KEY, claims)
    with pytest.raises(ValueError):
        scoped_token(KEY, "a", TokenRole.TOOL, expires_in=0)


def test_role_labels() -> None:
    assert [role.label for role in TokenRole] == ["tool", "caller", "both"]
    assert TokenRole.from_label("Caller") is TokenRole.CALLER
    with pytest.raises(ValueError, match="not a role"):
        TokenRole.from_label("admin")


# ----------------------------------------------------------------------------- properties

agents = st.text(min_size=1, max_size=80)
roles = st.sampled_from(list(TokenRole))
server_ids = st.none() | st.text(min_size=1, max_size=40)
expiries = st.none() | st.integers(int(NOW) + 1, 2**40)


@given(key=st.text(min_size=1), agent=agents, role=roles, server=server_ids, expires=expiries)
def test_round_trip_of_every_field(
    key: str, agent: str, role: TokenRole, server: str | None, expires: int | None
) -> None:
    claims = Claims(agent, role, server, expires)
    token = mint_scoped(key, claims)
    assert token.startswith(PREFIX)
    assert xiaozhi_safe(token)
    assert verify_scoped(["another key", key], token, now=NOW) == (claims, 1)


@st.composite
def tampered(draw: st.DrawFn) -> tuple[str, str]:
    """A valid token and a copy with one character replaced, inserted or deleted."""
    token = mint_scoped(KEY, Claims(draw(agents), draw(roles), draw(server_ids), draw(expiries)))
    position = draw(st.integers(0, len(token) - 1))
    alphabet = string.ascii_letters + string.digits + "-_.=+/%"
    kind = draw(st.sampled_from(["replace", "insert", "delete"]))
    if kind == "delete":
        return token, token[:position] + token[position + 1 :]
    char = draw(st.sampled_from(alphabet).filter(lambda c: c != token[position]))
    if kind == "insert":
        return token, token[:position] + char + token[position:]
    return token, token[:position] + char + token[position + 1 :]


@given(tampered())
def test_changing_any_character_of_a_scoped_token_is_refused(pair: tuple[str, str]) -> None:
    _, bad = pair
    check = authenticator()
    for endpoint in Endpoint:
        with pytest.raises(AuthError):
            check(bad, endpoint)


@given(
    agent=agents,
    role=roles,
    server=server_ids,
    data=st.data(),
)
def test_changing_any_byte_of_a_scoped_token_is_refused(
    agent: str, role: TokenRole, server: str | None, data: st.DataObject
) -> None:
    # Byte level: the base64 stays well formed, so this reaches the key id and the GCM tag.
    token = mint_scoped(KEY, Claims(agent, role, server))
    body = token.removeprefix(PREFIX)
    raw = bytearray(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    index = data.draw(st.integers(0, len(raw) - 1), label="index")
    raw[index] ^= data.draw(st.integers(1, 255), label="xor")
    bad = PREFIX + base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
    with pytest.raises(ScopedTokenError):
        verify_scoped([KEY], bad, now=NOW)
    with pytest.raises(AuthError):
        authenticator()(bad, Endpoint.TOOL)


@given(token=st.text(max_size=200))
def test_arbitrary_text_is_refused_with_auth_error_only(token: str) -> None:
    for check in (authenticator(), authenticator(accept_reference=False)):
        try:
            check(token, Endpoint.CALLER)
        except AuthError as exc:
            assert len(exc.reason.encode()) <= 100


# ----------------------------------------------------------------------------- xiaozhi


def test_ten_thousand_agents_in_both_schemes_never_spell_key_or_call() -> None:
    """xiaozhi-server refuses an endpoint URL containing ``key`` or ``call`` anywhere."""
    reference_rewritten = 0
    for number in range(10_000):
        agent = f"agent-{number}"
        reference = encrypt_token(KEY, agent)
        scoped = scoped_token(KEY, agent, TokenRole.TOOL)
        for token in (reference, scoped, quote(reference, safe="")):
            lowered = token.lower()
            assert "key" not in lowered and "call" not in lowered, (agent, token)
        for url in (
            tool_url("ws://h:1", KEY, agent),
            endpoint_url("ws://h:1", Endpoint.TOOL, scoped),
        ):
            assert xiaozhi_safe(url.split("?", 1)[1])
        assert reference_decrypt(KEY, reference) == agent
        assert reference_decrypt(KEY, unquote(caller_url("ws://h:1", KEY, agent).split("=")[1]))
        if base64.b64decode(reference) != _manager_api_ciphertext(agent):
            reference_rewritten += 1
    # Some manager-api spellings do spell a forbidden word: the other spellings are used then.
    assert 0 < reference_rewritten < 100


def _manager_api_ciphertext(agent: str) -> bytes:
    plain = json.dumps({"agentId": agent}).encode()
    pad = 16 - len(plain) % 16
    encryptor = Cipher(algorithms.AES(KEY.encode()), modes.ECB()).encryptor()
    return encryptor.update(plain + bytes([pad]) * pad) + encryptor.finalize()


@given(key=st.text(min_size=1, max_size=40), agent=st.text(min_size=1, max_size=60))
def test_reference_tokens_never_spell_key_or_call_and_decrypt_the_reference_way(
    key: str, agent: str
) -> None:
    token = encrypt_token(key, agent)
    assert xiaozhi_safe(token)
    assert reference_decrypt(key, token) == agent


# ----------------------------------------------------------------------------- the hook


async def test_authenticate_normalises_every_kind_of_authenticator() -> None:
    grant = Grant("g", TokenRole.TOOL, server_id="s", scheme="scoped")

    async def async_str(token: str, endpoint: Endpoint) -> str:
        return "async-agent"

    async def async_grant(token: str, endpoint: Endpoint) -> Grant:
        return grant

    with trio.fail_after(5):
        assert await authenticate(lambda t, e: "plain", "t", Endpoint.TOOL) == Grant(
            "plain", scheme="custom"
        )
        assert (await authenticate(async_str, "t", Endpoint.CALLER)).agent == "async-agent"
        assert await authenticate(async_grant, "t", Endpoint.TOOL) is grant
        assert await authenticate(lambda t, e: grant, "t", Endpoint.TOOL) is grant
        for answer in ("", None, 5, Grant("")):
            with pytest.raises(AuthError, match="no agentId"):
                await authenticate(lambda t, e, a=answer: a, "t", Endpoint.TOOL)  # type: ignore[misc]
        with pytest.raises(AuthError, match="missing token"):
            await authenticate(lambda t, e: "never asked", "", Endpoint.TOOL)
