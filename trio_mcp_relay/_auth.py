"""Tokens: the reference server's AES-ECB scheme, scoped tokens, and the authenticator hook.

Two token schemes are accepted side by side, told apart by their first characters:

* **Reference tokens**, ``base64(AES-ECB-PKCS7(key_bytes, '{"agentId": "<id>"}'))``, URL-quoted
  when they travel in a query string. The key bytes are the server key's UTF-8 encoding, used
  as is when it is 16, 24 or 32 bytes long (AES-128/192/256) and otherwise zero-padded or cut
  to 32 bytes. The same token opens both endpoints of an agent and never expires. ECB and a
  bare key are the reference's choices, kept for wire compatibility: every device and
  manager-api keep working. :class:`TokenAuthenticator` can be told to refuse them.
* **Scoped tokens**, ``st1.…`` (see ``_scoped.py``): authenticated, limited to a role (tool,
  caller or both), optionally to a ``server_id`` and a lifetime.

Several server keys may be configured (rotation): the first one makes new tokens, and a token
made with any of them is accepted, so a key can be retired once its tokens are replaced.

Every token this module mints is free of ``key`` and ``call`` in any letter case, because
xiaozhi-server refuses an endpoint URL containing either. A reference token's ciphertext is
fixed by its plaintext, so :func:`encrypt_token` picks, among JSON texts that parse to the same
payload (they differ in insignificant whitespace), the first whose token qualifies; the first
candidate is manager-api's own spelling, so most tokens are byte for byte what it makes.

Anything that needs another scheme can plug in its own :data:`Authenticator`.

Nothing in this module logs, and no :class:`AuthError` reason ever contains the token or the
key: use :func:`redact` when a secret has to appear in a log line.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import inspect
import itertools
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from typing import Final, TypeAlias
from urllib.parse import quote, unquote

import attrs
from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from ._scoped import (
    Claims,
    ScopedTokenError,
    TokenRole,
    is_scoped,
    mint_scoped,
    verify_scoped,
    xiaozhi_safe,
)

__all__ = [
    "AesTokenAuthenticator",
    "AuthError",
    "Authenticator",
    "Claims",
    "Endpoint",
    "Grant",
    "TokenAuthenticator",
    "TokenRole",
    "authenticate",
    "caller_url",
    "decrypt_agent_id",
    "encrypt_token",
    "endpoint_url",
    "health_url",
    "key_matches",
    "mint_scoped",
    "pad_key",
    "redact",
    "scoped_token",
    "tool_url",
    "xiaozhi_safe",
]

_AES_KEY_SIZES = frozenset({16, 24, 32})
_PADDED_KEY_SIZE = 32
_BLOCK_BITS = 128
_BLOCK_BYTES = _BLOCK_BITS // 8
_MAX_REASON_BYTES = 100

TOOL_PATH = "/mcp_endpoint/mcp/"
CALLER_PATH = "/mcp_endpoint/call/"
HEALTH_PATH = "/mcp_endpoint/health"


class AuthError(Exception):
    """A token was rejected.

    Args:
        reason: A short English explanation, at most 100 bytes of UTF-8, fit to be sent as a
            WebSocket close reason. It never contains the token or the key.

    Attributes:
        reason: The explanation given at construction.
    """

    def __init__(self, reason: str) -> None:
        if len(reason.encode("utf-8")) > _MAX_REASON_BYTES:
            raise ValueError(f"AuthError reason is longer than {_MAX_REASON_BYTES} bytes")
        super().__init__(reason)
        self.reason = reason


# Every reason decrypt_agent_id can give, so callers and tests can refer to them by name.
REASON_MISSING = "missing token"
REASON_NOT_BASE64 = "token is not valid base64"
REASON_WRONG_KEY = "token does not decrypt with this server's key"
REASON_NOT_JSON = "token payload is not JSON"
REASON_NO_AGENT_ID = "token has no agentId"
REASON_AGENT_ID_NOT_STRING = "token agentId is not a string"
REASON_REFERENCE_REFUSED = "reference tokens are refused here: use a scoped token"
REASON_CALLER_ON_TOOL = "a caller token cannot open the tool endpoint"
REASON_TOOL_ON_CALLER = "a tool token cannot open the caller endpoint"


class Endpoint(enum.Enum):
    """Which WebSocket endpoint a token was presented on."""

    TOOL = "tool"
    """``/mcp_endpoint/mcp/``: an MCP server dialling in to offer tools."""

    CALLER = "caller"
    """``/mcp_endpoint/call/``: an MCP client that calls the agent's tools."""


