"""Messages that are not ours, or that fail for good, reach the dead letters with a reason,
nothing else stops, and no dead letter holds personal data.

Real Redis (a namespace per test), a real dramatiq `Worker` in this process running the
pipeline's own actors (`workers.actors`, declared again on the test's broker with their
own options) against a real state database. Each case checks the dead letter and its
reason, that no key or value in the namespace holds the person's email, name or phone,
and that a good message sent afterwards on the same queue is run.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dramatiq
import pytest
from dramatiq import Worker

import workers.actors as actors
from pipeline import topology
from pipeline.bootstrap import App, DramatiqBus, make_broker
from pipeline.dashboard.deadletters import DeadLetters
from pipeline.db import RequestRow
from pipeline.deadletters import REASON, SEALED, UNDECODABLE_ACTOR, RedisBroker, unseal
from pipeline.outbox import Envelope
from pipeline.settings import Settings
from tests.conftest import make_app
from tests.integration.support import EMAIL, NAME, document, stores

pytestmark = [pytest.mark.redis, pytest.mark.timeout(120)]

PHONE = "555 0100"
LOCATE = topology.LOCATE_QUEUE
INTAKE = topology.INTAKE_QUEUE
REAL_ACTORS: list[dramatiq.Actor[Any, Any]] = [
    actors.intake_actor,
    actors.verify_request,
    actors.locate_request,
    actors.locate_store,
    actors.act_on_request,
    actors.act_on_store,
    actors.recheck_store,
    actors.finish_request,
    actors.notify_outcome,
    actors.send_email,
]


@dataclass
class Rig:
    app: App
    broker: RedisBroker
    probed: list[str] = field(default_factory=list)
    worker: Worker | None = None

    @property
    def ns(self) -> str:
        return self.app.settings.queue_namespace

    def start(self, *queues: str) -> None:
        self.worker = Worker(self.broker, queues=set(queues), worker_threads=1, worker_timeout=100)
        self.worker.start()

    def publish(self, actor: str, queue: str, *args: Any, **options: Any) -> str:
        message: dramatiq.Message[Any] = dramatiq.Message(
            queue_name=queue, actor_name=actor, args=args, kwargs={}, options=options
        )
        self.broker.enqueue(message)
        return message.message_id

    def push_raw(self, queue: str, body: bytes) -> str:
        """Bytes put straight into the queue, as a misbehaving producer would."""
        key = f"raw-{uuid.uuid4().hex[:8]}"
        self.broker.client.hset(f"{self.ns}:{queue}.msgs", key, body)
        self.broker.client.rpush(f"{self.ns}:{queue}", key)
        return key

    def probe(self, queue: str) -> str:
        """A good message on `queue`; `wait_for_probe` sees it run."""
        token = f"probe-{uuid.uuid4().hex[:8]}"
        self.publish(f"probe_{queue.rsplit('.', 1)[-1]}", queue, token)
        return token

    def dead_letters(self, queue: str) -> dict[str, dict[str, Any]]:
        client = self.broker.client
        keys = [k.decode() for k in client.zrange(f"{self.ns}:{queue}.XQ", 0, -1)]
        bodies = client.hmget(f"{self.ns}:{queue}.XQ.msgs", keys) if keys else []
        return {k: json.loads(b) for k, b in zip(keys, bodies, strict=True)}

    def redis_dump(self) -> bytes:
        """Every key and value in the namespace, one blob."""
        client, out = self.broker.client, []
        for key in client.scan_iter(f"{self.ns}:*"):
            kind = client.type(key)
            out.append(key)
            if kind == b"hash":
                for name, value in client.hgetall(key).items():
                    out += [name, value]
            elif kind == b"list":
                out += client.lrange(key, 0, -1)
            elif kind == b"set":
                out += list(client.smembers(key))
            elif kind == b"zset":
                out += client.zrange(key, 0, -1)
            elif kind == b"string":
                out.append(client.get(key))
        return b"\n".join(out)

    def claimed(self) -> int:
        """Messages this namespace's workers took and neither acked nor dead-lettered."""
        client = self.broker.client
        return sum(int(client.scard(k)) for k in client.scan_iter(f"{self.ns}:__acks__.*"))


def assert_no_personal_data(rig: Rig) -> None:
    dump = rig.redis_dump().lower()
    for needle in (EMAIL, NAME, PHONE, "account director"):
        assert needle.lower().encode() not in dump, f"{needle!r} is in Redis"


def assert_nothing_claimed(rig: Rig) -> None:
    """Every message the worker took was acknowledged or dead-lettered: none is left
    claimed (dramatiq alone leaves an undecodable body, and its batch, claimed)."""
    wait_until("the worker to release every message it took", lambda: rig.claimed() == 0, 5)


