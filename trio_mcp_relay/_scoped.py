"""Scoped tokens: signed, expiring, role-limited tokens beside the reference's AES-ECB ones.

A scoped token names an agent, the endpoints it may open (its role: ``tool``, ``caller`` or
``both``), optionally a ``server_id`` and an expiry, and the server key it was made with. It
is sealed with AES-256-GCM, so it is authenticated (any change to any byte is detected) and
its content is not readable without the key. No I/O and no Trio here: bytes in, claims out.

Wire format, in the ``token`` query parameter::

    st1.<base64url, no padding>(nonce[12] | key id[4] XOR nonce[:4] | ciphertext | tag[16])

    plaintext = role[1] | expires[8, big-endian Unix seconds, 0 = never]
                | len(agent)[2] | agent (UTF-8)
                | len(server_id)[2] | server_id (UTF-8, empty for none)

* ``st1.`` tells a scoped token from a reference token at a glance: ``.`` is not a base64
  character, so no reference token starts that way (and ``st1`` is the format version).
* The key id is the first 4 bytes of ``HMAC-SHA256(server key, "key id")``: it says which of
  the configured keys made the token without revealing anything about it, so a verifier goes
  straight to that key and can say "a key this server no longer has" when it was removed. It
  is masked with the nonce so that no part of a token is the same in every token of a key (a
  fixed part could spell ``key`` or ``call`` for every token of that key), and it is the
  GCM associated data, so it is authenticated too.
* The nonce is random; minting draws again until the token contains neither ``key`` nor
  ``call`` in any case, because xiaozhi-server refuses endpoint URLs containing either.
* The AES key is ``HKDF-SHA256(server key)``: the server key's text is never used directly as
  a cipher key, and the scoped scheme's key is unrelated to the reference scheme's.
"""

from __future__ import annotations

import base64
import binascii
import enum
import functools
import hmac
import os
import struct
from collections.abc import Callable, Sequence
from hashlib import sha256
from typing import Final

import attrs
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = [
    "PREFIX",
    "Claims",
    "ScopedTokenError",
    "TokenRole",
    "is_scoped",
    "key_id",
    "mint_scoped",
    "verify_scoped",
    "xiaozhi_safe",
]

PREFIX: Final = "st1."
_NONCE_BYTES: Final = 12
_KID_BYTES: Final = 4
_TAG_BYTES: Final = 16
_HEAD: Final = struct.Struct(">BQH")  # role, expires, len(agent)
_LEN: Final = struct.Struct(">H")
_MAX_FIELD: Final = 0xFFFF
_HKDF_INFO: Final = b"trio-mcp-relay scoped token v1"
_KID_INFO: Final = b"trio-mcp-relay scoped token key id v1"
#: Substrings xiaozhi-server's ``validate_mcp_endpoint`` refuses anywhere in an endpoint URL.
FORBIDDEN: Final = ("key", "call")


def xiaozhi_safe(text: str) -> bool:
    """Whether ``text`` contains neither ``key`` nor ``call``, in any letter case."""
    lowered = text.lower()
    return not any(word in lowered for word in FORBIDDEN)


class TokenRole(enum.Enum):
    """Which endpoints a scoped token opens."""

    TOOL = 1
    """Only ``/mcp_endpoint/mcp/``: a tool (MCP server) dialling in."""

    CALLER = 2
    """Only ``/mcp_endpoint/call/``: a caller (MCP client)."""

    BOTH = 3
    """Both endpoints, like a reference token."""

    @property
    def label(self) -> str:
        """The lower-case name used on the command line and in messages."""
        return self.name.lower()

    @classmethod
    def from_label(cls, label: str) -> TokenRole:
        """The role called ``label`` (``tool``, ``caller`` or ``both``).

        Raises:
            ValueError: No role has that name.
        """
        try:
            return cls[label.upper()]
        except KeyError:
            raise ValueError(f"{label!r} is not a role (tool, caller or both)") from None


@attrs.frozen
class Claims:
    """What a scoped token says.

    Attributes:
        agent: The agent id (non-empty).
        role: The endpoints the token opens.
        server_id: The tool server the token is for, or None for any.
        expires: Unix time (whole seconds) after which the token is refused, or None for never.
    """

    agent: str
    role: TokenRole
    server_id: str | None = None
    expires: int | None = None


