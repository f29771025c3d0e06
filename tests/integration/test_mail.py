"""Email (R3, invariant 4): every template renders, HTML escapes what people wrote,
subjects cannot carry headers, and mail really goes out over SMTP, once per event."""

from __future__ import annotations

import email.policy
import io
import socket
import threading
from datetime import timedelta
from email import message_from_bytes, policy
from email.generator import BytesGenerator
from importlib import resources
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from sqlalchemy import event, select
from structlog.testing import capture_logs

from pipeline import audit, handlers, notify, topology
from pipeline import mail as mail_module
from pipeline.db import AuditRow, NotificationRow, utcnow
from pipeline.errors import MailUnavailable, UnknownRequest
from pipeline.intake import accept
from pipeline.mail import Mailer, RenderedMail, Templates
from pipeline.mailsink import MailSink, read_messages
from pipeline.settings import Settings
from tests.conftest import make_app
from tests.integration.support import EMAIL, QuietBus, document, notifications

BASE = {
    "request_id": "req-2026-0042",
    "type": "access",
    "received_at": "2026-11-20T10:00:00Z",
    "due_at": "2026-12-20T10:00:00Z",
}
STORES = [
    {"store": "Allego CRM", "records": 12, "files": 2},
    {"store": "Billing", "records": 3, "files": 0},
]
CONTEXTS: dict[str, dict[str, Any]] = {
    "acknowledgement": {**BASE, "verification": "email", "jurisdiction": "gdpr"},
    "verification": {
        **BASE,
        "link": "https://privacy.allego.example/verify/abc.1790000000.def",
        "expires_at": "2026-11-23T10:00:00Z",
    },
    "verification_expired": {**BASE, "type": "erase"},
    "extension": {**BASE, "reason": "Your data is spread over nine products."},
    "outcome_access": {
        **BASE,
        "link": "https://privacy.allego.example/download/xyz.1790000000.mac",
        "expires_at": "2026-11-27T10:00:00Z",
        "stores": STORES,
        "searched": STORES,
    },
    "outcome_correct": {
        **BASE,
        "type": "correct",
        "stores": [
            {"store": "Allego CRM", "applied": ["name", "phone"], "not_held": [], "refused": None},
            {"store": "Billing", "applied": [], "not_held": ["phone"], "refused": "name is locked"},
        ],
        "fields": ["name", "phone"],
    },
    "outcome_erase": {
        **BASE,
        "type": "erase",
        "stores": [{"store": "Allego CRM", "deleted": 14, "anonymized": 3}],
        "retained": [
            {
                "store": "Billing",
                "collection": "invoices",
                "count": 4,
                "legal_basis": "Tax law requires keeping invoices",
                "period": "10 years",
            }
        ],
    },
    "outcome_opt_out": {
        **BASE,
        "type": "opt_out",
        "stores": [{"store": "Allego CRM", "updated": 1}],
    },
    "outcome_concern": {**BASE, "type": "concern", "case_id": "case-7"},
    "case_reply": {**BASE, "type": "concern", "case_id": "case-7", "reply": "We stopped it."},
}
EXPECTED_TEXT = {
    "acknowledgement": ["2026-12-20", "one month", "confirm", "free of charge"],
    "verification": ["/verify/abc.1790000000.def", "2026-11-23 10:00"],
    "verification_expired": ["erase request", "without disclosing or deleting"],
    "extension": ["2026-12-20", "spread over nine products"],
    "outcome_access": ["Allego CRM: 12 record(s), 2 file(s)", "/download/xyz", "2026-11-27"],
    "outcome_correct": ["corrected name, phone", "not corrected: name is locked"],
    "outcome_erase": ["14 deleted, 3 anonymized", "Tax law", "10 years"],
    "outcome_opt_out": ["Allego CRM: contact preference turned off"],
    "outcome_concern": ["case-7", "2026-12-20", "supervisory authority"],
    "case_reply": ["We stopped it.", "supervisory authority"],
}


