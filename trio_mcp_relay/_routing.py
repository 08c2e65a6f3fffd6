"""The routing core's former home, kept so that every importer keeps working.

The core now lives in :mod:`trio_mcp_relay.core`: :mod:`~trio_mcp_relay.core.registry` holds
the :class:`Router` (agents and connections), :mod:`~trio_mcp_relay.core.session` the routing
rules of one agent, and :mod:`~trio_mcp_relay.core.actions` the roles and actions shared with
the shell. This module only re-exports the names the shell uses.
"""

from __future__ import annotations

from .core.actions import CLOSE_REPLACED, Action, Close, Role, Send
from .core.registry import Router

__all__ = ["CLOSE_REPLACED", "Action", "Close", "Role", "Router", "Send"]
