"""trio-mcp-relay: a Trio MCP endpoint relay, wire-compatible with mcp-endpoint-server.

The public surface: run the relay inside a Trio program with :func:`serve_relay`, configure
it with :class:`RelayConfig`, replace the token scheme with an authenticator (raise
:class:`AuthError` to refuse), and mint the reference server's tokens with
:func:`encrypt_token`.
"""

from __future__ import annotations

__version__ = "0.1.0"

from ._auth import (
    AesTokenAuthenticator,
    Authenticator,
    AuthError,
    Endpoint,
    decrypt_agent_id,
    encrypt_token,
)
from ._config import ConfigError, RelayConfig, load_config
from .server import serve_relay

__all__ = [
    "AesTokenAuthenticator",
    "AuthError",
    "Authenticator",
    "ConfigError",
    "Endpoint",
    "RelayConfig",
    "__version__",
    "decrypt_agent_id",
    "encrypt_token",
    "load_config",
    "serve_relay",
]