def template_names() -> set[str]:
    folder = resources.files("pipeline").joinpath("templates/mail")
    return {p.name[:-4] for p in folder.iterdir() if p.name.endswith(".txt")}


def test_every_mail_template_has_a_realistic_test_context():
    assert template_names() == set(CONTEXTS)


@pytest.mark.parametrize("name", sorted(CONTEXTS))
def test_every_template_renders_text_and_html(name):
    mail = Templates().render(name, CONTEXTS[name])
    assert mail.subject and "\n" not in mail.subject
    assert not mail.text.startswith("Subject:")
    assert "req-2026-0042" in mail.text and "req-2026-0042" in mail.html
    assert mail.html.lstrip().startswith("<!doctype html>")
    assert f"<title>{mail.subject}</title>" in mail.html.replace("&#39;", "'")
    for expected in EXPECTED_TEXT[name]:
        assert expected in mail.text, expected


@pytest.mark.parametrize("name", sorted(CONTEXTS))
def test_a_template_missing_a_value_fails_loudly_instead_of_sending_blanks(name):
    context = dict(CONTEXTS[name])
    del context["request_id"]
    with pytest.raises(Exception, match="request_id"):
        Templates().render(name, context)


SCRIPT = "<script>alert('x')</script>"


@pytest.mark.parametrize(
    ("name", "key"),
    [("case_reply", "reply"), ("extension", "reason"), ("outcome_erase", "retained")],
)
def test_what_people_or_stores_wrote_is_escaped_in_the_html(name, key):
    context = dict(CONTEXTS[name])
    if key == "retained":
        context[key] = [{**context[key][0], "legal_basis": SCRIPT}]
    else:
        context[key] = f"Thanks. {SCRIPT} <b>bold</b>"
    mail = Templates().render(name, context)
    assert "<script>" not in mail.html and "<b>bold</b>" not in mail.html
    assert "&lt;script&gt;" in mail.html
    assert SCRIPT in mail.text  # plain text is shown as text, never interpreted


def test_a_correction_refusal_from_a_store_is_escaped_in_the_html():
    context = dict(CONTEXTS["outcome_correct"])
    context["stores"] = [{"store": "CRM", "applied": [], "not_held": [], "refused": SCRIPT}]
    assert "<script>" not in Templates().render("outcome_correct", context).html


INJECTIONS = [
    "access\r\nBcc: attacker@evil.example",
    "access\nX-Injected: yes",
    "access\rX-Injected: yes",
    "opt_out\u2028X-Injected: yes",
]


@pytest.mark.parametrize("value", INJECTIONS)
@pytest.mark.parametrize("name", ["acknowledgement", "extension", "verification_expired"])
def test_a_subject_never_carries_a_line_break_whatever_the_context_holds(name, value):
    mail = Templates().render(name, {**CONTEXTS[name], "type": value})
    assert "\r" not in mail.subject and "\n" not in mail.subject
    mailer = Mailer(Settings())
    raw = mailer.build(EMAIL, mail, "<x@privacy.allego.example>").as_bytes()
    parsed = message_from_bytes(raw, policy=policy.default)
    assert parsed["Bcc"] is None and parsed["X-Injected"] is None
    assert parsed.get_all("Subject") == [mail.subject]


@pytest.mark.parametrize(
    "recipient", ["a@example.com\r\nBcc: attacker@evil.example", "a@b.c\nX: y"]
)
def test_a_header_value_with_a_line_break_is_refused_not_sent(recipient):
    mail = Templates().render("acknowledgement", CONTEXTS["acknowledgement"])
    with pytest.raises(ValueError, match="one line"):
        Mailer(Settings()).build(recipient, mail, "<x@privacy.allego.example>")


