"""The composition root: builds the real dependencies from settings, once, on demand.

Nothing here connects at import time. `App` is created by each process entry point
(worker, web, scheduler, CLI) and handed to the stage functions.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from pipeline import topology
from pipeline.crypto import BlindIndex, Keys, KeySource, keys_file_of, load_keys
from pipeline.db import make_engine, make_session_factory
from pipeline.outbox import Envelope, Pressure, Publisher
from pipeline.settings import Settings

if TYPE_CHECKING:
    import dramatiq
    from sqlalchemy.engine import Engine
    from sqlalchemy.orm import Session, sessionmaker

    from connectors.base import Connector
    from pipeline.batch import GroupCommit
    from pipeline.mail import Mailer

log = structlog.get_logger()


class DramatiqBus:
    """Publishes envelopes as dramatiq messages, addressed by actor name."""

    def __init__(self, broker: dramatiq.Broker):
        self.broker = broker

    def publish(self, envelope: Envelope) -> None:
        import dramatiq

        message: dramatiq.Message[Any] = dramatiq.Message(
            queue_name=envelope.queue,
            actor_name=envelope.actor,
            args=envelope.args,
            kwargs={},
            options={},
            message_id=envelope.id,
        )
        self.broker.enqueue(message, delay=envelope.delay_ms)

    def outstanding(self) -> int | None:
        """For the Redis broker: every message not yet acknowledged, ready, delayed or in
        a worker's hands (`<ns>:<queue>.msgs`, `<ns>:<queue>.DQ.msgs`). A broker that is
        down holds nothing we can count on. For RabbitMQ: the messages ready in each queue
        and its delay queue (RabbitMQ does not count those a worker holds unacknowledged),
        or None while it does not answer."""
        from dramatiq.brokers.rabbitmq import RabbitmqBroker
        from dramatiq.brokers.redis import RedisBroker

        if isinstance(self.broker, RabbitmqBroker):
            return self._rabbitmq_ready(self.broker)
        if not isinstance(self.broker, RedisBroker):
            return None
        import redis

        ns = self.broker.namespace
        try:
            pipe = self.broker.client.pipeline(transaction=False)
            for queue in topology.ALL_QUEUES:
                pipe.hlen(f"{ns}:{queue}.msgs")
                pipe.hlen(f"{ns}:{queue}.DQ.msgs")
            return sum(int(n) for n in pipe.execute())
        except (redis.RedisError, OSError):
            return 0

    @staticmethod
    def _rabbitmq_ready(broker: Any) -> int | None:
        import pika.exceptions

        try:
            return sum(
                ready + delayed
                for ready, delayed, _dead in map(
                    broker.get_queue_message_counts, topology.ALL_QUEUES
                )
            )
        except (pika.exceptions.AMQPError, OSError):
            del broker.connection  # the next call opens a new one
            return None


def make_broker(settings: Settings, *, keys: Callable[[], Keys] | None = None) -> dramatiq.Broker:
    """The broker for the configured URL: Redis by default, RabbitMQ by an amqp:// URL.

    Every message a worker gives up on becomes a dead letter with its reason and nothing
    personal in clear (`pipeline.deadletters`); `keys` seal what may be personal (by
    default the keys the settings name, loaded on first use)."""
    from dramatiq.middleware import (
        AgeLimit,
        Callbacks,
        CurrentMessage,
        Retries,
        ShutdownNotifications,
        TimeLimit,
    )

    from pipeline.deadletters import ArgumentCheck, DeadLetterReasons

    if keys is None:
        keys = App(settings).key_source.current

    middleware = [
        AgeLimit(),
        ArgumentCheck(),
        TimeLimit(time_limit=15 * 60 * 1000),
        ShutdownNotifications(),
        Callbacks(),
        CurrentMessage(),
        Retries(
            max_retries=settings.store_max_attempts + 20,
            min_backoff=settings.retry_base_ms,
            max_backoff=settings.retry_max_ms,
        ),
        DeadLetterReasons(keys),
    ]
    if settings.broker_url.startswith(("amqp://", "amqps://")):
        from dramatiq.brokers.rabbitmq import RabbitmqBroker

        return RabbitmqBroker(url=settings.broker_url, middleware=middleware)
    from pipeline.deadletters import RedisBroker

    return RedisBroker(
        url=settings.broker_url,
        namespace=settings.queue_namespace,
        middleware=middleware,
        keys=keys,
        idle_poll_ms=settings.worker_idle_poll_ms,
        # a retry never waits longer for the poll than its own shortest delay
        delay_poll_ms=min(settings.worker_delay_poll_ms, settings.retry_base_ms),
    )


@dataclass
class App:
    """Every dependency a stage needs, built lazily from one `Settings`."""

    settings: Settings
    broker_override: Any = None
    connectors_override: dict[str, Connector] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def from_env(cls) -> App:
        return cls(Settings.from_env())

    @cached_property
    def key_source(self) -> KeySource:
        s = self.settings

        def load() -> Keys:
            return load_keys(
                keys_file=s.keys_file,
                keys_env=s.keys_env,
                data_dir=s.data_dir,
                production=s.production,
            )

        path = keys_file_of(
            keys_file=s.keys_file, keys_env=s.keys_env, data_dir=s.data_dir, production=s.production
        )
        return KeySource(load, path)

    @property
    def keys(self) -> Keys:
        """The current keys: re-read when their file changes (a rotation)."""
        return self.key_source.current()

    @cached_property
    def blind(self) -> BlindIndex:
        return self.keys.blind_index()

    @cached_property
    def engine(self) -> Engine:
        url = self.settings.state_url
        if url.startswith("sqlite"):
            self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        return make_engine(url)

    @cached_property
    def sessions(self) -> sessionmaker[Session]:
        return make_session_factory(self.engine)

    @cached_property
    def broker(self) -> dramatiq.Broker:
        return self.broker_override or make_broker(self.settings, keys=lambda: self.keys)

    @cached_property
    def bus(self) -> DramatiqBus:
        return DramatiqBus(self.broker)

    @cached_property
    def publisher(self) -> Publisher:
        window = timedelta(milliseconds=self.settings.batch_window_ms)
        gather = timedelta(milliseconds=self.settings.gather_window_ms)
        return Publisher(
            self.sessions,
            lambda: self.bus,
            window=window,
            windows={topology.VERIFY_ACTOR: gather},
            pressure=Pressure(),  # fed by the worker processes (`workers.actors`)
        )

    @cached_property
    def connectors(self) -> dict[str, Connector]:
        if self.connectors_override is not None:
            return self.connectors_override
        from connectors.registry import load_connectors

        return load_connectors(self.settings.stores_config, self.settings.data_dir)

    @cached_property
    def intake_group(self) -> GroupCommit[Any, Any]:
        from pipeline.intake import group_commit

        return group_commit(self)

    @cached_property
    def mailer(self) -> Mailer:
        from pipeline.mail import Mailer

        return Mailer(self.settings)

    @property
    def exports_dir(self) -> Path:
        path = self.settings.exports_dir
        path.mkdir(parents=True, exist_ok=True)
        return path

    def close(self) -> None:
        if "publisher" in self.__dict__:
            self.publisher.flush()
        if "engine" in self.__dict__:
            self.engine.dispose()
        if "connectors" in self.__dict__ and self.connectors_override is None:
            for connector in self.connectors.values():
                connector.close()
