"""Example tool plugins, ready to serve.

``trio-mcp-relay tools --endpoint URL trio_mcp_relay.examples.calculator:Calculator
trio_mcp_relay.examples.clock:Clock`` gives an agent a calculator and a world clock.
"""