def test_a_non_ascii_subject_and_body_survive_the_wire_format():
    mail = RenderedMail("Zoë’s export – ready", "Hallo Zoë, ß € ✓\n", "<p>Zoë ✓</p>")
    raw = Mailer(Settings()).build(EMAIL, mail, "<u@privacy.allego.example>").as_bytes()
    assert raw.isascii()  # RFC 2047 headers, quoted-printable bodies
    parsed = message_from_bytes(raw, policy=policy.default)
    assert parsed["Subject"] == "Zoë’s export – ready"
    assert parsed["To"] == EMAIL and parsed["Auto-Submitted"] == "auto-generated"
    plain = parsed.get_body(("plain",))
    html = parsed.get_body(("html",))
    assert plain["Content-Transfer-Encoding"] == "quoted-printable"
    assert plain.get_content().replace("\r\n", "\n") == "Hallo Zoë, ß € ✓\n"
    assert html.get_content().strip() == "<p>Zoë ✓</p>"


@settings(max_examples=300, deadline=None)
@given(
    name=st.sampled_from(
        ["Subject", "To", "From", "Message-ID", "Content-Type", "X-Long-Header-Name"]
    ),
    value=st.one_of(
        st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=120),
        st.text(max_size=90),
    ),
)
def test_the_mail_policy_writes_every_header_as_the_classic_policy_does(name, value):
    """Its short-cut for short ASCII headers changes nothing a mail says on the wire."""
    assume("\r" not in value and "\n" not in value)
    classic = email.policy.compat32.clone(linesep="\r\n")
    assert mail_module._POLICY.fold_binary(name, value) == classic.fold_binary(name, value)


def test_a_mail_is_written_out_as_the_classic_policy_writes_it():
    mail = RenderedMail("Zoë’s export – ready", "Hallo Zoë,\n" + "x" * 200, "<p>Zoë ✓</p>")
    message = Mailer(Settings()).build(EMAIL, mail, "<u@privacy.allego.example>")
    out = io.BytesIO()
    BytesGenerator(out, policy=email.policy.compat32.clone(linesep="\r\n")).flatten(message)
    assert mail_module.flatten(message) == out.getvalue()


def test_a_recipient_address_beyond_ascii_goes_out_with_smtputf8(sink):
    mailer = Mailer(Settings(smtp_host=sink.host, smtp_port=sink.port, smtp_timeout=10))
    mail = Templates().render("verification_expired", CONTEXTS["verification_expired"])
    mailer.send(mailer.build("zoë@exämple.org", mail, "<u8@privacy.allego.example>"))
    (received,) = sink.messages()
    assert received["X-RcptTo"] == "zoë@exämple.org"
    assert received["X-MailFrom"] == "privacy@allego.example"


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_sending_to_a_closed_port_raises_mail_unavailable():
    mailer = Mailer(Settings(smtp_port=closed_port(), smtp_timeout=5))
    mail = Templates().render("verification_expired", CONTEXTS["verification_expired"])
    with pytest.raises(MailUnavailable, match="did not answer"):
        mailer.send(mailer.build(EMAIL, mail, "<a@privacy.allego.example>"))


@pytest.fixture
def sink(tmp_path):
    with MailSink(tmp_path / "mail", port=0) as running:
        yield running


def test_a_real_send_arrives_with_text_and_html_parts_and_its_message_id(sink):
    mailer = Mailer(Settings(smtp_host=sink.host, smtp_port=sink.port, smtp_timeout=10))
    mail: RenderedMail = Templates().render("outcome_access", CONTEXTS["outcome_access"])
    mailer.send(mailer.build(EMAIL, mail, "<n-1@privacy.allego.example>"))
    (received,) = sink.messages()
    assert received["Message-ID"] == "<n-1@privacy.allego.example>"
    assert received["Subject"] == "Your Allego data is ready to download"
    assert received["To"] == EMAIL
    assert received["Auto-Submitted"] == "auto-generated"
    assert received["Date"]
    types = [part.get_content_type() for part in received.walk()]
    assert types == ["multipart/alternative", "text/plain", "text/html"]
    assert "/download/xyz" in received.get_body(("plain",)).get_content()
    assert "<!doctype html>" in received.get_body(("html",)).get_content()
    assert not [p for p in received.walk() if p.get_content_disposition() == "attachment"]


