"""Every Redis command a cluster node sends, through ``coredis`` (native Trio, via anyio).

Nothing here decides anything: :mod:`.node` calls these and acts on what they return. Each
call raises ``coredis.exceptions.RedisError`` (or ``OSError``) when Redis is unreachable;
the node treats any of those as "the bus is down".
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Final

import coredis
import coredis.exceptions
import orjson
import trio

from .records import Keys, NodeRecord, ServerRecord

__all__ = ["REDIS_ERRORS", "Store", "describe"]

#: What a Redis command raises when Redis cannot be reached (or answers too late).
REDIS_ERRORS: Final = (coredis.exceptions.RedisError, OSError, trio.TooSlowError)


def describe(exc: BaseException) -> str:
    """An error of Redis, in words for logs and JSON-RPC errors."""
    if isinstance(exc, trio.TooSlowError):
        return "Redis did not answer in time"
    return str(exc) or type(exc).__name__


#: Renew each key whose value starts with its expected owner line; 1 renewed, 0 missing,
#: -1 held by another node now.
_RENEW: Final = """
local out = {}
for i, key in ipairs(KEYS) do
  local v = redis.call('GET', key)
  if not v then out[i] = 0
  elseif string.sub(v, 1, #ARGV[i + 1]) == ARGV[i + 1] then
    redis.call('PEXPIRE', key, ARGV[1]); out[i] = 1
  else out[i] = -1 end
end
return out
"""
#: Delete a key only while it still names this owner.
_RELEASE: Final = """
local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 1, #ARGV[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1]); return 1
end
return 0
"""
#: Set a server's record unless a newer version of that identity holds the key (then
#: return its owner line).
_CLAIM: Final = """
local v = redis.call('GET', KEYS[1])
if v then
  local line = string.match(v, '^[^\\n]*')
  local version = tonumber(string.match(line, ' (%d+)$'))
  if version and version > tonumber(ARGV[2]) then return line end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3]); return 1
"""


class Store:
    """A node's commands to the cluster's Redis.

    Args:
        client: an entered ``coredis.Redis`` (``decode_responses=False``).
        keys: the key names.
        lease: seconds each lease lives.
    """

    def __init__(self, client: coredis.Redis[bytes], keys: Keys, lease: float) -> None:
        self.client = client
        self.keys = keys
        self.lease_ms = int(lease * 1000)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self._claim = client.register_script(_CLAIM)

    async def next_version(self) -> int:
        """A version later than any before, even across a restart of Redis that lost its
        data: Redis's clock, in microseconds."""
        now = await self.client.time()
        return int(now.timestamp() * 1_000_000)

    async def claim(self, record: ServerRecord) -> str | None:
        """Publish a server's record; when a newer connection of that identity holds it
        (this one is then replaced), the node holding it."""
        key = self.keys.server(record.agent, record.identity)
        data = record.encode()
        done: object = await self._claim(keys=[key], args=[data, record.version, self.lease_ms])
        if isinstance(done, bytes):
            return done.decode(errors="replace").partition(" ")[0]
        await self.client.publish(self.keys.events, b"u" + data)
        return None

    async def release(self, record: ServerRecord) -> None:
        """Withdraw a server's record (if this node still holds it) and say so."""
        key = self.keys.server(record.agent, record.identity)
        if await self._release(keys=[key], args=[record.owner()]):
            event = [record.agent, record.identity, record.node, record.version]
            await self.client.publish(self.keys.events, b"d" + orjson.dumps(event))

    async def reset(self, node: str) -> None:
        """Tell every node that frames sent to ``node`` may have been lost."""
        await self.client.publish(self.keys.events, b"r" + node.encode())

    async def heartbeat(self, node: NodeRecord, records: Sequence[ServerRecord]) -> list[int]:
        """Renew this node's lease and its servers'; per record, 1 renewed, 0 lapsed (put it
        again), -1 another node holds it now."""
        keys = self.keys
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.set(keys.node(node.node), node.encode(), px=self.lease_ms)
            pipe.sadd(keys.node_pattern, [node.node.encode()])
        if not records:
            return []
        renewed: list[object] = await self._renew(
            keys=[keys.server(r.agent, r.identity) for r in records],
            args=[self.lease_ms, *(r.owner() for r in records)],
        )
        return [int(x) for x in renewed]  # type: ignore[call-overload]

    async def leave(self, node: str) -> None:
        """This node stops: its lease goes at once."""
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.delete([self.keys.node(node)])
            pipe.srem(self.keys.node_pattern, [node.encode()])

    async def live_nodes(self) -> dict[str, NodeRecord]:
        """The nodes holding a lease now (members whose lease lapsed are dropped)."""
        keys = self.keys
        members = sorted(await self.client.smembers(keys.node_pattern))
        if not members:
            return {}
        values = await self.client.mget([keys.node(m.decode()) for m in members])
        nodes: dict[str, NodeRecord] = {}
        gone: list[bytes] = []
        for member, value in zip(members, values, strict=True):
            if value is None:
                gone.append(member)
                continue
            try:
                record = NodeRecord.decode(value)
            except ValueError:
                continue
            nodes[record.node] = record
        if gone:
            await self.client.srem(keys.node_pattern, gone)
        return nodes

    async def servers(self) -> list[ServerRecord]:
        """Every server record in Redis."""
        names: list[bytes] = []
        async for key in self.client.scan_iter(match=self.keys.server_pattern, count=1000):
            names.append(key)
        records: list[ServerRecord] = []
        for start in range(0, len(names), 500):
            values = await self.client.mget(names[start : start + 500])
            for value in values:
                if value is None:
                    continue
                try:
                    records.append(ServerRecord.decode(value))
                except ValueError:
                    continue
        return records

    async def publish(self, messages: Iterable[tuple[str, bytes]]) -> list[int]:
        """Send each ``(node, data)`` on that node's bus channel, in order; how many
        subscribers each reached (0: the node is not listening)."""
        batch = list(messages)
        if len(batch) == 1:
            node, data = batch[0]
            return [int(await self.client.publish(self.keys.bus(node), data))]
        async with self.client.pipeline(transaction=False) as pipe:
            results = [pipe.publish(self.keys.bus(node), data) for node, data in batch]
        return [int(await r) for r in results]
