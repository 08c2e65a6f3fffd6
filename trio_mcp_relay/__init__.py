"""trio-mcp-relay: a Trio MCP endpoint relay, wire-compatible with mcp-endpoint-server.

The public surface: run the relay inside a Trio program with :func:`serve_relay`, configure
it with :class:`RelayConfig` (and reload it live through a :class:`RelayHandle`), replace
the token schemes with an authenticator (raise :class:`AuthError` to refuse; return an agent
id or a :class:`Grant`), mint the reference server's tokens with :func:`encrypt_token` and
scoped tokens (a role, an expiry) with :func:`scoped_token`; :class:`TokenAuthenticator`
checks both.
"""

from __future__ import annotations

__version__ = "0.1.0"

from ._auth import (
    AesTokenAuthenticator,
    Authenticator,
    AuthError,
    Endpoint,
    Grant,
    TokenAuthenticator,
    TokenRole,
    decrypt_agent_id,
    encrypt_token,
    scoped_token,
)
from ._config import ConfigError, RelayConfig, load_config
from .core.catalog import ToolFilter
from .core.middleware import Call, Middleware, Refused, Reply
from .server import RelayHandle, ReloadReport, serve_relay

__all__ = [
    "AesTokenAuthenticator",
    "AuthError",
    "Authenticator",
    "Call",
    "ConfigError",
    "Endpoint",
    "Grant",
    "Middleware",
    "Refused",
    "RelayConfig",
    "RelayHandle",
    "ReloadReport",
    "Reply",
    "TokenAuthenticator",
    "TokenRole",
    "ToolFilter",
    "__version__",
    "decrypt_agent_id",
    "encrypt_token",
    "load_config",
    "scoped_token",
    "serve_relay",
]
