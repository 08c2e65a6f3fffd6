"""Cluster mode: several relay nodes share one Redis, and any node serves any connection.

Layers: :mod:`.records` (what is kept in Redis and sent between nodes, pure),
:mod:`.store` (every Redis command), :mod:`.links` (the two ends of a tunnel between nodes,
each a connection the dispatcher runs) and :mod:`.node` (one node: its leases, its view of
the cluster, the bus, and the links). Importing this package needs ``coredis`` (the
``cluster`` extra).
"""

from .node import ClusterNode

__all__ = ["ClusterNode"]
