"""Sending email: templates rendered to plain text and HTML, delivered with aiosmtplib."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate
from typing import Any

import aiosmtplib
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from pipeline.errors import MailUnavailable
from pipeline.settings import Settings


@dataclass(frozen=True)
class RenderedMail:
    subject: str
    text: str
    html: str


class Templates:
    """`mail/<name>.txt` (first line `Subject: ...`) and `mail/<name>.html` per template."""

    def __init__(self) -> None:
        loader = PackageLoader("pipeline", "templates")
        self._text = Environment(
            loader=loader, autoescape=False, undefined=StrictUndefined, keep_trailing_newline=True
        )
        self._html = Environment(
            loader=loader, autoescape=select_autoescape(["html"]), undefined=StrictUndefined
        )

    def render(self, name: str, context: dict[str, Any]) -> RenderedMail:
        text = self._text.get_template(f"mail/{name}.txt").render(**context)
        first, _, body = text.partition("\n")
        if not first.startswith("Subject: "):
            raise ValueError(f"mail template {name!r} must start with a 'Subject: ' line")
        subject = " ".join(first[len("Subject: ") :].split())  # one line, whatever came in
        html = self._html.get_template(f"mail/{name}.html").render(subject=subject, **context)
        return RenderedMail(subject, body.lstrip("\n"), html)


class Mailer:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.templates = Templates()

    def build(self, recipient: str, mail: RenderedMail, message_id: str) -> EmailMessage:
        message = EmailMessage()
        message["From"] = self.settings.mail_from
        message["To"] = recipient
        message["Subject"] = mail.subject
        message["Message-ID"] = message_id
        message["Date"] = formatdate(localtime=False)
        message["Auto-Submitted"] = "auto-generated"
        message.set_content(mail.text)
        message.add_alternative(mail.html, subtype="html")
        return message

    def send(self, message: EmailMessage) -> None:
        try:
            asyncio.run(
                aiosmtplib.send(
                    message,
                    hostname=self.settings.smtp_host,
                    port=self.settings.smtp_port,
                    timeout=self.settings.smtp_timeout,
                )
            )
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            raise MailUnavailable(
                f"mail server refused or did not answer: {type(exc).__name__}"
            ) from exc
