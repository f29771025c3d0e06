"""The dead-letter page, against the real Redis the broker uses (a namespace per test).

Messages get into the dead-letter set the way they do in production: a dramatiq
`Worker`, in this process, runs an actor that fails until dramatiq gives up on it (the
broker's middleware then writes the reason and seals an intake document), or a consumer
nacks a message it took without that middleware, as dead letters written before it were.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import dramatiq
import pytest
from dramatiq import Worker
from sqlalchemy import select

from pipeline import topology
from pipeline.bootstrap import DramatiqBus, make_broker
from pipeline.dashboard.deadletters import error_summary
from pipeline.db import AuditRow
from pipeline.deadletters import RedisBroker
from pipeline.errors import PermanentError
from pipeline.outbox import Envelope
from tests.integration.dashboard.conftest import form_csrf
from tests.integration.support import EMAIL, NAME, document

pytestmark = pytest.mark.redis

LOCATE = topology.LOCATE_QUEUE


@pytest.fixture
def broker(app) -> Iterator[RedisBroker]:
    broker = make_broker(app.settings)
    assert isinstance(broker, RedisBroker)
    yield broker
    ns = app.settings.queue_namespace
    keys = list(broker.client.scan_iter(f"{ns}:*"))
    if keys:
        broker.client.delete(*keys)
    broker.close()


def fail_on_a_worker(broker: dramatiq.Broker, actor_name: str, queue: str, exc: Exception) -> None:
    """Declare an actor that raises `exc`, publish one message to it, and let a real
    worker run it until dramatiq dead-letters it: one retry, then the dead-letter set,
    with the reason. A PermanentError is in the actor's `throws`: dead-lettered at once."""
    run_until_dead(broker, actor_name, queue, exc, ("r-dead", "crm"))


def run_until_dead(
    broker: dramatiq.Broker, actor_name: str, queue: str, exc: Exception, args: tuple
) -> None:
    def failing(*_args: object) -> None:
        raise exc

    dramatiq.actor(
        broker=broker,
        actor_name=actor_name,
        queue_name=queue,
        max_retries=1,
        min_backoff=1,
        max_backoff=10,
        throws=(PermanentError,),
    )(failing)
    DramatiqBus(broker).publish(
        Envelope(id=str(uuid.uuid4()), actor=actor_name, queue=queue, args=args)
    )
    worker = Worker(broker, worker_threads=1, worker_timeout=100)
    worker.start()
    try:
        broker.join(queue, timeout=30_000)
        worker.join()
    finally:
        worker.stop()


def dead_ids(app, broker, queue: str = LOCATE) -> list[str]:
    ns = app.settings.queue_namespace
    return [k.decode() for k in broker.client.zrange(f"{ns}:{queue}.XQ", 0, -1)]


def queued_bodies(app, broker, queue: str = LOCATE) -> list[dict]:
    ns = app.settings.queue_namespace
    return [json.loads(v) for v in broker.client.hvals(f"{ns}:{queue}.msgs")]


def audit_entries(app, action: str) -> list[AuditRow]:
    with app.sessions() as session:
        return list(session.execute(select(AuditRow).where(AuditRow.action == action)).scalars())


def test_a_message_a_worker_gave_up_on_is_listed_with_its_error_masked(
    app, broker, viewer, officer
):
    fail_on_a_worker(
        broker,
        topology.LOCATE_STORE_ACTOR,
        topology.STORE_QUEUE,
        ValueError(f"crm refused {EMAIL}\nsecond line with {NAME}"),
    )
    assert len(dead_ids(app, broker, topology.STORE_QUEUE)) == 1
    for client in (viewer, officer):
        page = client.get("/dead-letters").data.decode()
        assert "locate_store" in page and "r-dead, crm" in page
        assert "ValueError: crm refused d***@example.com" in page
        assert '<td class="num">1</td>' in page  # retried once, then dead-lettered
        assert EMAIL not in page and NAME not in page and "second line" not in page
    assert 'action="/dead-letters/privacy.stores/' in officer.get("/dead-letters").data.decode()
    assert "/replay" not in viewer.get("/dead-letters").data.decode()


def test_a_permanent_error_is_dead_lettered_at_once_with_its_reason(app, broker, viewer):
    fail_on_a_worker(broker, topology.LOCATE_ACTOR, LOCATE, PermanentError("the request is gone"))
    page = viewer.get(f"/dead-letters?queue={LOCATE}").data.decode()
    assert "locate_request" in page
    assert '<td class="why">PermanentError: the request is gone</td>' in page
    assert '<td class="num">0</td>' in page


def test_a_dead_letter_from_before_reasons_were_recorded_says_it_has_none(app, broker, viewer):
    DramatiqBus(broker).publish(
        Envelope(id=str(uuid.uuid4()), actor=topology.LOCATE_ACTOR, queue=LOCATE, args=("r-old",))
    )
    consumer = broker.consume(LOCATE, timeout=2000)
    consumer.nack(next(m for m in consumer if m is not None))  # no middleware: no reason
    consumer.close()
    page = viewer.get(f"/dead-letters?queue={LOCATE}").data.decode()
    assert "no error recorded" in page and "r-old" in page


