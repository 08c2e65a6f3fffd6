"""Cluster mode: several relay nodes share one Redis, and any node serves any connection.

Layers: :mod:`.records` (what is kept in Redis and sent between nodes, pure),
:mod:`.store` (every Redis command), :mod:`.links` (the two ends of a tunnel between nodes,
each a connection the dispatcher runs), :mod:`.tunnels` (a node's links and the bus frames
for them), :mod:`.claims` (the servers of a node, claimed in Redis) and :mod:`.node` (one
node: its connection to Redis, heartbeat, bus, and its view of the cluster). Importing this
package needs ``coredis`` (the ``cluster`` extra).
"""

from .node import ClusterNode

__all__ = ["ClusterNode"]