def test_a_queued_email_is_sent_once_however_often_its_message_arrives(state_url, tmp_path, sink):
    bus = QuietBus()
    app = make_app(state_url, tmp_path / "data", bus=bus, smtp_port=sink.port)
    try:
        accept(app, document("access", "r-1"))
        (note,) = notifications(app, "r-1")
        for _ in range(3):
            notify.send_email(app, note.id)
        (received,) = sink.messages()
        assert received["Message-ID"] == note.message_id
        assert received["Subject"] == "We received your privacy request (access)"
        with app.sessions() as session:
            row = session.get(NotificationRow, note.id)
            assert (row.status, row.attempts) == ("sent", 1)
            sent = session.execute(select(AuditRow).where(AuditRow.action == "email_sent"))
            assert len(sent.scalars().all()) == 1
    finally:
        app.close()


def test_a_state_database_lost_after_the_mail_went_out_does_not_send_it_twice(
    state_url, tmp_path, sink
):
    # the state database drops the connection twice as the row is marked sent (as in a
    # PostgreSQL restart); the sender keeps trying within its lease instead of leaving
    # the row to be sent again when the lease expires
    from sqlalchemy import event
    from sqlalchemy.exc import OperationalError

    app = make_app(state_url, tmp_path / "data", bus=QuietBus(), smtp_port=sink.port)
    cuts = []

    def cut(conn, cursor, statement, parameters, context, executemany):
        marks_sent = statement.startswith("UPDATE notifications") and "sent" in str(parameters)
        if marks_sent and "sending" not in str(parameters) and len(cuts) < 2:
            cuts.append(statement)
            raise OperationalError(statement, parameters, ConnectionError("server gone"))

    try:
        accept(app, document("access", "r-1"))
        (note,) = notifications(app, "r-1")
        event.listen(app.engine, "before_cursor_execute", cut)
        try:
            notify.send_email(app, note.id)
        finally:
            event.remove(app.engine, "before_cursor_execute", cut)
        assert len(cuts) == 2
        assert [m["Message-ID"] for m in sink.messages()] == [note.message_id]
        with app.sessions() as session:
            row = session.get(NotificationRow, note.id)
            assert (row.status, row.attempts) == ("sent", 1)
        notify.send_email(app, note.id)  # a later nudge finds it sent
        assert len(sink.messages()) == 1
    finally:
        app.close()


def test_a_queued_email_that_cannot_be_sent_stays_pending_with_the_error(state_url, tmp_path):
    app = make_app(state_url, tmp_path / "data", bus=QuietBus(), smtp_port=closed_port())
    try:
        accept(app, document("access", "r-1"))
        (note,) = notifications(app, "r-1")
        with pytest.raises(MailUnavailable):
            notify.send_email(app, note.id)
        with app.sessions() as session:
            row = session.get(NotificationRow, note.id)
            assert (row.status, row.attempts) == ("pending", 1)
            assert "did not answer" in row.last_error
            assert EMAIL not in row.last_error
    finally:
        app.close()


# -- a batch of emails: the send_email message carries a list of ids ---------------------


def queued_emails(app, count: int) -> list[NotificationRow]:
    """One acknowledgement email queued per accepted request."""
    for n in range(count):
        accept(app, document("access", f"r-{n}"))
    return notifications(app)


def send_batch(app, ids: list[str]) -> None:
    handlers.handle(app, topology.SEND_EMAIL_ACTOR, ids)


def statements_of(app, run) -> list[str]:
    seen: list[str] = []

    def count(conn, cursor, statement, *rest):
        seen.append(statement)

    event.listen(app.engine, "before_cursor_execute", count)
    try:
        run()
    finally:
        event.remove(app.engine, "before_cursor_execute", count)
    return seen


def kinds(statements: list[str]) -> list[str]:
    """Each statement's first word, the audit entries' INSERTs aside."""
    return [s.split()[0] for s in statements if not s.startswith("INSERT INTO audit_events")]


def audit_inserts(statements: list[str]) -> int:
    return sum(s.startswith("INSERT INTO audit_events") for s in statements)


