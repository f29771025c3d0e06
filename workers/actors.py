"""The actors, one per stage and per store task. Each decodes ids, calls the stage and
translates the pipeline's retry signal into dramatiq's.

`dramatiq workers.actors` (or `privacy worker`) imports this module: it builds the
broker from the environment (a lazy Redis client: nothing connects at import) and
declares the actors on it.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any, TypeVar

import dramatiq
import structlog

from pipeline import intake, topology
from pipeline.bootstrap import App, make_broker
from pipeline.errors import PermanentError, RetryLater
from pipeline.handlers import handle
from pipeline.logs import configure_logging
from pipeline.settings import Settings

F = TypeVar("F", bound=Callable[..., Any])
log = structlog.get_logger()

_app: App | None = None


def app() -> App:
    """The process's dependencies, built on first use (after fork, per worker process)."""
    global _app
    if _app is None:
        _app = App(Settings.from_env(), broker_override=_broker)
        configure_logging(_app.settings)
    return _app


def install(new_app: App) -> None:
    """Use a prepared App (tests, the demo) instead of one read from the environment."""
    global _app
    _app = new_app


def _retrying(fn: F) -> F:
    """Turn the pipeline's own retry signals into dramatiq retries with its delay."""

    @functools.wraps(fn)
    def wrapper(*args: Any) -> Any:
        try:
            return fn(*args)
        except RetryLater as exc:
            raise dramatiq.Retry(str(exc), delay=exc.delay_ms) from exc
        except PermanentError as exc:
            log.error(
                "message_dropped",
                actor=fn.__name__,
                error=type(exc).__name__,
                reason=str(exc)[:300],
            )
            raise

    return wrapper  # type: ignore[return-value]


class _FlushOnShutdown(dramatiq.Middleware):
    """A stopping worker publishes the messages still in its window and records the
    publishes not yet recorded; were it killed instead, the relay sends them again."""

    def before_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        if _app is not None:
            _app.publisher.flush()


class _QueueLag(dramatiq.Middleware):
    """Tells the publisher how long the messages this worker takes waited in their queue
    (`outbox.Pressure`): its windows stretch while the workers fall behind. Messages
    that were due later (a retry's delay) do not count, nor intake documents, which
    a worker takes before anything else whatever the backlog."""

    def before_process_message(
        self, broker: dramatiq.Broker, message: dramatiq.broker.MessageProxy
    ) -> None:
        pressure = app().publisher.pressure
        if (
            pressure is not None
            and "eta" not in message.options
            and message.actor_name != topology.INTAKE_ACTOR  # it goes first (priority)
        ):
            pressure.observe(time.time() * 1000 - message.message_timestamp)


_broker = make_broker(Settings.from_env(), keys=lambda: app().keys)
_broker.add_middleware(_FlushOnShutdown())
_broker.add_middleware(_QueueLag())
dramatiq.set_broker(_broker)
# Stage messages: permanent errors end in the dead letters at once, not retried. Within a
# worker, intake runs first (dramatiq takes lower priority numbers first; intake has 0):
# under a backlog every request is received and stored before the stages go on, and the
# verify stage then takes the waiting requests on in groups (`pipeline.batch`, peers)
# that travel together through every later stage, oldest first. Without a backlog the
# order changes nothing.
STAGE_PRIORITY = 10
_permanent: dict[str, Any] = {"throws": (PermanentError,), "priority": STAGE_PRIORITY}


@dramatiq.actor(actor_name=topology.INTAKE_ACTOR, queue_name=topology.INTAKE_QUEUE, max_retries=20)
def intake_actor(document: Any) -> None:
    # The document holds personal data: dramatiq logs a failing message with its
    # arguments, so failures leave here as a Retry that names only the error type.
    try:
        intake.accept(app(), document)
    except Exception as exc:
        log.warning("intake_deferred", error=type(exc).__name__)
        raise dramatiq.Retry(f"intake failed: {type(exc).__name__}", delay=2000) from None


# Stage messages carry a list of ids (`pipeline.batch`): the outbox sends the requests
# that move together in one message, and each id runs as if it had come alone.
Ids = str | list[str]


@dramatiq.actor(actor_name=topology.VERIFY_ACTOR, queue_name=topology.VERIFY_QUEUE, **_permanent)
@_retrying
def verify_request(request_ids: Ids) -> None:
    handle(app(), topology.VERIFY_ACTOR, request_ids)


@dramatiq.actor(actor_name=topology.LOCATE_ACTOR, queue_name=topology.LOCATE_QUEUE, **_permanent)
@_retrying
def locate_request(request_ids: Ids) -> None:
    handle(app(), topology.LOCATE_ACTOR, request_ids)


@dramatiq.actor(
    actor_name=topology.LOCATE_STORE_ACTOR, queue_name=topology.STORE_QUEUE, **_permanent
)
@_retrying
def locate_store(request_ids: Ids, store: str) -> None:
    handle(app(), topology.LOCATE_STORE_ACTOR, request_ids, store)


@dramatiq.actor(actor_name=topology.ACT_ACTOR, queue_name=topology.ACT_QUEUE, **_permanent)
@_retrying
def act_on_request(request_ids: Ids) -> None:
    handle(app(), topology.ACT_ACTOR, request_ids)


@dramatiq.actor(actor_name=topology.ACT_STORE_ACTOR, queue_name=topology.STORE_QUEUE, **_permanent)
@_retrying
def act_on_store(request_ids: Ids, store: str) -> None:
    handle(app(), topology.ACT_STORE_ACTOR, request_ids, store)


@dramatiq.actor(
    actor_name=topology.RECHECK_STORE_ACTOR, queue_name=topology.STORE_QUEUE, **_permanent
)
@_retrying
def recheck_store(request_ids: Ids, store: str) -> None:
    handle(app(), topology.RECHECK_STORE_ACTOR, request_ids, store)


@dramatiq.actor(actor_name=topology.FINISH_ACTOR, queue_name=topology.ACT_QUEUE, **_permanent)
@_retrying
def finish_request(request_ids: Ids) -> None:
    handle(app(), topology.FINISH_ACTOR, request_ids)


@dramatiq.actor(actor_name=topology.NOTIFY_ACTOR, queue_name=topology.NOTIFY_QUEUE, **_permanent)
@_retrying
def notify_outcome(request_ids: Ids) -> None:
    handle(app(), topology.NOTIFY_ACTOR, request_ids)


@dramatiq.actor(
    actor_name=topology.SEND_EMAIL_ACTOR, queue_name=topology.NOTIFY_QUEUE, **_permanent
)
@_retrying
def send_email(notification_ids: Ids) -> None:
    handle(app(), topology.SEND_EMAIL_ACTOR, notification_ids)
