"""``python -m trio_mcp_relay``: the same as the ``trio-mcp-relay`` command."""

from ._cli import main

main()