def received(sink) -> list[str]:
    return sorted(m["Message-ID"] for m in sink.messages())


def audited_as_sent(app) -> list[str]:
    with app.sessions() as session:
        entries = session.scalars(select(AuditRow).where(AuditRow.action == "email_sent"))
        sent = sorted(e.detail["notification_id"] for e in entries)
        assert audit.verify_chain(session).intact
    return sent


def rows(app, notes) -> dict[str, tuple[str, int]]:
    with app.sessions() as session:
        found = [session.get(NotificationRow, n.id) for n in notes]
        return {r.id: (r.status, r.attempts) for r in found}


@pytest.fixture
def mail_app(state_url, tmp_path, sink):
    app = make_app(state_url, tmp_path / "data", bus=QuietBus(), smtp_port=sink.port)
    yield app
    app.close()


def test_a_batch_of_emails_goes_out_once_each_for_the_same_statements_however_large(mail_app, sink):
    app = mail_app
    first = queued_emails(app, 2)  # all that waits: a sender takes on waiting mails too
    small = statements_of(app, lambda: send_batch(app, [n.id for n in first]))
    for n in range(2, 12):
        accept(app, document("access", f"r-{n}"))
    notes = notifications(app)
    ids = [n.id for n in notes]
    large = statements_of(app, lambda: send_batch(app, ids[2:]))
    # the claim (SELECT, the mails waiting, UPDATE) and the record (SELECT, UPDATE, the
    # audit chain's lock and head), with a BEGIN IMMEDIATE each on SQLite: the same for
    # 2 mails as for 10
    assert kinds(small) == kinds(large)
    assert len(kinds(large)) <= 8, large
    # the audit entries: one INSERT (executemany) for the batch
    assert audit_inserts(small) == audit_inserts(large) == 1
    assert received(sink) == sorted(n.message_id for n in notes)
    assert set(rows(app, notes).values()) == {("sent", 1)}
    with app.sessions() as session:
        for note in notes:
            row = session.get(NotificationRow, note.id)
            assert row.claimed_until is None and row.sent_at is not None
    assert audited_as_sent(app) == sorted(ids)


def test_a_sender_takes_on_the_mails_waiting_for_their_own_messages(mail_app, sink):
    app = mail_app
    notes = queued_emails(app, 5)
    send_batch(app, [notes[0].id])  # one mail's message: the four waiting go with it
    assert received(sink) == sorted(n.message_id for n in notes)
    assert set(rows(app, notes).values()) == {("sent", 1)}
    for note in notes[1:]:  # their own messages come later and find them sent
        send_batch(app, [note.id])
    assert received(sink) == sorted(n.message_id for n in notes)  # each once
    assert audited_as_sent(app) == sorted(n.id for n in notes)


def test_a_mail_the_server_refused_is_not_taken_on_but_waits_for_its_own_retry(mail_app, sink):
    app = mail_app
    refused, waiting = queued_emails(app, 2)
    with app.sessions.begin() as session:  # put back after a refusal, as _record_sent does
        row = session.get(NotificationRow, refused.id)
        row.attempts, row.last_error = 1, "mail server refused"
    send_batch(app, [waiting.id])
    assert received(sink) == [waiting.message_id]
    assert rows(app, [refused])[refused.id] == ("pending", 1)
    send_batch(app, [refused.id])  # its own retry
    assert received(sink) == sorted([waiting.message_id, refused.message_id])


def test_a_waiting_mail_another_sender_holds_is_skipped_not_waited_for(tmp_path, sink):
    """PostgreSQL's row locks (SQLite runs one writing transaction at a time)."""
    from tests.conftest import state_database

    with state_database("postgresql", tmp_path) as url:
        app = make_app(url, tmp_path / "data", bus=QuietBus(), smtp_port=sink.port)
        try:
            held, mine, other = queued_emails(app, 3)
            with app.sessions() as sender:
                sender.execute(
                    select(NotificationRow).where(NotificationRow.id == held.id).with_for_update()
                ).scalar_one()
                send_batch(app, [mine.id])  # does not block on the held row
                assert received(sink) == sorted([mine.message_id, other.message_id])
                sender.rollback()
            assert rows(app, [held])[held.id] == ("pending", 0)
        finally:
            app.close()


