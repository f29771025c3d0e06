"""Sending email: templates rendered to plain text and HTML, delivered with aiosmtplib.

Each thread keeps one SMTP connection open and sends its mails over it (a worker thread
sends many), instead of a TCP handshake, EHLO and QUIT per mail. A connection idle for a
while is checked with NOOP before use; after any error, or 100 mails, it is closed and
the next mail opens a new one. An error never resends on its own: the caller retries,
and the notification's lease keeps that to one delivery.
"""

from __future__ import annotations

import asyncio
import io
import threading
import time
import uuid
from dataclasses import dataclass
from email.charset import QP, Charset
from email.generator import BytesGenerator
from email.message import Message
from email.mime.multipart import MIMEMultipart
from email.mime.nonmultipart import MIMENonMultipart
from email.policy import Compat32
from email.utils import formatdate, parseaddr
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
            loader=loader,
            autoescape=False,
            undefined=StrictUndefined,
            keep_trailing_newline=True,
            auto_reload=False,  # templates ship with the code: no stat per mail
        )
        self._html = Environment(
            loader=loader,
            autoescape=select_autoescape(["html"]),
            undefined=StrictUndefined,
            auto_reload=False,
        )

    def render(self, name: str, context: dict[str, Any]) -> RenderedMail:
        text = self._text.get_template(f"mail/{name}.txt").render(**context)
        first, _, body = text.partition("\n")
        if not first.startswith("Subject: "):
            raise ValueError(f"mail template {name!r} must start with a 'Subject: ' line")
        subject = " ".join(first[len("Subject: ") :].split())  # one line, whatever came in
        html = self._html.get_template(f"mail/{name}.html").render(subject=subject, **context)
        return RenderedMail(subject, body.lstrip("\n"), html)


_UTF8_QP = Charset("utf-8")
_UTF8_QP.body_encoding = QP  # bodies stay readable in the raw mail, not base64


# The classic policy stores a header as the string it is given; the modern one parses
# every header into a structured object, which made building a mail three times dearer.
# Non-ASCII headers are still RFC 2047 encoded when the mail is written out. What the
# modern policy also did, refusing a header value with a line break in it, is checked
# in `_header` instead.
class _Policy(Compat32):
    """The classic policy, but a header that is short, printable ASCII, one line, is
    written as it is, without the general folding and encoding machinery (most of the
    cost of writing a mail out): that machinery would write it out unchanged."""

    def fold_binary(self, name: str, value: Any) -> bytes:
        if (
            isinstance(value, str)
            and value.isascii()
            and value.isprintable()
            and value == value.strip()
            and "  " not in value
            and len(name) + 2 + len(value) <= (self.max_line_length or 78)
        ):
            return f"{name}: {value}{self.linesep}".encode("ascii")
        return super().fold_binary(name, value)


_POLICY = _Policy(linesep="\r\n")


def _text_part(subtype: str, body: str) -> Message:
    part = MIMENonMultipart("text", subtype, policy=_POLICY)
    part.set_payload(body, _UTF8_QP)
    return part


def flatten(message: Message) -> bytes:
    """The mail as sent, with its own policy (CRLF line ends)."""
    with io.BytesIO() as out:
        BytesGenerator(out, policy=message.policy).flatten(message)
        return out.getvalue()


def _header(value: str) -> str:
    """A header value as given, refused if it could start another header (injection)."""
    if "\r" in value or "\n" in value:
        raise ValueError("a mail header value must be one line")
    return value


IDLE_CHECK_SECONDS = 1.0  # a connection unused this long gets a NOOP before the next mail
MAILS_PER_CONNECTION = 100


@dataclass
class _Connection:
    loop: asyncio.AbstractEventLoop
    client: aiosmtplib.SMTP
    last_used: float
    sent: int = 0

    def run(self, coroutine: Any) -> Any:
        return self.loop.run_until_complete(coroutine)

    def close(self) -> None:
        try:
            if self.client.is_connected:
                self.run(self.client.quit())
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            self.client.close()
        finally:
            self.loop.close()


class Mailer:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.templates = Templates()
        self._sender = parseaddr(settings.mail_from)[1] or settings.mail_from
        self._local = threading.local()

    def build(self, recipient: str, mail: RenderedMail, message_id: str) -> Message:
        """A multipart/alternative mail, text and HTML. Built from MIME parts directly:
        `EmailMessage.set_content` would do the same at ten times the cost per mail."""
        # a random boundary of our own: the email package would otherwise search the
        # parts for the one it makes up
        message = MIMEMultipart("alternative", f"=_{uuid.uuid4().hex}", policy=_POLICY)
        message["From"] = _header(self.settings.mail_from)
        message["To"] = _header(recipient)
        message["Subject"] = _header(mail.subject)
        message["Message-ID"] = _header(message_id)
        message["Date"] = formatdate(usegmt=True)
        message["Auto-Submitted"] = "auto-generated"
        message.attach(_text_part("plain", mail.text))
        message.attach(_text_part("html", mail.html))
        return message

    def send(self, message: Message) -> None:
        """Send a mail `build` made, to its one recipient (its To header, an address)."""
        recipient = str(message["To"])
        data = flatten(message)
        # an address beyond ASCII needs the server's SMTPUTF8 (RFC 6531)
        utf8 = [] if self._sender.isascii() and recipient.isascii() else ["SMTPUTF8"]
        try:
            connection = self._connection()
            connection.run(
                connection.client.sendmail(self._sender, [recipient], data, mail_options=utf8)
            )
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            self.close()
            raise MailUnavailable(
                f"mail server refused or did not answer: {type(exc).__name__}"
            ) from exc
        connection.sent += 1
        connection.last_used = time.monotonic()
        if connection.sent >= MAILS_PER_CONNECTION:
            self.close()

    def _connection(self) -> _Connection:
        """This thread's open connection, checked if it sat idle, or a new one."""
        connection: _Connection | None = getattr(self._local, "connection", None)
        if connection is not None and (
            not connection.client.is_connected
            or time.monotonic() - connection.last_used > IDLE_CHECK_SECONDS
            and not self._answers(connection)
        ):
            self.close()
            connection = None
        if connection is None:
            loop = asyncio.new_event_loop()
            client = aiosmtplib.SMTP(
                hostname=self.settings.smtp_host,
                port=self.settings.smtp_port,
                timeout=self.settings.smtp_timeout,
            )
            connection = _Connection(loop, client, time.monotonic())
            self._local.connection = connection
            connection.run(client.connect())
        return connection

    @staticmethod
    def _answers(connection: _Connection) -> bool:
        try:
            connection.run(connection.client.noop())
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            return False
        return True

    def close(self) -> None:
        """Close this thread's connection, if it has one."""
        connection: _Connection | None = getattr(self._local, "connection", None)
        self._local.connection = None
        if connection is not None:
            connection.close()