def dead_letter_intake(app, broker) -> str:
    """An intake message, holding a whole request document, nacked by its consumer
    without the worker's middleware: a dead letter written before documents were sealed."""
    queue = topology.INTAKE_QUEUE
    doc = document("correct", "r-intake-dead")
    DramatiqBus(broker).publish(
        Envelope(id=str(uuid.uuid4()), actor=topology.INTAKE_ACTOR, queue=queue, args=(doc,))
    )
    consumer = broker.consume(queue, timeout=2000)
    message = next(m for m in consumer if m is not None)
    consumer.nack(message)
    consumer.close()
    (key,) = dead_ids(app, broker, queue)
    return key


def test_an_intake_dead_letter_shows_only_its_id_type_and_a_masked_subject(
    app, broker, viewer, officer
):
    dead_letter_intake(app, broker)
    officer_page = officer.get(f"/dead-letters?queue={topology.INTAKE_QUEUE}").data.decode()
    assert "request r-intake-dead, type correct" in officer_page
    assert "d***@example.com" in officer_page and "D. R." in officer_page
    viewer_page = viewer.get(f"/dead-letters?queue={topology.INTAKE_QUEUE}").data.decode()
    assert "request r-intake-dead, type correct" in viewer_page
    assert "d***@example.com" not in viewer_page
    for page in (officer_page, viewer_page):
        assert EMAIL not in page and NAME not in page and "Account Director" not in page
        assert "555 0100" not in page and "0100" not in page


def test_an_officer_replays_a_dead_letter_onto_its_queue_with_a_new_id(app, broker, officer):
    fail_on_a_worker(broker, topology.LOCATE_ACTOR, LOCATE, PermanentError("gone"))
    (key,) = dead_ids(app, broker)
    response = officer.post(
        f"/dead-letters/{LOCATE}/{key}/replay", data={"csrf": form_csrf(officer, "/dead-letters")}
    )
    assert response.status_code == 302
    assert dead_ids(app, broker) == []
    (body,) = queued_bodies(app, broker)
    assert body["actor_name"] == topology.LOCATE_ACTOR
    assert body["args"] == ["r-dead", "crm"]
    assert "traceback" not in body["options"] and "retries" not in body["options"]
    (entry,) = audit_entries(app, "dead_letter_replayed")
    assert entry.actor == "olivia" and entry.request_id == "r-dead"
    assert entry.detail["new_message_id"] == body["message_id"]
    assert entry.detail["message_id"] != body["message_id"]
    assert "Replayed" in officer.get("/dead-letters?done=replayed").data.decode()
    again = officer.post(
        f"/dead-letters/{LOCATE}/{key}/replay", data={"csrf": form_csrf(officer, "/dead-letters")}
    )
    assert again.status_code == 404 and b"gone" in again.data
    assert len(queued_bodies(app, broker)) == 1


def test_a_replayed_intake_message_carries_the_whole_document_again(app, broker, officer):
    key = dead_letter_intake(app, broker)
    queue = topology.INTAKE_QUEUE
    response = officer.post(
        f"/dead-letters/{queue}/{key}/replay", data={"csrf": form_csrf(officer, "/dead-letters")}
    )
    assert response.status_code == 302
    (body,) = queued_bodies(app, broker, queue)
    assert body["args"][0]["subject"]["email"] == EMAIL
    (entry,) = audit_entries(app, "dead_letter_replayed")
    assert entry.request_id == "r-intake-dead"
    assert EMAIL not in json.dumps(entry.detail)


def test_an_officer_discards_a_dead_letter_with_a_reason(app, broker, officer):
    fail_on_a_worker(broker, topology.LOCATE_ACTOR, LOCATE, PermanentError("gone"))
    (key,) = dead_ids(app, broker)
    csrf = form_csrf(officer, "/dead-letters")
    no_reason = officer.post(f"/dead-letters/{LOCATE}/{key}/discard", data={"csrf": csrf})
    assert no_reason.status_code == 400 and dead_ids(app, broker) == [key]
    response = officer.post(
        f"/dead-letters/{LOCATE}/{key}/discard",
        data={"csrf": csrf, "reason": "request was cancelled"},
    )
    assert response.status_code == 302
    assert dead_ids(app, broker) == [] and queued_bodies(app, broker) == []
    ns = app.settings.queue_namespace
    assert broker.client.hlen(f"{ns}:{LOCATE}.XQ.msgs") == 0
    (entry,) = audit_entries(app, "dead_letter_discarded")
    assert entry.actor == "olivia" and entry.detail["reason"] == "request was cancelled"