class ScopedTokenError(Exception):
    """A scoped token cannot be used; ``reason`` says why in at most 100 bytes."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


REASON_MALFORMED: Final = "scoped token is malformed"
REASON_UNKNOWN_KEY: Final = "scoped token was made with a key this server does not have"
REASON_FORGED: Final = "scoped token failed verification (altered, or made with another key)"
REASON_EXPIRED: Final = "scoped token has expired"


def is_scoped(token: str) -> bool:
    """Whether ``token`` is in the scoped format (it may still be invalid)."""
    return token.startswith(PREFIX)


@functools.lru_cache(maxsize=64)
def key_id(key: str) -> bytes:
    """The 4-byte id of a server key, as carried (masked) in the tokens it makes."""
    return hmac.new(key.encode("utf-8"), _KID_INFO, sha256).digest()[:_KID_BYTES]


@functools.lru_cache(maxsize=64)  # a few keys, asked on every handshake
def _aead(key: str) -> AESGCM:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_HKDF_INFO)
    return AESGCM(hkdf.derive(key.encode("utf-8")))


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes | None:
    """Strict base64url without padding: exactly one spelling decodes to given bytes.

    Lenient decoding would accept different strings for the same bytes (unused low bits of
    the last character), and then an altered token could still be accepted.
    """
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return None
    return raw if _b64(raw) == text else None


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def _encode_claims(claims: Claims) -> bytes:
    agent = claims.agent.encode("utf-8")
    server = (claims.server_id or "").encode("utf-8")
    if not agent:
        raise ValueError("a scoped token needs a non-empty agent id")
    if claims.server_id == "":
        raise ValueError("server_id must be None or non-empty")
    if len(agent) > _MAX_FIELD or len(server) > _MAX_FIELD:
        raise ValueError("agent id or server_id is longer than 65535 bytes")
    expires = claims.expires or 0
    if claims.expires is not None and not 0 < claims.expires < 2**63:
        raise ValueError("expires must be a positive Unix time")
    return (
        _HEAD.pack(claims.role.value, expires, len(agent)) + agent + _LEN.pack(len(server)) + server
    )


def _decode_claims(plain: bytes) -> Claims:
    """Parse an authenticated plaintext; ValueError if it is not one we would have written."""
    role_value, expires, agent_len = _HEAD.unpack_from(plain)
    offset = _HEAD.size
    agent = plain[offset : offset + agent_len].decode("utf-8")
    offset += agent_len
    (server_len,) = _LEN.unpack_from(plain, offset)
    offset += _LEN.size
    server = plain[offset : offset + server_len].decode("utf-8")
    if offset + server_len != len(plain) or len(agent.encode()) != agent_len or not agent:
        raise ValueError("length mismatch")
    return Claims(
        agent=agent,
        role=TokenRole(role_value),
        server_id=server or None,
        expires=expires or None,
    )


def mint_scoped(
    key: str, claims: Claims, *, random_bytes: Callable[[int], bytes] = os.urandom
) -> str:
    """Make a scoped token for ``claims`` with the server key ``key``.

    Args:
        key: The server key that signs (the first configured key).
        claims: What the token says.
        random_bytes: Source of nonces (tests make it deterministic).

    Returns:
        ``st1.…``: URL-safe as it is (no quoting needed), and free of ``key`` and ``call`` in
        any letter case.

    Raises:
        ValueError: ``claims`` cannot be encoded (empty agent, fields over 65535 bytes).
    """
    plain = _encode_claims(claims)
    aead, kid = _aead(key), key_id(key)
    while True:
        nonce = random_bytes(_NONCE_BYTES)
        sealed = aead.encrypt(nonce, plain, kid)
        token = PREFIX + _b64(nonce + _xor(kid, nonce[:_KID_BYTES]) + sealed)
        if xiaozhi_safe(token):
            return token


def verify_scoped(keys: Sequence[str], token: str, *, now: float) -> tuple[Claims, int]:
    """Check a scoped token against the configured keys.

    Args:
        keys: The server keys, the signing key first; a token made with any of them is valid.
        token: The token, ``st1.…``.
        now: The current Unix time, for the expiry.

    Returns:
        The token's claims, and the index in ``keys`` of the key that made it.

    Raises:
        ScopedTokenError: The token is malformed, made with a key not in ``keys``, altered,
            or expired. The role is not checked here (see the authenticator).
    """
    raw = _unb64(token[len(PREFIX) :]) if is_scoped(token) else None
    if raw is None or len(raw) < _NONCE_BYTES + _KID_BYTES + _TAG_BYTES + _HEAD.size:
        raise ScopedTokenError(REASON_MALFORMED)
    nonce, masked = raw[:_NONCE_BYTES], raw[_NONCE_BYTES : _NONCE_BYTES + _KID_BYTES]
    sealed = raw[_NONCE_BYTES + _KID_BYTES :]
    kid = _xor(masked, nonce[:_KID_BYTES])
    candidates = [index for index, key in enumerate(keys) if key_id(key) == kid]
    if not candidates:
        raise ScopedTokenError(REASON_UNKNOWN_KEY)
    for index in candidates:  # more than one only if two keys share a 32-bit id
        try:
            plain = _aead(keys[index]).decrypt(nonce, sealed, kid)
        except InvalidTag:
            continue
        try:
            claims = _decode_claims(plain)
        except (ValueError, struct.error, UnicodeDecodeError):
            raise ScopedTokenError(REASON_MALFORMED) from None
        if claims.expires is not None and now >= claims.expires:
            raise ScopedTokenError(REASON_EXPIRED)
        return claims, index
    raise ScopedTokenError(REASON_FORGED)