def test_recording_sent_mails_locks_every_row_it_writes_first_in_id_order(
    tmp_path, sink, monkeypatch
):
    """The record of a chunk also renews the lease of the mails still to go: those rows
    are locked with the others, in id order, before anything is written. Locked later,
    a sender claiming one of them while waiting for a row the record holds would
    deadlock with it (PostgreSQL's row locks)."""
    from sqlalchemy.exc import OperationalError

    from tests.conftest import state_database

    with state_database("postgresql", tmp_path) as url:
        app = make_app(url, tmp_path / "data", bus=QuietBus(), smtp_port=sink.port)
        try:
            monkeypatch.setattr(notify, "RECORD_EVERY", 2)
            notes = queued_emails(app, 4)
            still_to_go = max(n.id for n in notes)  # a batch goes out in id order
            probes: list[str] = []
            record = audit.record

            def probing(session, action, **detail):
                if not probes:  # the first record: the first two mails went out
                    with app.engine.connect() as other:
                        try:
                            other.execute(
                                select(NotificationRow.id)
                                .where(NotificationRow.id == still_to_go)
                                .with_for_update(nowait=True)
                            )
                            probes.append("free")
                        except OperationalError:
                            probes.append("locked")
                record(session, action, **detail)

            monkeypatch.setattr(audit, "record", probing)
            send_batch(app, [n.id for n in notes])
            assert probes[0] == "locked"
            assert len(received(sink)) == 4
        finally:
            app.close()


def test_a_batch_holds_each_mail_long_enough_for_every_mail_before_it_to_be_sent(
    mail_app, sink, monkeypatch
):
    app = mail_app
    notes = queued_emails(app, 3)
    leases = []
    send = app.mailer.send

    def looking(message):
        with app.sessions() as session:
            for note in notes:
                row = session.get(NotificationRow, note.id)
                leases.append((row.status, row.claimed_until - row.updated_at))
        send(message)

    monkeypatch.setattr(app.mailer, "send", looking)
    send_batch(app, [n.id for n in notes])
    # claimed together, before the first mail: the last one waits for the other two
    assert leases[:3] == [("sending", 3 * notify._lease(app))] * 3
    assert len(received(sink)) == 3


def test_a_long_batch_records_what_went_out_every_few_mails_and_renews_the_rest(
    mail_app, sink, monkeypatch
):
    app = mail_app
    monkeypatch.setattr(notify, "RECORD_EVERY", 2)
    notes = queued_emails(app, 5)
    seen = []
    send = app.mailer.send

    def looking(message):
        with app.sessions() as session:
            seen.append([session.get(NotificationRow, n.id).status for n in notes])
        send(message)

    monkeypatch.setattr(app.mailer, "send", looking)
    send_batch(app, [n.id for n in notes])
    # recorded two by two: a crash while the third mail goes out would send only the
    # third and fourth again
    assert [statuses.count("sent") for statuses in seen] == [0, 0, 2, 2, 4]
    assert all(statuses.count("sending") == 5 - statuses.count("sent") for statuses in seen)
    with app.sessions() as session:
        assert {session.get(NotificationRow, n.id).status for n in notes} == {"sent"}
    assert audited_as_sent(app) == sorted(n.id for n in notes)
    assert len(received(sink)) == 5