def test_a_viewer_or_a_form_without_csrf_cannot_replay_or_discard(app, broker, viewer, officer):
    fail_on_a_worker(broker, topology.LOCATE_ACTOR, LOCATE, PermanentError("gone"))
    (key,) = dead_ids(app, broker)
    csrf = form_csrf(viewer, "/dead-letters")
    for action in ("replay", "discard"):
        refused = viewer.post(
            f"/dead-letters/{LOCATE}/{key}/{action}", data={"csrf": csrf, "reason": "x"}
        )
        assert refused.status_code == 403
        forged = officer.post(f"/dead-letters/{LOCATE}/{key}/{action}", data={"reason": "x"})
        assert forged.status_code == 403
    assert dead_ids(app, broker) == [key] and queued_bodies(app, broker) == []
    assert audit_entries(app, "dead_letter_replayed") == []
    unknown = officer.post(
        "/dead-letters/no.such.queue/abc/replay", data={"csrf": form_csrf(officer)}
    )
    assert unknown.status_code == 404


def sealed_intake_dead_letter(app, broker) -> str:
    """An intake document a worker gave up on: the middleware seals it in the dead letter."""
    doc = document("correct", "r-intake-sealed")
    run_until_dead(
        broker,
        topology.INTAKE_ACTOR,
        topology.INTAKE_QUEUE,
        dramatiq.Retry("intake failed: OperationalError", delay=1),
        (doc,),
    )
    (key,) = dead_ids(app, broker, topology.INTAKE_QUEUE)
    return key


def test_a_sealed_intake_dead_letter_is_listed_like_a_clear_one_and_holds_no_pii(
    app, broker, viewer, officer
):
    key = sealed_intake_dead_letter(app, broker)
    ns = app.settings.queue_namespace
    stored = broker.client.hget(f"{ns}:{topology.INTAKE_QUEUE}.XQ.msgs", key)
    assert EMAIL.encode() not in stored and NAME.encode() not in stored
    assert json.loads(stored)["args"] == []
    officer_page = officer.get(f"/dead-letters?queue={topology.INTAKE_QUEUE}").data.decode()
    assert "request r-intake-sealed, type correct" in officer_page
    assert "d***@example.com" in officer_page and "D. R." in officer_page
    assert '<td class="why">Retry: intake failed: OperationalError</td>' in officer_page
    viewer_page = viewer.get(f"/dead-letters?queue={topology.INTAKE_QUEUE}").data.decode()
    assert "request r-intake-sealed, type correct" in viewer_page
    assert "d***@example.com" not in viewer_page
    for page in (officer_page, viewer_page):
        assert EMAIL not in page and NAME not in page and "Account Director" not in page


def test_a_replayed_sealed_intake_dead_letter_carries_the_document_again(app, broker, officer):
    key = sealed_intake_dead_letter(app, broker)
    queue = topology.INTAKE_QUEUE
    response = officer.post(
        f"/dead-letters/{queue}/{key}/replay", data={"csrf": form_csrf(officer, "/dead-letters")}
    )
    assert response.status_code == 302
    (body,) = queued_bodies(app, broker, queue)
    assert body["actor_name"] == topology.INTAKE_ACTOR
    assert body["args"][0]["subject"]["email"] == EMAIL
    assert body["args"][0]["request_id"] == "r-intake-sealed"
    (entry,) = audit_entries(app, "dead_letter_replayed")
    assert entry.request_id == "r-intake-sealed"


def test_bytes_that_were_no_message_are_listed_but_cannot_be_replayed(app, broker, viewer, officer):
    ns = app.settings.queue_namespace
    broker.client.hset(f"{ns}:{LOCATE}.msgs", "raw-1", f"not json {EMAIL}".encode())
    broker.client.rpush(f"{ns}:{LOCATE}", "raw-1")
    broker.declare_queue(LOCATE)
    worker = Worker(broker, worker_threads=1, worker_timeout=100)
    worker.start()
    try:
        broker.join(LOCATE, timeout=10_000)
    finally:
        worker.stop()
    assert dead_ids(app, broker) == ["raw-1"]
    page = viewer.get(f"/dead-letters?queue={LOCATE}").data.decode()
    assert "(undecodable)" in page and "not a dramatiq message (" in page
    assert EMAIL not in page
    refused = officer.post(
        f"/dead-letters/{LOCATE}/raw-1/replay", data={"csrf": form_csrf(officer, "/dead-letters")}
    )
    assert refused.status_code == 400 and b"cannot be replayed" in refused.data
    assert dead_ids(app, broker) == ["raw-1"], "a refused replay leaves the dead letter"
    assert audit_entries(app, "dead_letter_replayed") == []


def test_error_summaries_never_show_an_intake_error_message():
    tb = 'Traceback (most recent call last):\n  File "x.py", line 1\nKeyError: "dana@example.com"\n'
    assert error_summary(tb, queue=topology.INTAKE_QUEUE) == "KeyError"
    retry = (
        "Traceback (most recent call last):\n"
        '  File "a.py", line 2\n'
        "    x()\n"
        "dramatiq.errors.Retry: intake failed: OperationalError\n"
    )
    assert (
        error_summary(retry, queue=topology.INTAKE_QUEUE)
        == "Retry: intake failed: OperationalError"
    )
    assert error_summary(tb, queue=LOCATE) == 'KeyError: "d***@example.com"'
    recorded = f"UnknownRequest: no request for {EMAIL}\nsecond line"
    assert error_summary(tb, queue=LOCATE, reason=recorded) == (
        "UnknownRequest: no request for d***@example.com"
    )