@attrs.frozen
class Grant:
    """What an accepted token grants.

    Attributes:
        agent: The agent id.
        role: The endpoints the token opens (``BOTH`` for reference tokens).
        server_id: The tool server the token is bound to, or None (reference tokens, and
            scoped tokens minted without one).
        expires: Unix time after which the token stops working, or None.
        scheme: ``"reference"`` or ``"scoped"``.
        key_index: Which configured key accepted it (0 is the current signing key; more means
            a key kept for rotation), or None when an authenticator did not say.
    """

    agent: str
    role: TokenRole = TokenRole.BOTH
    server_id: str | None = None
    expires: int | None = None
    scheme: str = "reference"
    key_index: int | None = None


Authenticator: TypeAlias = Callable[
    [str, Endpoint], str | Grant | Awaitable[str] | Awaitable[Grant]
]
"""Turns a token presented on an endpoint into an agent id.

It may be a plain function or a coroutine function. It returns the agent id as a ``str`` (as
it always could) or, to say more, a :class:`Grant` (the relay then also knows the token's
``server_id``, role and expiry; :func:`authenticate` turns either into a :class:`Grant`). It
raises :class:`AuthError` to reject the token; the relay then closes the connection with 1008
and the error's ``reason``. The token is passed exactly as it came out of the query string
(already URL-decoded once).
"""


async def authenticate(authenticator: Authenticator, token: str, endpoint: Endpoint) -> Grant:
    """Run any :data:`Authenticator` and normalise its answer: what the server calls.

    Args:
        authenticator: A plain or async authenticator returning a ``str`` or a :class:`Grant`.
        token: The ``token`` query parameter.
        endpoint: Where it was presented.

    Returns:
        The grant; a bare agent id becomes ``Grant(agent)`` (role ``BOTH``, no server id).

    Raises:
        AuthError: The token is missing, refused, or named no agent.
    """
    if not token:
        raise AuthError(REASON_MISSING)
    answer: object = authenticator(token, endpoint)
    if inspect.isawaitable(answer):
        answer = await answer
    if isinstance(answer, Grant):
        if not answer.agent:
            raise AuthError(REASON_NO_AGENT_ID)
        return answer
    if not isinstance(answer, str) or not answer:
        raise AuthError(REASON_NO_AGENT_ID)
    return Grant(answer, scheme="custom")


def pad_key(key: str) -> bytes:
    """Turn a server key string into AES key bytes the way the reference does.

    Args:
        key: The server key.

    Returns:
        The key's UTF-8 bytes when they are 16, 24 or 32 bytes long; otherwise those bytes
        zero-padded, or cut, to 32 bytes.
    """
    raw = key.encode("utf-8")
    if len(raw) in _AES_KEY_SIZES:
        return raw
    return raw[:_PADDED_KEY_SIZE].ljust(_PADDED_KEY_SIZE, b"\0")


def _cipher(key: str) -> Cipher[modes.ECB]:
    # ECB is the reference's wire format, not a choice made here (see the module docstring).
    return Cipher(algorithms.AES(pad_key(key)), modes.ECB())


def encrypt_token(key: str, agent_id: str, *, md5: bool = False) -> str:
    """Make the token that names ``agent_id`` on a server with ``key``.

    Args:
        key: The server key.
        agent_id: The agent the token stands for.
        md5: Put ``md5(agent_id)`` (32 lowercase hex digits) in the token instead of the id
            itself, as xiaozhi manager-api does for its console agents.

    Returns:
        The token as plain base64, not URL-quoted: quote it before putting it in a URL, or use
        :func:`tool_url` and :func:`caller_url`.
    """
    if md5:
        agent_id = hashlib.md5(agent_id.encode("utf-8")).hexdigest()
    cipher = _cipher(key)
    for plaintext in _payload_spellings(agent_id):
        padder = padding.PKCS7(_BLOCK_BITS).padder()
        padded = padder.update(plaintext) + padder.finalize()
        encryptor = cipher.encryptor()
        ciphertext = encryptor.update(padded) + encryptor.finalize()
        token = base64.b64encode(ciphertext).decode("ascii")
        # Quoting for a URL adds only "%", digits and B, D, F: it can neither make nor break
        # a forbidden word, so checking the plain token is enough.
        if xiaozhi_safe(token):
            return token
    raise AssertionError("unreachable: the spellings never run out")


