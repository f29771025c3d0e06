"""No-op actors with the pipeline's names and queues: the baseline for bench/throughput.py.

`dramatiq bench.noop_actors` runs them with the same broker (and middleware) as
`workers.actors`. Each actor does nothing but publish the hop(s) the real stage would
publish for a pre-verified request, through the same `DramatiqBus`. The request id
carries the request's `HopPlan` (how many stores to locate, act on and re-check), so the
baseline moves exactly the messages the real run moved. Fan-in (the last store task
moves the request on) is a Redis INCR per (request, phase); the outcome mail bumps a
"done" counter and stamps the time, which the benchmark reads.
"""

from __future__ import annotations

import time
import uuid
from functools import cache
from typing import Any

import dramatiq
import redis

from bench.workload import HopPlan, noop_done_key, noop_last_done_key
from pipeline import topology
from pipeline.bootstrap import DramatiqBus, make_broker
from pipeline.outbox import Envelope
from pipeline.settings import Settings

_settings = Settings.from_env()
_broker = make_broker(_settings)
dramatiq.set_broker(_broker)
_bus = DramatiqBus(_broker)
_STORES = [f"store{i}" for i in range(32)]  # names only: no-op stores hold nothing


@cache
def _redis() -> redis.Redis:
    """One client per worker process (built after the fork, on first use)."""
    return redis.Redis.from_url(_settings.broker_url)


def _send(actor: str, queue: str, *args: Any) -> None:
    _bus.publish(Envelope(id=str(uuid.uuid4()), actor=actor, queue=queue, args=args))


def _last_of(tagged: str, phase: str, expected: int) -> bool:
    """Fan-in: True for exactly one of the `expected` store messages of a phase."""
    count = _redis().incr(f"{_settings.queue_namespace}:bench:{tagged}:{phase}")
    return int(count) == expected  # type: ignore[arg-type]


def _fan_out(actor: str, tagged: str, count: int) -> None:
    for store in _STORES[:count]:
        _send(actor, topology.STORE_QUEUE, tagged, store)


@dramatiq.actor(actor_name=topology.INTAKE_ACTOR, queue_name=topology.INTAKE_QUEUE)
def intake(document: Any) -> None:
    tagged = document["request_id"]
    _send(topology.SEND_EMAIL_ACTOR, topology.NOTIFY_QUEUE, f"{tagged}|ack")
    _send(topology.VERIFY_ACTOR, topology.VERIFY_QUEUE, tagged)


@dramatiq.actor(actor_name=topology.VERIFY_ACTOR, queue_name=topology.VERIFY_QUEUE)
def verify_request(tagged: str) -> None:
    _, plan = HopPlan.from_tag(tagged)
    if plan.locate:
        _send(topology.LOCATE_ACTOR, topology.LOCATE_QUEUE, tagged)
    else:
        _send(topology.ACT_ACTOR, topology.ACT_QUEUE, tagged)


@dramatiq.actor(actor_name=topology.LOCATE_ACTOR, queue_name=topology.LOCATE_QUEUE)
def locate_request(tagged: str) -> None:
    _, plan = HopPlan.from_tag(tagged)
    _fan_out(topology.LOCATE_STORE_ACTOR, tagged, plan.locate)


@dramatiq.actor(actor_name=topology.LOCATE_STORE_ACTOR, queue_name=topology.STORE_QUEUE)
def locate_store(tagged: str, store: str) -> None:
    _, plan = HopPlan.from_tag(tagged)
    if _last_of(tagged, "locate", plan.locate):
        _send(topology.ACT_ACTOR, topology.ACT_QUEUE, tagged)


@dramatiq.actor(actor_name=topology.ACT_ACTOR, queue_name=topology.ACT_QUEUE)
def act_on_request(tagged: str) -> None:
    _, plan = HopPlan.from_tag(tagged)
    if not plan.locate:  # a concern: open the case, then notify
        _send(topology.NOTIFY_ACTOR, topology.NOTIFY_QUEUE, tagged)
    elif plan.act:
        _fan_out(topology.ACT_STORE_ACTOR, tagged, plan.act)
    else:
        _send(topology.FINISH_ACTOR, topology.ACT_QUEUE, tagged)


@dramatiq.actor(actor_name=topology.ACT_STORE_ACTOR, queue_name=topology.STORE_QUEUE)
def act_on_store(tagged: str, store: str) -> None:
    _, plan = HopPlan.from_tag(tagged)
    if _last_of(tagged, "act", plan.act):
        _send(topology.FINISH_ACTOR, topology.ACT_QUEUE, tagged)


@dramatiq.actor(actor_name=topology.RECHECK_STORE_ACTOR, queue_name=topology.STORE_QUEUE)
def recheck_store(tagged: str, store: str) -> None:
    _, plan = HopPlan.from_tag(tagged)
    if _last_of(tagged, "recheck", plan.recheck):
        _send(topology.FINISH_ACTOR, topology.ACT_QUEUE, tagged)


@dramatiq.actor(actor_name=topology.FINISH_ACTOR, queue_name=topology.ACT_QUEUE)
def finish_request(tagged: str) -> None:
    _, plan = HopPlan.from_tag(tagged)
    first = _last_of(tagged, "finish", 1)  # the first finish starts the re-check
    if first and plan.recheck:
        _fan_out(topology.RECHECK_STORE_ACTOR, tagged, plan.recheck)
    else:
        _send(topology.NOTIFY_ACTOR, topology.NOTIFY_QUEUE, tagged)


@dramatiq.actor(actor_name=topology.NOTIFY_ACTOR, queue_name=topology.NOTIFY_QUEUE)
def notify_outcome(tagged: str) -> None:
    _send(topology.SEND_EMAIL_ACTOR, topology.NOTIFY_QUEUE, f"{tagged}|outcome")


@dramatiq.actor(actor_name=topology.SEND_EMAIL_ACTOR, queue_name=topology.NOTIFY_QUEUE)
def send_email(notification_id: str) -> None:
    if notification_id.endswith("|outcome"):
        namespace = _settings.queue_namespace
        client = _redis()
        pipe = client.pipeline()
        pipe.incr(noop_done_key(namespace))
        pipe.set(noop_last_done_key(namespace), repr(time.time()))
        pipe.execute()
