"""A local development mail sink: accepts every message over SMTP and keeps it as a file.

The embedded default sends its notifications to this sink instead of a real mail server.
Each message is written to ``<folder>/<UTC timestamp>-<counter>-<Message-ID>.eml``
(written to a temporary name first and renamed, so a reader never sees half a message),
with two headers added on top, as aiosmtpd's own handlers do: ``X-MailFrom`` (the SMTP
envelope sender) and ``X-RcptTo`` (the envelope recipients, which include Bcc).

Use it

* as a process (``Procfile``: ``mailsink: python -m pipeline.mailsink``; defaults from
  PRIVACY_SMTP_HOST, PRIVACY_SMTP_PORT and PRIVACY_DATA_DIR/mail), i.e. :func:`run_forever`;
* inside tests or the demo: ``with MailSink(folder) as sink: ...`` (runs in a thread);
* to look at what was sent: :func:`read_messages`.

It is for loopback development only: no TLS, no authentication, no relaying.
"""

from __future__ import annotations

import argparse
import asyncio
import email
import email.policy
import itertools
import os
import re
import signal
import socket
import threading
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path
from types import TracebackType
from typing import Any

from aiosmtpd.controller import Controller

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "MailSink", "main", "read_messages", "run_forever"]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8025
_UNSAFE = re.compile(r"[^A-Za-z0-9._@+=-]+")
_MESSAGE_ID = re.compile(rb"^Message-ID:[ \t]*(.*(?:\r?\n[ \t].*)*)", re.IGNORECASE | re.MULTILINE)


def _sanitize(value: str, limit: int = 80) -> str:
    cleaned = _UNSAFE.sub("_", value.strip().strip("<>")).strip("._")
    return cleaned[:limit] or "no-message-id"


def _message_id(content: bytes) -> str:
    header_end = re.search(rb"\r?\n\r?\n", content)
    headers = content[: header_end.start()] if header_end else content
    match = _MESSAGE_ID.search(headers)
    return match.group(1).decode("ascii", errors="replace") if match else ""


def free_port(host: str = DEFAULT_HOST) -> int:
    """A TCP port on ``host`` that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


class _FolderHandler:
    """aiosmtpd handler: every message that arrives becomes one ``.eml`` file."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._counter = itertools.count(1)
        self._lock = threading.Lock()
        self.fault = "none"  # none | refuse | hang: for fault-injection tests
        self.hang_seconds = 30.0

    def store(self, content: bytes, mail_from: str, rcpt_tos: list[str], peer: str = "") -> Path:
        with self._lock:
            number = next(self._counter)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        name = f"{stamp}-{number:06d}-{_sanitize(_message_id(content))}.eml"
        envelope = (
            f"X-MailFrom: {mail_from}\r\nX-RcptTo: {', '.join(rcpt_tos)}\r\n"
            f"X-Peer: {peer}\r\n"  # the sender's address and port: one per connection
        ).encode("utf-8", errors="replace")
        self.folder.mkdir(parents=True, exist_ok=True)
        final = self.folder / name
        partial = self.folder / f".{name}.partial"
        partial.write_bytes(envelope + content)
        os.replace(partial, final)
        return final

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        if self.fault == "refuse":
            return "451 4.3.0 Mail server busy, try again later"
        if self.fault == "hang":
            await asyncio.sleep(self.hang_seconds)
            return "451 4.4.2 Timed out"
        content = envelope.original_content or envelope.content
        if isinstance(content, str):
            content = content.encode("utf-8", errors="surrogateescape")
        peer = session.peer
        where = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else ""
        self.store(bytes(content), str(envelope.mail_from or ""), list(envelope.rcpt_tos), where)
        return "250 Message accepted for delivery"


class MailSink:
    """An SMTP server on ``host:port`` (loopback) that stores every message in ``folder``.

    ``port=0`` picks a free port; read the chosen one from :attr:`port` after
    :meth:`start`. Runs in a background thread; :meth:`stop` shuts it down cleanly.
    """

    def __init__(
        self, folder: Path | str, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT
    ) -> None:
        self.folder = Path(folder)
        self.host = host
        self.port = port
        self._handler = _FolderHandler(self.folder)
        self._controller: Controller | None = None

    @property
    def running(self) -> bool:
        return self._controller is not None

    def start(self) -> MailSink:
        if self._controller is not None:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.port == 0:
            self.port = free_port(self.host)
        controller = Controller(
            self._handler,
            hostname=self.host,
            port=self.port,
            enable_SMTPUTF8=True,
            ready_timeout=10.0,
        )
        controller.start()
        self._controller = controller
        return self

    def stop(self) -> None:
        controller, self._controller = self._controller, None
        if controller is not None:
            controller.stop()

    def messages(self) -> list[EmailMessage]:
        return read_messages(self.folder)

    def set_fault(self, fault: str, *, hang_seconds: float = 30.0) -> None:
        """Refuse every message (`refuse`), never answer in time (`hang`), or accept
        again (`none`): a mail server's outages, for fault-injection tests."""
        if fault not in ("none", "refuse", "hang"):
            raise ValueError(f"unknown fault {fault!r}: none, refuse or hang")
        self._handler.hang_seconds = hang_seconds
        self._handler.fault = fault

    def __enter__(self) -> MailSink:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"MailSink({str(self.folder)!r}, host={self.host!r}, port={self.port}, {state})"


def read_messages(folder: Path | str) -> list[EmailMessage]:
    """Every message stored in ``folder``, oldest first (an absent folder: none)."""
    path = Path(folder)
    if not path.is_dir():
        return []
    messages: list[EmailMessage] = []
    for file in sorted(path.glob("*.eml")):
        message = email.message_from_bytes(file.read_bytes(), policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        messages.append(message)
    return messages


def run_forever(
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    folder: Path | str = Path(".data/mail"),
    *,
    stop: threading.Event | None = None,
) -> None:
    """Run the sink in the foreground until SIGINT/SIGTERM (or ``stop`` is set)."""
    done = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: done.set())
    with MailSink(folder, host=host, port=port) as sink:
        print(
            f"mail sink: listening on {sink.host}:{sink.port}, writing to {sink.folder}", flush=True
        )
        while not done.wait(0.5):
            pass
    print("mail sink: stopped", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.mailsink", description="Local development mail sink."
    )
    # Same environment names as pipeline.settings, so the sink and the sender agree.
    data_dir = Path(os.environ.get("PRIVACY_DATA_DIR", ".data"))
    parser.add_argument("--host", default=os.environ.get("PRIVACY_SMTP_HOST", DEFAULT_HOST))
    parser.add_argument(
        "--port", type=int, default=int(os.environ.get("PRIVACY_SMTP_PORT", DEFAULT_PORT))
    )
    parser.add_argument("--folder", type=Path, default=data_dir / "mail")
    args = parser.parse_args(argv)
    run_forever(args.host, args.port, args.folder)


if __name__ == "__main__":
    main()