def _payload_spellings(agent_id: str) -> Iterator[bytes]:
    """JSON texts of ``{"agentId": agent_id}``, all parsing to the same object, without end.

    The first is manager-api's ``{"agentId": "<id>"}`` (json.dumps' default separators, which
    also escape quotes, backslashes and control characters in odd ids). The others put
    insignificant spaces in the four places JSON allows inside this object (after ``{``,
    around ``:``, before ``}``), fewest first; spaces after ``{`` shift every block, so each
    spelling gives a wholly different ciphertext.
    """
    value = json.dumps(agent_id)
    canonical = (0, 0, 1, 0)
    yield _spelled(value, canonical)
    for total in itertools.count():
        for first in range(total + 1):
            for second in range(total - first + 1):
                for third in range(total - first - second + 1):
                    spaces = (first, second, third, total - first - second - third)
                    if spaces != canonical:
                        yield _spelled(value, spaces)


def _spelled(value: str, spaces: tuple[int, int, int, int]) -> bytes:
    a, b, c, d = (" " * n for n in spaces)
    return f'{{{a}"agentId"{b}:{c}{value}{d}}}'.encode()


def _token_candidates(token: str) -> list[str]:
    """Spellings the token may have had before it was mangled on the way here."""
    # A token URL-quoted once more than the query parser undid: "%2B" for "+", "%3D" for "=".
    # Base64 has no "%", so unquoting never damages a real token.
    if "%" in token:
        token = unquote(token)
    # Tab, CR and LF are never part of a token: trailing ones come from copy and paste.
    token = token.strip("\t\r\n\v\f")
    # An unquoted "+" in a query string reaches us as a space. A leading or trailing space is
    # either such a "+" or a pasted blank; try the "+" reading first, then the blank one.
    candidates = [token.replace(" ", "+")]
    stripped = token.strip(" ").replace(" ", "+")
    if stripped != candidates[0]:
        candidates.append(stripped)
    return candidates


def _b64decode(text: str) -> bytes | None:
    # Tolerate URL-safe base64 and missing "=" padding; reject anything else.
    text = text.replace("-", "+").replace("_", "/")
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def decrypt_agent_id(key: str | Sequence[str], token: str) -> str:
    """Find the agent id a token stands for.

    The token may still be URL-quoted, or have had its ``+`` turned into spaces by a query
    string parser; both are undone. The payload is parsed as JSON, so the spacing of the
    plaintext does not matter (the reference writes ``{"agentId":"x"}``, manager-api
    ``{"agentId": "x"}``).

    Args:
        key: The server key, or several (rotation): each is tried in turn.
        token: The token from the ``token`` query parameter.

    Returns:
        The ``agentId`` in the token: a non-empty string.

    Raises:
        AuthError: The token is missing, is not base64, does not decrypt with ``key``, or does
            not hold a JSON object with a non-empty string ``agentId``.
    """
    keys = [key] if isinstance(key, str) else list(key)
    return _decrypt_with_any(keys, token)[0]


def _decrypt_with_any(keys: Sequence[str], token: str) -> tuple[str, int]:
    """The agent id and the index of the key it decrypts with; the first key's reason when
    none does (a wrong key is the likeliest explanation, and it is the same for every key)."""
    first: AuthError | None = None
    for index, key in enumerate(keys):
        try:
            return _decrypt_one(key, token), index
        except AuthError as exc:
            if exc.reason in (REASON_MISSING, REASON_NOT_BASE64):
                raise  # the same for every key
            first = first or exc
    raise first or AuthError(REASON_WRONG_KEY)