def test_a_mail_refused_in_a_batch_is_put_back_and_retried_after_the_others_are_recorded(
    mail_app, sink, monkeypatch
):
    app = mail_app
    first, busy, last = queued_emails(app, 3)
    refuse = {busy.message_id}
    send = app.mailer.send

    def refusing_one(message):
        # the real server refuses this one mail only (a busy mailbox), the others arrive
        sink.set_fault("refuse" if message["Message-ID"] in refuse else "none")
        send(message)

    monkeypatch.setattr(app.mailer, "send", refusing_one)
    batch = [first.id, busy.id, "n-missing", last.id]
    with pytest.raises(notify.MailRetry) as retry:  # a retry wins over the unknown id
        send_batch(app, batch)
    assert retry.value.delay_ms == app.settings.retry_base_ms
    assert isinstance(retry.value.__cause__, MailUnavailable)
    assert received(sink) == sorted([first.message_id, last.message_id])
    assert rows(app, [first, busy, last]) == {
        first.id: ("sent", 1),
        busy.id: ("pending", 1),
        last.id: ("sent", 1),
    }
    with app.sessions() as session:
        row = session.get(NotificationRow, busy.id)
        assert row.claimed_until is None and "refused or did not answer" in row.last_error
        assert EMAIL not in row.last_error
    assert audited_as_sent(app) == sorted([first.id, last.id])

    refuse.clear()  # the retry: only the refused mail is left, then the unknown id fails
    with pytest.raises(UnknownRequest, match="n-missing"):
        send_batch(app, batch)
    assert received(sink) == sorted(n.message_id for n in (first, busy, last))
    assert rows(app, [busy])[busy.id] == ("sent", 2)
    assert audited_as_sent(app) == sorted([first.id, busy.id, last.id])


def test_an_unknown_id_in_a_batch_of_emails_holds_back_nobody_and_fails_the_message_after(
    mail_app, sink
):
    app = mail_app
    notes = queued_emails(app, 2)
    with capture_logs() as logs, pytest.raises(UnknownRequest, match="n-missing"):
        send_batch(app, ["n-missing", *(n.id for n in notes)])
    assert received(sink) == sorted(n.message_id for n in notes)
    assert set(rows(app, notes).values()) == {("sent", 1)}
    assert audited_as_sent(app) == sorted(n.id for n in notes)
    (failed,) = [e for e in logs if e["event"] == "batch_item_failed"]
    assert failed["error"] == "UnknownRequest"


def test_a_batch_of_emails_redelivered_sends_nothing_twice(mail_app, sink):
    app = mail_app
    notes = queued_emails(app, 3)
    ids = [n.id for n in notes]
    with capture_logs() as logs:
        send_batch(app, ids)
        send_batch(app, ids)  # redelivered
        send_batch(app, [ids[2], ids[0], ids[2]])  # overlapping, in another order
        notify.send_email(app, ids[1])  # a reconciler nudge names one id
    assert received(sink) == sorted(n.message_id for n in notes)
    assert set(rows(app, notes).values()) == {("sent", 1)}
    assert audited_as_sent(app) == sorted(ids)
    sent = [e for e in logs if e["event"] == "email_sent"]
    assert sorted((e["request_id"], e["mail_event"], e["notification_id"]) for e in sent) == sorted(
        (n.request_id, n.event, n.id) for n in notes
    )
    assert sum(e["event"] == "email_already_sent" for e in logs) == 3 + 2 + 1


def test_a_mail_another_sender_holds_is_left_to_it_until_its_lease_runs_out(mail_app, sink):
    app = mail_app
    held, free = queued_emails(app, 2)

    def lease(until):
        with app.sessions() as session, session.begin():
            row = session.get(NotificationRow, held.id)
            row.status, row.claimed_until = "sending", until

    lease(utcnow() + timedelta(minutes=5))
    with capture_logs() as logs:
        send_batch(app, [held.id, free.id])
    assert received(sink) == [free.message_id]
    assert rows(app, [held])[held.id] == ("sending", 0)
    assert [e["notification_id"] for e in logs if e["event"] == "email_being_sent"] == [held.id]

    lease(utcnow() - timedelta(seconds=1))  # that sender died mid-send: its lease ran out
    send_batch(app, [held.id, free.id])
    assert received(sink) == sorted([held.message_id, free.message_id])
    assert audited_as_sent(app) == sorted([held.id, free.id])


class Interrupted(BaseException):
    """What dramatiq raises in a worker thread past the time limit, or at shutdown."""


