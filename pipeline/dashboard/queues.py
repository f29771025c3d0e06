"""Queue depths, read from the Redis keys dramatiq's Redis broker keeps.

For a queue `q` in namespace `ns` the broker keeps (see dramatiq's `dispatch.lua`):
`ns:q.msgs` (every enqueued, not yet acknowledged message), `ns:q.DQ.msgs` (delayed
ones: retries waiting for their backoff), `ns:q.XQ` (a sorted set of dead letters), and
`ns:__heartbeats__` (workers by their last heartbeat). A broker that does not answer
is reported as down with zero depths; the dashboard never fails because of it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline import topology

if TYPE_CHECKING:
    from pipeline.bootstrap import App

HEARTBEAT_WINDOW_MS = 60_000  # dramatiq's default heartbeat timeout


@dataclass(frozen=True)
class QueueDepth:
    queue: str
    queued: int
    delayed: int
    dead: int


@dataclass(frozen=True)
class BrokerReport:
    up: bool
    queues: list[QueueDepth]
    workers: int
    error: str | None = None

    @property
    def busiest(self) -> int:
        return max([q.queued + q.delayed + q.dead for q in self.queues] + [1])


class QueueReader:
    """One Redis connection pool per dashboard, with short timeouts: a page must not
    hang on a broker that is down."""

    def __init__(self, app: App):
        self.app = app
        self._client: Any = None

    def client(self) -> Any:
        if self._client is None:
            import redis

            self._client = redis.Redis.from_url(
                self.app.settings.broker_url, socket_connect_timeout=1, socket_timeout=1
            )
        return self._client

    def read(self) -> BrokerReport:
        idle = [QueueDepth(q, 0, 0, 0) for q in topology.ALL_QUEUES]
        if not self.app.settings.broker_url.startswith(("redis://", "rediss://", "unix://")):
            return BrokerReport(False, idle, 0, "queue depths are read from Redis brokers only")
        import redis

        ns = self.app.settings.queue_namespace
        try:
            pipe = self.client().pipeline(transaction=False)
            for q in topology.ALL_QUEUES:
                pipe.hlen(f"{ns}:{q}.msgs")
                pipe.hlen(f"{ns}:{q}.DQ.msgs")
                pipe.zcard(f"{ns}:{q}.XQ")
            now_ms = int(time.time() * 1000)
            pipe.zcount(f"{ns}:__heartbeats__", now_ms - HEARTBEAT_WINDOW_MS, "+inf")
            values = pipe.execute()
        except (redis.RedisError, OSError) as exc:
            return BrokerReport(False, idle, 0, type(exc).__name__)
        queues = [
            QueueDepth(q, int(values[3 * i]), int(values[3 * i + 1]), int(values[3 * i + 2]))
            for i, q in enumerate(topology.ALL_QUEUES)
        ]
        return BrokerReport(True, queues, int(values[-1]))

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
