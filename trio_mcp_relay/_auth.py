"""Tokens: the reference server's AES-ECB scheme, and the authenticator hook.

A token is ``base64(AES-ECB-PKCS7(key_bytes, '{"agentId": "<id>"}'))``, URL-quoted when it
travels in a query string. The key bytes are the server key's UTF-8 encoding, used as is when
it is 16, 24 or 32 bytes long (AES-128/192/256) and otherwise zero-padded or cut to 32 bytes.
The same token opens both endpoints of an agent.

ECB and a bare key are the reference's choices, kept for wire compatibility: a token is a
bearer secret that names an agent, not a confidential message. Anything that needs more can
plug in its own :data:`Authenticator`.

Nothing in this module logs, and no :class:`AuthError` reason ever contains the token or the
key: use :func:`redact` when a secret has to appear in a log line.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import json
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Final, TypeAlias
from urllib.parse import quote, unquote

import attrs
from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

__all__ = [
    "AesTokenAuthenticator",
    "AuthError",
    "Authenticator",
    "Endpoint",
    "caller_url",
    "decrypt_agent_id",
    "encrypt_token",
    "health_url",
    "pad_key",
    "redact",
    "tool_url",
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


class Endpoint(enum.Enum):
    """Which WebSocket endpoint a token was presented on."""

    TOOL = "tool"
    """``/mcp_endpoint/mcp/``: an MCP server dialling in to offer tools."""

    CALLER = "caller"
    """``/mcp_endpoint/call/``: an MCP client that calls the agent's tools."""


Authenticator: TypeAlias = Callable[[str, Endpoint], str | Awaitable[str]]
"""Turns a token presented on an endpoint into an agent id.

It may be a plain function or a coroutine function. It raises :class:`AuthError` to reject the
token; the relay then closes the connection with 1008 and the error's ``reason``. The token is
passed exactly as it came out of the query string (already URL-decoded once).
"""


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
    # json.dumps' default separators give the '{"agentId": "<id>"}' manager-api writes, and it
    # escapes quotes, backslashes and control characters in odd ids.
    plaintext = json.dumps({"agentId": agent_id}).encode("utf-8")
    padder = padding.PKCS7(_BLOCK_BITS).padder()
    padded = padder.update(plaintext) + padder.finalize()
    encryptor = _cipher(key).encryptor()
    ciphertext = encryptor.update(padded) + encryptor.finalize()
    return base64.b64encode(ciphertext).decode("ascii")


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


def decrypt_agent_id(key: str, token: str) -> str:
    """Find the agent id a token stands for.

    The token may still be URL-quoted, or have had its ``+`` turned into spaces by a query
    string parser; both are undone. The payload is parsed as JSON, so the spacing of the
    plaintext does not matter (the reference writes ``{"agentId":"x"}``, manager-api
    ``{"agentId": "x"}``).

    Args:
        key: The server key.
        token: The token from the ``token`` query parameter.

    Returns:
        The ``agentId`` in the token: a non-empty string.

    Raises:
        AuthError: The token is missing, is not base64, does not decrypt with ``key``, or does
            not hold a JSON object with a non-empty string ``agentId``.
    """
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
