"""The broker is one URL: Redis by default, RabbitMQ by an amqp:// URL. Both carry the
pipeline's envelopes for real."""

from __future__ import annotations

import uuid
from dataclasses import replace
from pathlib import Path

import pytest
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.brokers.redis import RedisBroker

from pipeline.bootstrap import DramatiqBus, make_broker
from pipeline.outbox import Envelope
from pipeline.settings import Settings

URLS = {"redis": "redis://127.0.0.1:6379/0", "rabbitmq": "amqp://guest:guest@127.0.0.1:5672/%2F"}


@pytest.mark.parametrize("kind", sorted(URLS))
def test_an_envelope_published_on_the_broker_is_received_with_its_ids(kind: str, tmp_path: Path):
    settings = Settings(
        data_dir=tmp_path,
        broker_url=URLS[kind],
        queue_namespace=f"privacy-broker-{uuid.uuid4().hex[:8]}",
    )
    broker = make_broker(settings)
    assert isinstance(broker, RabbitmqBroker if kind == "rabbitmq" else RedisBroker)
    queue = f"privacy.test.{uuid.uuid4().hex[:8]}"
    broker.declare_queue(queue)
    try:
        DramatiqBus(broker).publish(
            Envelope(id=str(uuid.uuid4()), actor="locate_store", queue=queue, args=("r-1", "video"))
        )
        consumer = broker.consume(queue, timeout=5000)
        try:
            message = next(m for m in consumer if m is not None)
            consumer.ack(message)
        finally:
            consumer.close()
        assert message.actor_name == "locate_store"
        assert tuple(message.args) == ("r-1", "video")
    finally:
        if kind == "rabbitmq":
            broker.channel.queue_delete(queue)
            broker.channel.queue_delete(f"{queue}.DQ")
            broker.channel.queue_delete(f"{queue}.XQ")
        else:
            broker.flush(queue)
        broker.close()


def test_an_idle_redis_queue_is_polled_again_within_the_configured_interval(tmp_path: Path):
    # dramatiq's worker lets an idle consumer sleep up to a second between polls, which a
    # request pays at every stage; the pipeline's broker caps it
    settings = Settings(
        data_dir=tmp_path,
        broker_url=URLS["redis"],
        queue_namespace=f"privacy-broker-{uuid.uuid4().hex[:8]}",
        worker_idle_poll_ms=40,
        worker_delay_poll_ms=700,
        retry_base_ms=900,
    )
    broker = make_broker(settings)
    queue = f"privacy.test.{uuid.uuid4().hex[:8]}"
    broker.declare_queue(queue)
    # what dramatiq's Worker asks for: its consumers of the queue and of its delay queue
    consumer = broker.consume(queue, timeout=1000)
    delayed = broker.consume(f"{queue}.DQ", timeout=1000)
    try:
        assert consumer.timeout == 40
        # due later anyway: polled at its own, slower pace, never slower than a retry
        assert delayed.timeout == 700
        shortest_retry = make_broker(replace(settings, retry_base_ms=250))
        assert shortest_retry.consume(f"{queue}.DQ", timeout=1000).timeout == 250
    finally:
        consumer.close()
        delayed.close()
