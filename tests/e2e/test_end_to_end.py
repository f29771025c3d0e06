"""End to end: real dramatiq workers over the real Redis, real SMTP (aiosmtpd), real HTTP,
the Allego demo stores, with the state database on SQLite and on PostgreSQL.

Each request is put on the queue as an intake system would; the test then behaves as
the person: reads the mail, opens the link, presses the button, downloads the export;
and finally looks into the product stores.
"""

from __future__ import annotations

import io
import json
import time
import urllib.error
import urllib.request
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dramatiq
import pytest
import redis
import sqlalchemy as sa

from connectors.allego.seed import DemoManifest, seed_demo_stores, sqlite_path
from pipeline import archive, contract, topology
from pipeline.audit import verify_chain
from pipeline.bootstrap import App
from pipeline.db import AuditRow, RejectionRow
from pipeline.demo import confirm_link, link_in, mails_for
from pipeline.intake import submit
from pipeline.mailsink import MailSink, free_port
from pipeline.migrate import upgrade
from pipeline.notify import close_case
from pipeline.settings import Settings
from pipeline.stack import LocalStack
from pipeline.status import describe_request
from pipeline.suppression import is_contactable
from tests.conftest import state_database

pytestmark = pytest.mark.timeout(600)


@dataclass
class Stack:
    app: App
    sink: MailSink
    manifest: DemoManifest
    data_dir: Path
    stack: LocalStack

    def submit(self, kind: str, person: str, **extra: Any) -> str:
        p = self.manifest.person(person)
        rid = f"e2e-{kind}-{uuid.uuid4().hex[:8]}"
        doc = {
            "schema": contract.SCHEMA_ID,
            "request_id": rid,
            "type": kind,
            "subject": {"email": p.email, "name": p.name},
            "jurisdiction": "gdpr",
            "received_at": datetime.now(UTC).isoformat(),
            "channel": "web",
            **extra,
        }
        submit(doc, bus=self.app.bus)
        return rid

    def wait(self, rid: str, state: str, timeout: float = 90) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        info: dict[str, Any] = {}
        while time.monotonic() < deadline:
            self.stack.check_alive()
            try:
                info = describe_request(self.app, rid)
            except Exception:
                info = {}
            if info.get("state") == state:
                return info
            assert info.get("state") not in {"needs_attention", "expired", "cancelled"}, info
            time.sleep(0.2)
        raise AssertionError(f"{rid} did not reach {state}: {info}")

    def settle(self, rid: str, timeout: float = 30) -> dict[str, Any]:
        """Wait until every email of the request left (DONE comes before the last send)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = describe_request(self.app, rid)
            if info["emails"] and all(e["status"] == "sent" for e in info["emails"]):
                return info
            time.sleep(0.2)
        raise AssertionError(f"emails of {rid} were not all sent")

    def mail(self, rid: str, subject_word: str, timeout: float = 30) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [
                m
                for m in mails_for(self.sink.folder, rid)
                if subject_word in str(m["Subject"]).lower()
            ]
            if found:
                return found
            time.sleep(0.2)
        raise AssertionError(f"no '{subject_word}' mail for {rid}")

    def store(self, name: str) -> sa.Engine:
        return sa.create_engine(f"sqlite:///{sqlite_path(self.data_dir, name)}")

    def confirm(self, rid: str) -> None:
        self.wait(rid, "awaiting_verification")
        (message,) = self.mail(rid, "confirm")
        assert confirm_link(link_in(message, "verify")) == 200


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    folder = tmp_path_factory.mktemp(f"e2e-{request.param}")
    data_dir = folder / "data"
    manifest = seed_demo_stores(data_dir, people=60)
    with state_database(request.param, folder) as url, MailSink(folder / "mail", port=0) as sink:
        web_port = free_port()
        env = {
            "PRIVACY_DATA_DIR": str(data_dir),
            "PRIVACY_DATABASE_URL": url,
            "PRIVACY_QUEUE_NAMESPACE": f"privacy-e2e-{uuid.uuid4().hex[:8]}",
            "PRIVACY_SMTP_PORT": str(sink.port),
            "PRIVACY_WEB_PORT": str(web_port),
            "PRIVACY_BASE_URL": f"http://127.0.0.1:{web_port}",
            "PRIVACY_RETRY_BASE_MS": "200",
            "PRIVACY_STALL_SECONDS": "30",
        }
        settings = Settings.from_env(env)
        app = App(settings)
        upgrade(app.engine)
        app.keys  # noqa: B018 - write the demo keys once, before the workers start
        local = LocalStack(env=env, log_dir=folder / "logs", processes=1, threads=4)
        with local:
            yield Stack(app, sink, manifest, data_dir, local)
        app.broker.close()
        app.close()


def test_access_request_is_confirmed_by_post_and_delivers_the_persons_data(stack: Stack) -> None:
    rid = stack.submit("access", "dana")
    stack.wait(rid, "awaiting_verification")
    (message,) = stack.mail(rid, "confirm")
    link = link_in(message, "verify")
    with urllib.request.urlopen(link) as page:  # a mail scanner following the link
        assert b"Confirm" in page.read()
    time.sleep(0.5)
    assert describe_request(stack.app, rid)["state"] == "awaiting_verification"
    assert confirm_link(link) == 200
    with pytest.raises(urllib.error.HTTPError) as used:
        confirm_link(link)
    assert used.value.code == 409

    info = stack.wait(rid, "done")
    assert {t["store"] for t in info["stores"] if t["phase"] == "locate"} == set(
        stack.manifest.stores
    )
    (outcome,) = stack.mail(rid, "download")
    assert not [p for p in outcome.walk() if p.get_filename()], "never an attachment"
    with urllib.request.urlopen(link_in(outcome, "download")) as resp:
        archive = zipfile.ZipFile(io.BytesIO(resp.read()))
    names = set(archive.namelist())
    assert {"summary.html", "facts.json", "README.txt"} <= names
    dana = stack.manifest.person("dana")
    for store, collections in dana.records.items():
        records = json.loads(archive.read(f"{store}/records.json"))["collections"]
        for collection, count in collections.items():
            assert len(records.get(collection, [])) == count, (store, collection)
    everything = b"".join(archive.read(n) for n in names)
    assert b"password_hash" not in everything
    assert stack.manifest.person("dana_lookalike").email.encode() not in everything
    assert any(n.startswith("media/files/") for n in names)
    facts = json.loads(archive.read("facts.json"))
    video_users = facts["stores"]["video"]["data"]["users"]
    assert video_users["purpose"] and video_users["retention"] and video_users["recipients"]
    assert dana.email.encode() in archive.read("video/records.json")
    tampered = link_in(outcome, "download")[:-3] + "abc"
    with pytest.raises(urllib.error.HTTPError) as bad:
        urllib.request.urlopen(tampered)
    assert bad.value.code == 404


def test_correction_changes_every_store_that_holds_the_field(stack: Stack) -> None:
    rid = stack.submit(
        "correct", "sam", corrections=[{"field": "job_title", "value": "Head of Enablement"}]
    )
    stack.confirm(rid)
    stack.wait(rid, "done")
    sam = stack.manifest.person("sam")
    with stack.store("video").connect() as conn:
        title = conn.execute(
            sa.text("SELECT job_title FROM users WHERE id = :i"), {"i": sam.product_ids["video"]}
        ).scalar()
    assert title == "Head of Enablement"
    with stack.app.sessions() as session:
        changes = (
            session.execute(
                sa.select(AuditRow).where(
                    AuditRow.request_id == rid, AuditRow.action == "record_corrected"
                )
            )
            .scalars()
            .all()
        )
    assert changes and all(len(c.detail["after_hash"]) == 64 for c in changes)
    assert "Head of Enablement" not in json.dumps([c.detail for c in changes])
    (outcome,) = stack.mail(rid, "correction")
    assert "job_title" in outcome.get_body(("plain",)).get_content()


def test_erasure_removes_the_person_keeps_invoices_and_spares_the_lookalike(stack: Stack) -> None:
    rid = stack.submit("erase", "dana_lookalike")
    stack.confirm(rid)
    info = stack.wait(rid, "done")
    assert all(t["status"] == "done" for t in info["stores"])
    assert {t["store"] for t in info["stores"] if t["phase"] == "recheck"}
    gone = stack.manifest.person("dana_lookalike")
    kept = stack.manifest.person("dana")
    with stack.store("video").connect() as conn:
        ids = set(conn.execute(sa.text("SELECT id FROM users")).scalars())
    assert gone.product_ids["video"] not in ids and kept.product_ids["video"] in ids
    with stack.store("billing").connect() as conn:
        invoices = conn.execute(
            sa.text("SELECT count(*) FROM invoices WHERE account_id = :a"),
            {"a": gone.product_ids["billing"]},
        ).scalar()
    assert invoices == gone.records["billing"]["invoices"]
    assert not (stack.data_dir / "stores" / "media" / gone.product_ids["media"]).exists()
    assert (stack.data_dir / "stores" / "media" / kept.product_ids["media"]).exists()
    (outcome,) = stack.mail(rid, "deleted")
    assert "Tax" in outcome.get_body(("plain",)).get_content()
    assert not is_contactable(gone.email, app=stack.app)


def test_opt_out_needs_no_confirmation_and_stops_all_contact(stack: Stack) -> None:
    sam = stack.manifest.person("sam")
    assert is_contactable(sam.email, app=stack.app)
    rid = stack.submit("opt_out", "sam")
    stack.wait(rid, "done")
    info = stack.settle(rid)
    assert info["verified_by"] == "not_required"
    assert not is_contactable(sam.email, app=stack.app)
    with stack.store("marketing").connect() as conn:
        opted = (
            conn.execute(
                sa.text(
                    "SELECT s.opted_in FROM subscriptions s JOIN leads l ON l.id = s.lead_id "
                    "WHERE lower(trim(l.email)) = :e"
                ),
                {"e": sam.email},
            )
            .scalars()
            .all()
        )
    assert opted and not any(opted)


def test_concern_opens_a_case_and_the_reply_reaches_the_person(stack: Stack) -> None:
    rid = stack.submit("concern", "nobody", concern={"message": "Who sold you my address?"})
    info = stack.wait(rid, "done")
    assert info["case"]["status"] == "open" and info["case"]["due_at"]
    stack.mail(rid, "concern")
    close_case(stack.app, rid, "Nobody did: you filled in our web form.", actor="officer")
    (reply,) = stack.mail(rid, "reply")
    text = reply.get_body(("plain",)).get_content()
    assert "web form" in text and "supervisory authority" in text


def test_redelivering_every_stage_message_changes_nothing_and_sends_no_mail(stack: Stack) -> None:
    rid = stack.submit("erase", "sam")
    stack.confirm(rid)
    stack.wait(rid, "done")
    before = stack.settle(rid)
    mails = len(mails_for(stack.sink.folder, rid))
    assert mails == 3  # acknowledgement, confirmation link, outcome
    with stack.app.sessions() as session:
        audit_rows = session.scalar(sa.select(sa.func.count()).select_from(AuditRow))
        notes = [
            n
            for (n,) in session.execute(
                sa.text("SELECT id FROM notifications WHERE request_id = :r"), {"r": rid}
            )
        ]
    broker = stack.app.broker
    sends: list[tuple[str, str, tuple[str, ...]]] = [
        (topology.VERIFY_ACTOR, topology.VERIFY_QUEUE, (rid,)),
        (topology.LOCATE_ACTOR, topology.LOCATE_QUEUE, (rid,)),
        (topology.ACT_ACTOR, topology.ACT_QUEUE, (rid,)),
        (topology.FINISH_ACTOR, topology.ACT_QUEUE, (rid,)),
        (topology.NOTIFY_ACTOR, topology.NOTIFY_QUEUE, (rid,)),
    ]
    for store in stack.manifest.stores:
        for actor in (
            topology.LOCATE_STORE_ACTOR,
            topology.ACT_STORE_ACTOR,
            topology.RECHECK_STORE_ACTOR,
        ):
            sends.append((actor, topology.STORE_QUEUE, (rid, store)))
    sends += [(topology.SEND_EMAIL_ACTOR, topology.NOTIFY_QUEUE, (n,)) for n in notes]
    for actor, queue, args in sends:
        broker.enqueue(
            dramatiq.Message(queue_name=queue, actor_name=actor, args=args, kwargs={}, options={})
        )
    for queue in topology.ALL_QUEUES:
        broker.join(queue, timeout=60_000)
    time.sleep(1)
    after = describe_request(stack.app, rid)
    assert len(mails_for(stack.sink.folder, rid)) == mails
    assert after["state"] == "done" and after["stores"] == before["stores"]
    with stack.app.sessions() as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(AuditRow)) == audit_rows
        assert verify_chain(session).intact


def test_bad_documents_are_rejected_and_recorded_while_good_ones_flow(stack: Stack) -> None:
    bad_id = f"e2e-bad-{uuid.uuid4().hex[:6]}"
    broken: list[Any] = [
        "not json at all {",
        {"schema": "allego.privacy-request/9", "request_id": bad_id},
        {
            "schema": contract.SCHEMA_ID,
            "request_id": bad_id,
            "type": "delete-everything",
            "subject": {"email": "x@example.com"},
            "jurisdiction": "gdpr",
            "received_at": "2026-11-01T00:00:00Z",
            "channel": "web",
        },
        ["a", "list"],
    ]
    for doc in broken:
        submit(doc, bus=stack.app.bus)
    good = stack.submit("opt_out", "nobody")
    stack.wait(good, "done")
    stack.app.broker.join(topology.INTAKE_QUEUE, timeout=30_000)
    with stack.app.sessions() as session:
        codes = [
            r.code
            for r in session.execute(
                sa.select(RejectionRow).order_by(RejectionRow.id.desc()).limit(4)
            ).scalars()
        ]
    assert sorted(codes) == sorted(["not_json", "unknown_schema", "unknown_type", "not_json"])


def _identities(stack: Stack) -> list[str]:
    found = []
    for person in stack.manifest.people.values():
        found += [person.email, person.name, *[v for v in person.product_ids.values() if v]]
    return found


def test_no_identity_is_in_clear_in_the_state_database_redis_or_exports(stack: Stack) -> None:
    """After every request of this module ran: the state database's clear columns, every
    key and value in the broker's namespace, and the export folder hold no identity."""
    needles = _identities(stack)
    with stack.app.engine.connect() as conn:
        for table in sa.inspect(conn).get_table_names():
            columns = [
                c["name"]
                for c in sa.inspect(conn).get_columns(table)
                if not c["name"].endswith("_enc")
            ]
            for row in conn.execute(sa.text(f"SELECT {', '.join(columns)} FROM {table}")):
                text = " ".join(str(v) for v in row)
                for needle in needles:
                    assert needle not in text, (table, needle)
    client = redis.Redis.from_url(stack.app.settings.broker_url)
    namespace = stack.app.settings.queue_namespace
    keys = list(client.scan_iter(f"{namespace}*"))
    for key in keys:
        kind = client.type(key)
        values = {
            b"list": lambda k: client.lrange(k, 0, -1),
            b"hash": lambda k: [*client.hgetall(k).keys(), *client.hgetall(k).values()],
            b"zset": lambda k: client.zrange(k, 0, -1),
            b"set": lambda k: list(client.smembers(k)),
            b"string": lambda k: [client.get(k)],
        }[kind](key)
        blob = b" ".join([key, *values]).decode("utf-8", "replace")
        for needle in needles:
            assert needle not in blob, (key, needle)
    client.close()
    exports = list(stack.app.settings.exports_dir.rglob("*"))
    assert any(p.name == archive.ARCHIVE for p in exports)
    for path in exports:
        if path.is_file():
            data = path.read_bytes()
            for needle in needles:
                assert needle.encode() not in data, (path, needle)


def test_no_log_line_names_a_person(stack: Stack) -> None:
    """Runs last in this module: every log line the processes wrote, searched for the
    demo people's emails, names and phone-free ids (DESIGN invariant 7)."""
    logs = "".join(p.read_text(errors="replace") for p in stack.stack.log_dir.glob("*.log"))
    assert "request_state_changed" in logs  # the processes did log
    for person in stack.manifest.people.values():
        assert person.email not in logs, person.key
        assert person.email.split("@")[0] not in logs, person.key
        assert person.name not in logs, person.key
