"""The development mail sink accepts real SMTP and keeps each message as a file."""

from __future__ import annotations

import smtplib
from email.message import EmailMessage
from pathlib import Path

from pipeline.mailsink import MailSink, read_messages


def _message(subject: str, message_id: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "privacy@allego.example"
    msg["To"] = "person@example.org"
    msg["Subject"] = subject
    msg["Message-ID"] = message_id
    msg.set_content("Your request has been received.\nReference: PR-1\n")
    return msg


def test_mail_sent_over_smtp_is_written_to_the_folder_and_read_back(tmp_path: Path) -> None:
    folder = tmp_path / "mail"
    with MailSink(folder, port=0) as sink:
        assert sink.port != 0
        with smtplib.SMTP(sink.host, sink.port, timeout=10) as smtp:
            smtp.send_message(
                _message("Request received", "<abc/123@allego.example>"),
                to_addrs=["person@example.org", "dpo@allego.example"],
            )
            smtp.send_message(_message("Ré: second – ünïcode", "<second@allego.example>"))
    assert not sink.running

    files = sorted(folder.glob("*.eml"))
    assert len(files) == 2
    assert "abc_123@allego.example" in files[0].name  # sanitized Message-ID, no "/" or "<>"
    assert not list(folder.glob(".*partial"))

    first, second = read_messages(folder)
    assert first["Subject"] == "Request received"
    assert first["Message-ID"] == "<abc/123@allego.example>"
    assert first["X-RcptTo"] == "person@example.org, dpo@allego.example"
    assert first["X-MailFrom"] == "privacy@allego.example"
    body = first.get_body(preferencelist=("plain",))
    assert body is not None and "Reference: PR-1" in body.get_content()
    assert second["Subject"] == "Ré: second – ünïcode"


def test_read_messages_of_a_missing_folder_is_empty(tmp_path: Path) -> None:
    assert read_messages(tmp_path / "nothing-here") == []


def test_sink_can_be_stopped_and_started_again(tmp_path: Path) -> None:
    sink = MailSink(tmp_path, port=0).start()
    port = sink.port
    sink.stop()
    sink.stop()  # idempotent
    sink.start()
    try:
        assert sink.port == port
        with smtplib.SMTP(sink.host, sink.port, timeout=10) as smtp:
            smtp.send_message(_message("again", "<again@allego.example>"))
    finally:
        sink.stop()
    assert [m["Subject"] for m in read_messages(tmp_path)] == ["again"]