def _decrypt_one(key: str, token: str) -> str:
    if not token.strip():
        raise AuthError(REASON_MISSING)
    candidates = _token_candidates(token)
    decoded = [raw for raw in map(_b64decode, candidates) if raw is not None]
    if not decoded:
        raise AuthError(REASON_NOT_BASE64)
    blocks = [raw for raw in decoded if raw and len(raw) % _BLOCK_BYTES == 0]
    if not blocks:
        raise AuthError(REASON_WRONG_KEY)
    ciphertext = blocks[0]

    decryptor = _cipher(key).decryptor()
    padded = decryptor.update(ciphertext) + decryptor.finalize()
    unpadder = padding.PKCS7(_BLOCK_BITS).unpadder()
    try:
        plaintext = unpadder.update(padded) + unpadder.finalize()
    except ValueError:
        raise AuthError(REASON_WRONG_KEY) from None

    try:
        payload = json.loads(plaintext.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise AuthError(REASON_NOT_JSON) from None
    agent_id = payload.get("agentId") if isinstance(payload, dict) else None
    if agent_id is None or agent_id == "":
        raise AuthError(REASON_NO_AGENT_ID)
    if not isinstance(agent_id, str):
        raise AuthError(REASON_AGENT_ID_NOT_STRING)
    return agent_id


def redact(secret: str) -> str:
    """Shorten a key or token so that it can appear in a log line.

    Args:
        secret: The key or token.

    Returns:
        At most the first 4 characters followed by "…"; fewer for short secrets (one
        character per four, so that a short secret is never mostly shown).
    """
    return secret[: min(4, len(secret) // 4)] + "…"


_SECRET_IN_URL: Final = re.compile(r"(?i)\b(token|key)=([^&\s\"'<>]+)")


class RedactingFilter(logging.Filter):
    """A logging filter that redacts ``token=…`` and ``key=…`` in every record it sees.

    The relay never logs a secret on purpose; this is the safety net for messages it does
    not write itself (exceptions quoting a URL, a library's debug output). Install it on a
    handler, so it sees records from every logger.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = _SECRET_IN_URL.sub(lambda m: f"{m.group(1)}={redact(m.group(2))}", message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


@attrs.frozen
class AesTokenAuthenticator:
    """The reference server's authentication: the token must decrypt with the server key.

    The same token is valid on both endpoints, so ``endpoint`` is not consulted.

    Attributes:
        key: The server key. Its ``repr`` is redacted.
    """

    key: str = attrs.field(repr=redact)

    def __call__(self, token: str, endpoint: Endpoint) -> str:
        """Return the agent id for ``token``.

        Args:
            token: The token from the query string.
            endpoint: The endpoint the token was presented on.

        Returns:
            The agent id.

        Raises:
            AuthError: The token is not valid for this key.
        """
        return decrypt_agent_id(self.key, token)


def key_matches(given: str, keys: Sequence[str]) -> bool:
    """Whether ``given`` is one of ``keys``, compared in constant time (every key is compared,
    so the time says neither which key matched nor how much of one)."""
    given_bytes = given.encode("utf-8")
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given_bytes, key.encode("utf-8"))
    return matched and bool(given)


def _key_tuple(keys: Iterable[str]) -> tuple[str, ...]:
    return (keys,) if isinstance(keys, str) else tuple(keys)


@attrs.frozen
class TokenAuthenticator:
    """The relay's own authentication: scoped tokens, and reference tokens unless refused.

    Scoped tokens open only the endpoints of their role and stop working at their expiry.
    Reference tokens open both endpoints (they carry no role). With several keys, the first is
    the one :func:`scoped_token` and :func:`encrypt_token` should be given; tokens made with
    any of them are accepted (rotation).

    Attributes:
        keys: The server keys, the signing key first. Their ``repr`` is redacted.
        accept_reference: Accept reference-scheme tokens (the default: every existing device
            keeps working); False requires scoped tokens.
        clock: The current Unix time (tests replace it).
    """

    keys: tuple[str, ...] = attrs.field(converter=_key_tuple, repr=lambda k: f"({len(k)} keys)")
    accept_reference: bool = True
    clock: Callable[[], float] = attrs.field(default=time.time, repr=False)

    def __attrs_post_init__(self) -> None:
        if not self.keys:
            raise ValueError("TokenAuthenticator needs at least one key")

    def __call__(self, token: str, endpoint: Endpoint) -> Grant:
        """Check ``token`` for ``endpoint``.

        Args:
            token: The token from the query string.
            endpoint: The endpoint it was presented on.

        Returns:
            What the token grants.

        Raises:
            AuthError: The token is invalid, expired, refused for its scheme, or its role does
                not include ``endpoint``; the reason says which.
        """
        cleaned = token.strip(" \t\r\n\v\f")
        if "%" in cleaned:
            cleaned = unquote(cleaned)  # quoted once more than the query parser undid
        if is_scoped(cleaned):
            try:
                claims, index = verify_scoped(self.keys, cleaned, now=self.clock())
            except ScopedTokenError as exc:
                raise AuthError(exc.reason) from None
            if endpoint is Endpoint.TOOL and claims.role is TokenRole.CALLER:
                raise AuthError(REASON_CALLER_ON_TOOL)
            if endpoint is Endpoint.CALLER and claims.role is TokenRole.TOOL:
                raise AuthError(REASON_TOOL_ON_CALLER)
            return Grant(
                claims.agent, claims.role, claims.server_id, claims.expires, "scoped", index
            )
        if not token.strip():
            raise AuthError(REASON_MISSING)
        if not self.accept_reference:
            raise AuthError(REASON_REFERENCE_REFUSED)
        agent, index = _decrypt_with_any(self.keys, token)
        return Grant(agent, key_index=index)


def scoped_token(
    key: str,
    agent_id: str,
    role: TokenRole,
    *,
    expires_in: float | None = None,
    server_id: str | None = None,
    now: float | None = None,
) -> str:
    """Mint a scoped token (free of ``key`` and ``call``, URL-safe as it is).

    Args:
        key: The signing key (the first configured key).
        agent_id: The agent.
        role: The endpoints it opens.
        expires_in: Seconds from now until it stops working (rounded up to a whole second);
            None for never.
        server_id: Bind it to one tool server id, or None.
        now: The current Unix time; default ``time.time()``.

    Returns:
        The token.
    """
    expires = None
    if expires_in is not None:
        if not expires_in > 0:
            raise ValueError("expires_in must be positive")
        expires = int(-(-((time.time() if now is None else now) + expires_in) // 1))
    return mint_scoped(key, Claims(agent_id, role, server_id or None, expires))


def endpoint_url(base_ws: str, endpoint: Endpoint, token: str) -> str:
    """``<base_ws>/mcp_endpoint/mcp/?token=…`` (tool) or ``…/call/?token=…`` (caller).

    Args:
        base_ws: Scheme, host and port, e.g. ``ws://192.168.1.2:8004``.
        endpoint: Which endpoint.
        token: Any token; it is URL-quoted here.
    """
    path = TOOL_PATH if endpoint is Endpoint.TOOL else CALLER_PATH
    return _url(base_ws, path, "token", token)


def routing_hint(agent_id: str) -> str:
    """What cluster URLs carry as ``&route=``: the same for every URL of one agent (tool,
    caller, xiaozhi and mcp, whatever their tokens), so that a load balancer hashing on it
    sends an agent's connections to one node. 48 bits of BLAKE2s of the agent id: it does
    not reveal the agent."""
    return hashlib.blake2s(agent_id.encode(), digest_size=6).hexdigest()


def with_route(url: str, agent_id: str) -> str:
    """``url`` with the agent's :func:`routing_hint` (the relay ignores it)."""
    return f"{url}{'&' if '?' in url else '?'}route={routing_hint(agent_id)}"


def _url(base: str, path: str, param: str, value: str) -> str:
    return f"{base.rstrip('/')}{path}?{param}={quote(value, safe='')}"


def tool_url(base_ws: str, key: str, agent_id: str, *, md5: bool = False) -> str:
    """Build the URL a tool (an MCP server) dials for ``agent_id``.

    Args:
        base_ws: Scheme, host and port, e.g. ``ws://192.168.1.2:8004``.
        key: The server key.
        agent_id: The agent.
        md5: Use a manager-api style token (see :func:`encrypt_token`).

    Returns:
        ``<base_ws>/mcp_endpoint/mcp/?token=<URL-quoted token>``.
    """
    return _url(base_ws, TOOL_PATH, "token", encrypt_token(key, agent_id, md5=md5))


def caller_url(base_ws: str, key: str, agent_id: str, *, md5: bool = False) -> str:
    """Build the URL a caller (an MCP client) dials for ``agent_id``.

    Args:
        base_ws: Scheme, host and port, e.g. ``ws://192.168.1.2:8004``.
        key: The server key.
        agent_id: The agent.
        md5: Use a manager-api style token (see :func:`encrypt_token`).

    Returns:
        ``<base_ws>/mcp_endpoint/call/?token=<URL-quoted token>``.
    """
    return _url(base_ws, CALLER_PATH, "token", encrypt_token(key, agent_id, md5=md5))


def health_url(base_http: str, key: str) -> str:
    """Build the health-check URL, the one the xiaozhi console is given.

    Args:
        base_http: Scheme, host and port, e.g. ``http://192.168.1.2:8004``.
        key: The server key.

    Returns:
        ``<base_http>/mcp_endpoint/health?key=<URL-quoted key>``.
    """
    return _url(base_http, HEALTH_PATH, "key", key)