def test_a_batch_interrupted_mid_send_records_what_went_out_and_keeps_the_rest_leased(
    mail_app, sink, monkeypatch
):
    app = mail_app
    notes = queued_emails(app, 3)
    ids = [n.id for n in notes]
    sent = []
    send = app.mailer.send

    def interrupted_at_the_second(message):
        if sent:
            raise Interrupted
        send(message)
        sent.append(message["Message-ID"])

    monkeypatch.setattr(app.mailer, "send", interrupted_at_the_second)
    with pytest.raises(Interrupted):
        send_batch(app, ids)
    (out,) = [n for n in notes if n.message_id in sent]
    assert received(sink) == [out.message_id]
    assert audited_as_sent(app) == [out.id]
    states = rows(app, notes)
    assert states.pop(out.id) == ("sent", 1)
    # the others may or may not have left: their lease keeps them from a second sender
    assert set(states.values()) == {("sending", 1)}


def test_a_thread_sends_its_mails_over_one_connection(sink):
    mailer = Mailer(Settings(smtp_host=sink.host, smtp_port=sink.port, smtp_timeout=10))
    mail = Templates().render("outcome_access", CONTEXTS["outcome_access"])
    for n in range(5):
        mailer.send(mailer.build(EMAIL, mail, f"<n-{n}@privacy.allego.example>"))
    received = sink.messages()
    assert len(received) == 5
    assert len({m["X-Peer"] for m in received}) == 1  # one TCP connection for all five


def test_another_thread_has_its_own_connection(sink):
    mailer = Mailer(Settings(smtp_host=sink.host, smtp_port=sink.port, smtp_timeout=10))
    mail = Templates().render("outcome_access", CONTEXTS["outcome_access"])

    def send(n: int) -> None:
        mailer.send(mailer.build(EMAIL, mail, f"<t-{n}@privacy.allego.example>"))
        mailer.close()

    threads = [threading.Thread(target=send, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({m["X-Peer"] for m in sink.messages()}) == 2


def test_after_a_refusal_the_next_mail_goes_over_a_new_connection_and_arrives(sink):
    mailer = Mailer(Settings(smtp_host=sink.host, smtp_port=sink.port, smtp_timeout=10))
    mail = Templates().render("outcome_access", CONTEXTS["outcome_access"])
    mailer.send(mailer.build(EMAIL, mail, "<r-1@privacy.allego.example>"))
    sink.set_fault("refuse")
    with pytest.raises(MailUnavailable):
        mailer.send(mailer.build(EMAIL, mail, "<r-2@privacy.allego.example>"))
    sink.set_fault("none")
    mailer.send(mailer.build(EMAIL, mail, "<r-3@privacy.allego.example>"))
    received = {m["Message-ID"]: m["X-Peer"] for m in sink.messages()}
    assert set(received) == {"<r-1@privacy.allego.example>", "<r-3@privacy.allego.example>"}
    assert received["<r-1@privacy.allego.example>"] != received["<r-3@privacy.allego.example>"]


def test_a_mail_server_restarted_behind_an_idle_connection_is_noticed(tmp_path, monkeypatch):
    monkeypatch.setattr("pipeline.mail.IDLE_CHECK_SECONDS", 0.0)
    first = MailSink(tmp_path / "mail", port=0).start()
    port = first.port
    mailer = Mailer(Settings(smtp_host=first.host, smtp_port=port, smtp_timeout=10))
    mail = Templates().render("outcome_access", CONTEXTS["outcome_access"])
    try:
        mailer.send(mailer.build(EMAIL, mail, "<s-1@privacy.allego.example>"))
        first.stop()
        second = MailSink(tmp_path / "mail", port=port).start()
        try:
            # the old connection is dead: the NOOP check notices and a new one is opened
            mailer.send(mailer.build(EMAIL, mail, "<s-2@privacy.allego.example>"))
        finally:
            second.stop()
    finally:
        first.stop()
    assert {m["Message-ID"] for m in read_messages(tmp_path / "mail")} == {
        "<s-1@privacy.allego.example>",
        "<s-2@privacy.allego.example>",
    }