def wait_until(what: str, check: Callable[[], Any], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def wait_for_probe(rig: Rig, token: str) -> None:
    wait_until(f"the good message {token} to run", lambda: token in rig.probed)


def only_dead_letter(rig: Rig, queue: str) -> tuple[str, dict[str, Any]]:
    letters = wait_until(f"a dead letter on {queue}", lambda: rig.dead_letters(queue))
    assert len(letters) == 1, letters
    return next(iter(letters.items()))


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    app = make_app(
        f"sqlite:///{tmp_path / 'state.db'}",
        tmp_path / "data",
        connectors=stores(),
        queue_namespace=f"privacy-bad-{uuid.uuid4().hex[:8]}",
    )
    app.keys  # noqa: B018 - generate the demo keys once, before any worker thread
    broker = make_broker(app.settings, keys=lambda: app.keys)
    assert isinstance(broker, RedisBroker)
    app.broker_override = broker
    rig = Rig(app, broker)
    for actor in REAL_ACTORS:
        dramatiq.actor(
            broker=broker, actor_name=actor.actor_name, queue_name=actor.queue_name, **actor.options
        )(actor.fn)
    for queue in (LOCATE, topology.STORE_QUEUE):

        def probe(token: str) -> None:
            rig.probed.append(token)

        dramatiq.actor(
            broker=broker, actor_name=f"probe_{queue.rsplit('.', 1)[-1]}", queue_name=queue
        )(probe)
    actors.install(app)
    try:
        yield rig
    finally:
        if rig.worker is not None:
            rig.worker.stop()
        actors._app = None
        keys = list(broker.client.scan_iter(f"{rig.ns}:*"))
        if keys:
            broker.client.delete(*keys)
        broker.close()
        app.close()


# -- (a) bytes that are no message ------------------------------------------------------


def test_bytes_that_are_no_message_are_dead_lettered_sealed_and_the_queue_keeps_flowing(rig):
    garbage = {
        "binary": b"\xff\xfe\x00 not even text",
        "json, not a message": json.dumps(document("access", "r-raw")).encode(),
        "a message with no broker id": json.dumps(
            {
                "queue_name": LOCATE,
                "actor_name": "probe_locate",
                "args": [EMAIL],
                "kwargs": {},
                "options": {},
                "message_id": "m-1",
                "message_timestamp": 1,
            }
        ).encode(),
        "another queue's message": json.dumps(
            {
                "queue_name": topology.ACT_QUEUE,
                "actor_name": "probe_locate",
                "args": ["x"],
                "kwargs": {},
                "options": {"redis_message_id": "x-1"},
                "message_id": "m-2",
                "message_timestamp": 1,
            }
        ).encode(),
    }
    keys = {rig.push_raw(LOCATE, body): kind for kind, body in garbage.items()}
    # Good messages behind the bad ones, fetched in the same batches: dramatiq alone
    # stopped its consumer on the first bad body and left these claimed, never run.
    tokens = [rig.probe(LOCATE) for _ in range(3)]
    rig.start(LOCATE)
    for token in tokens:
        wait_for_probe(rig, token)
    letters = wait_until("four dead letters", lambda: len(rig.dead_letters(LOCATE)) == 4 or None)
    letters = rig.dead_letters(LOCATE)
    assert set(letters) == set(keys)
    reasons = {keys[k]: letter["options"][REASON] for k, letter in letters.items()}
    assert reasons["binary"].startswith("UndecodableMessage: not a dramatiq message (")
    assert reasons["json, not a message"].startswith("UndecodableMessage: not a dramatiq message")
    assert reasons["a message with no broker id"] == (
        "UndecodableMessage: not a message of this broker: it has no redis_message_id"
    )
    assert reasons["another queue's message"] == (
        "UndecodableMessage: its queue_name is not the queue it was found on"
    )
    for key, letter in letters.items():
        assert letter["actor_name"] == UNDECODABLE_ACTOR and letter["args"] == []
        raw = base64.b64decode(unseal(rig.app.keys, key, letter["options"][SEALED])["raw"])
        assert raw == garbage[keys[key]], "the operator can still read what was sent"
    assert_nothing_claimed(rig)
    assert_no_personal_data(rig)


def test_a_document_pushed_raw_onto_the_intake_queue_is_sealed_and_intake_goes_on(rig):
    rig.push_raw(INTAKE, json.dumps(document("access", "r-raw-intake")).encode())
    rig.publish(topology.INTAKE_ACTOR, INTAKE, document("access", "r-good-after-raw"))
    rig.start(INTAKE)
    wait_until("the good document to be accepted", lambda: request_exists(rig, "r-good-after-raw"))
    _, letter = only_dead_letter(rig, INTAKE)
    assert letter["options"][REASON].startswith("UndecodableMessage: not a dramatiq message")
    assert_nothing_claimed(rig)
    assert_no_personal_data(rig)


def request_exists(rig: Rig, request_id: str) -> bool:
    with rig.app.sessions() as session:
        return session.get(RequestRow, request_id) is not None


# -- (b) an actor nobody declared -------------------------------------------------------


def test_a_message_for_an_undeclared_actor_is_dead_lettered_with_its_name(rig):
    rig.publish("purge_everything", LOCATE, "r-1")
    token = rig.probe(LOCATE)
    rig.start(LOCATE)
    wait_for_probe(rig, token)
    _, letter = only_dead_letter(rig, LOCATE)
    assert letter["options"][REASON] == (
        "ActorNotFound: no actor named 'purge_everything' is declared"
    )
    assert letter["args"] == ["r-1"], "ids stay readable"
    assert SEALED not in letter["options"]
    assert_nothing_claimed(rig)


def test_an_undeclared_actor_on_the_intake_queue_keeps_its_document_sealed(rig):
    rig.publish("intake_v2", INTAKE, document("erase", "r-v2"))
    rig.publish(topology.INTAKE_ACTOR, INTAKE, document("access", "r-good-after-v2"))
    rig.start(INTAKE)
    wait_until("the good document to be accepted", lambda: request_exists(rig, "r-good-after-v2"))
    key, letter = only_dead_letter(rig, INTAKE)
    assert letter["options"][REASON] == "ActorNotFound: no actor named 'intake_v2' is declared"
    assert letter["args"] == []
    sealed = unseal(rig.app.keys, key, letter["options"][SEALED])
    assert sealed["args"][0]["subject"]["email"] == EMAIL
    assert_no_personal_data(rig)


# -- (c) a request id that does not exist: a PermanentError ----------------------------


def test_a_stage_message_for_an_unknown_request_is_dead_lettered_at_once_with_why(rig):
    rig.publish(topology.LOCATE_ACTOR, LOCATE, "r-nobody-knows")
    token = rig.probe(LOCATE)
    rig.start(LOCATE)
    wait_for_probe(rig, token)
    _, letter = only_dead_letter(rig, LOCATE)
    assert letter["actor_name"] == topology.LOCATE_ACTOR
    assert letter["options"][REASON] == "UnknownRequest: no request with id 'r-nobody-knows'"
    assert letter["options"].get("retries", 0) == 0, "a permanent error is not retried"
    assert letter["args"] == ["r-nobody-knows"]
    assert "traceback" not in letter["options"]
    assert_nothing_claimed(rig)


def test_a_batch_of_unknown_ids_is_dead_lettered_with_its_ids_readable(rig):
    rig.publish(topology.LOCATE_ACTOR, LOCATE, ["r-gone-1", "r-gone-2"])
    token = rig.probe(LOCATE)
    rig.start(LOCATE)
    wait_for_probe(rig, token)
    _, letter = only_dead_letter(rig, LOCATE)
    assert letter["options"][REASON].startswith("UnknownRequest: no request with id 'r-gone-")
    assert letter["args"] == [["r-gone-1", "r-gone-2"]] and SEALED not in letter["options"]
    dead = DeadLetters(rig.app, lambda: rig.broker.client)
    (group,) = dead.list(masked_pii=False, queue=LOCATE)
    assert [d.summary for d in group.letters] == ["[r-gone-1, r-gone-2]"]
    assert_nothing_claimed(rig)


# -- (d) arguments that do not fit -----------------------------------------------------


@pytest.mark.parametrize(
    ("args", "kwargs", "reason"),
    [
        (("r-1", "extra"), {}, "was sent 2 positional and 0 keyword arguments"),
        ((), {}, "was sent 0 positional and 0 keyword arguments"),
        ((), {"id": "r-1"}, "was sent 0 positional and 1 keyword argument"),
        ((42,), {}, "must be str"),
        (({"email": EMAIL, "name": NAME},), {}, "must be str"),
    ],
)
def test_arguments_that_do_not_fit_are_dead_lettered_without_retrying(rig, args, kwargs, reason):
    message: dramatiq.Message[Any] = dramatiq.Message(
        queue_name=LOCATE, actor_name=topology.LOCATE_ACTOR, args=args, kwargs=kwargs, options={}
    )
    rig.broker.enqueue(message)
    token = rig.probe(LOCATE)
    rig.start(LOCATE)
    wait_for_probe(rig, token)
    key, letter = only_dead_letter(rig, LOCATE)
    why = letter["options"][REASON]
    assert why.startswith("BadArguments: locate_request(request_id"), why
    assert reason in why
    if "must be" in reason:
        assert why.endswith(f", was {type(args[0]).__name__}")
    assert letter["options"].get("retries", 0) == 0
    if all(isinstance(a, str) for a in args) and not kwargs:
        assert letter["args"] == list(args)
    else:  # anything but ids is sealed
        assert letter["args"] == [] and letter["kwargs"] == {}
        sealed = unseal(rig.app.keys, key, letter["options"][SEALED])
        assert sealed == {"args": list(args), "kwargs": kwargs}
    assert_nothing_claimed(rig)
    assert_no_personal_data(rig)


# -- retries exhausted -----------------------------------------------------------------


def test_a_stage_message_that_runs_out_of_retries_keeps_its_last_error(rig):
    def flaky_store(request_id: str, store: str) -> None:
        raise TimeoutError(f"store {store} did not answer for {request_id} ({EMAIL})")

    dramatiq.actor(
        broker=rig.broker,
        actor_name="flaky_store",
        queue_name=topology.STORE_QUEUE,
        max_retries=1,
        min_backoff=10,
        max_backoff=20,
    )(flaky_store)
    rig.publish("flaky_store", topology.STORE_QUEUE, "r-7", "crm")
    rig.start(topology.STORE_QUEUE)
    _, letter = only_dead_letter(rig, topology.STORE_QUEUE)
    assert (
        letter["options"][REASON]
        == "TimeoutError: store crm did not answer for r-7 (d***@example.com)"
    )
    assert letter["options"]["retries"] == 1  # the first run, one retry, then given up
    token = rig.probe(topology.STORE_QUEUE)
    wait_for_probe(rig, token)
    assert_no_personal_data(rig)


def test_an_intake_document_that_runs_out_of_retries_is_sealed_and_replays(rig, tmp_path):
    """The state database is down: intake retries, gives up, and the dead letter holds
    the document sealed; once the database is back, an officer's replay takes it in."""
    down = App(
        Settings(
            data_dir=rig.app.settings.data_dir,
            database_url=f"sqlite:///{tmp_path / 'no-such-dir' / 'state.db'}",
            queue_namespace=rig.ns,
            smtp_port=1,
        ),
        broker_override=rig.broker,
    )
    actors.install(down)
    doc = document("correct", "r-exhausted")
    rig.publish(topology.INTAKE_ACTOR, INTAKE, doc, max_retries=1)
    rig.start(INTAKE)
    key, letter = only_dead_letter(rig, INTAKE)
    assert letter["options"][REASON] == "Retry: intake failed: OperationalError"
    assert letter["options"]["retries"] == 1
    assert letter["args"] == [] and "traceback" not in letter["options"]
    assert_no_personal_data(rig)
    assert unseal(rig.app.keys, key, letter["options"][SEALED]) == {"args": [doc], "kwargs": {}}

    actors.install(rig.app)  # the database is back
    dead = DeadLetters(rig.app, lambda: rig.broker.client)
    (group,) = dead.list(masked_pii=True, queue=INTAKE)
    (shown,) = group.letters
    assert shown.summary == "request r-exhausted, type correct"
    assert shown.subject == {"email": "d***@example.com", "name": "D. R.", "phone": "***00"}
    assert shown.error == "Retry: intake failed: OperationalError"
    dead.replay(INTAKE, key, operator="olivia")
    wait_until("the replayed document to be accepted", lambda: request_exists(rig, "r-exhausted"))
    assert rig.dead_letters(INTAKE) == {}
    dead.close()
    assert_nothing_claimed(rig)  # the replayed document was acknowledged, so gone
    assert_no_personal_data(rig)


def test_an_envelope_published_through_the_bus_still_runs(rig):
    """The checks let the pipeline's own messages through untouched."""
    DramatiqBus(rig.broker).publish(
        Envelope(
            id=str(uuid.uuid4()), actor="probe_stores", queue=topology.STORE_QUEUE, args=("t",)
        )
    )
    rig.start(topology.STORE_QUEUE)
    wait_for_probe(rig, "t")
    assert rig.dead_letters(topology.STORE_QUEUE) == {}


def test_intake_runs_before_stage_messages_in_a_worker():
    # dramatiq takes lower priority numbers first: under a backlog every request is
    # received first, and verify then takes the waiting ones on in groups
    intake = actors.intake_actor.priority
    stages = [a.priority for a in REAL_ACTORS if a is not actors.intake_actor]
    assert all(intake < p for p in stages) and len(set(stages)) == 1
