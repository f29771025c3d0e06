"""Dead letters: messages dramatiq gave up on, read from and acted on in Redis.

dramatiq's Redis broker (its `dispatch.lua`) moves a failed message's body from
`ns:q.msgs` to the hash `ns:q.XQ.msgs` and its id to the sorted set `ns:q.XQ`, scored by
when it was dead-lettered; the id is the broker's own `redis_message_id` option. The
worker's `pipeline.deadletters` middleware writes the dead letter's body first: its reason
(`dead_letter_reason`) and, for anything that is not all ids (every intake document), the
arguments sealed with the key ring (`sealed`). Bytes that were no message at all are
dead-lettered the same way, under the actor `(undecodable)`. Dead letters written before
that (a clear document, a Retries traceback or none) are still read.

Nothing here shows a value from a message: an intake message carries the whole request
document, of which only the request id and type are shown (and, to officers, the subject
masked); other messages carry ids. Of an error only the recorded reason, or else the
exception type and, for post-intake queues, the first line of its message, with email
addresses masked, leave here.

An officer may replay a dead letter (the same actor and arguments, published again on its
queue with a new message id through the pipeline's `DramatiqBus`; the stages are
idempotent) or discard it with a reason. Each is audited with the operator's name.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from pipeline import audit, topology
from pipeline.dashboard.masking import mask_email, mask_subject
from pipeline.db import transaction
from pipeline.deadletters import INTAKE_RETRY, SEALED, UNDECODABLE_ACTOR, clean, unseal
from pipeline.errors import PermanentError
from pipeline.outbox import Envelope

if TYPE_CHECKING:
    import dramatiq

    from pipeline.bootstrap import App
    from pipeline.crypto import Keys

LIST_LIMIT = 100  # per queue, oldest first
_EMAIL = re.compile(r"[^\s@'\"<>(),;:]+@[^\s@'\"<>(),;:]+")
_ID = re.compile(r"^[A-Za-z0-9_.:@-]{1,128}$")
_ERROR_LINE = re.compile(r"^([A-Za-z_][\w.]*)(?::\s?(.*))?$")


class DeadLetterGone(PermanentError):
    """The dead letter is no longer there: replayed or discarded already, or expired."""


class DeadLettersUnavailable(PermanentError):
    """The broker is not Redis, or does not answer."""


@dataclass(frozen=True)
class DeadLetter:
    queue: str
    key: str  # the broker's redis_message_id: the member of ns:q.XQ
    message_id: str
    actor: str
    request_id: str | None
    summary: str  # what the message is about, with no personal data
    subject: dict[str, str] | None  # intake only: masked, for officers
    error: str
    retries: int
    failed_at: datetime


@dataclass(frozen=True)
class QueueDeadLetters:
    queue: str
    total: int
    letters: list[DeadLetter]


def _exception_line(traceback_text: str) -> str:
    """The first line of the last exception: after the last frame (`  File ...` and its
    indented source lines), the first line that is not indented. A message's later
    lines never count."""
    lines = traceback_text.splitlines()
    frames = [i for i, line in enumerate(lines) if line.startswith('  File "')]
    start = frames[-1] + 1 if frames else 0
    for line in lines[start:]:
        if line.strip() and not line[0].isspace():
            return line.strip()
    return ""


def error_summary(traceback_text: str | None, *, queue: str, reason: Any = None) -> str:
    """The reason the worker recorded (already free of personal data; cleaned again), else
    the exception type and the first line of its message, from the traceback's last
    line. Intake errors may quote the document: only their type is shown (or the intake
    actor's own `intake failed: <Type>`). Email addresses are masked anyway."""
    if isinstance(reason, str) and reason.strip():
        return clean(reason)
    if not traceback_text:
        return (
            "no error recorded: the actor gave up at once (a permanent error; see the worker log)"
        )
    match = _ERROR_LINE.match(_exception_line(traceback_text))
    if match is None:
        return "an error the dashboard cannot read (see the worker log)"
    kind = match.group(1).rsplit(".", 1)[-1]
    message = (match.group(2) or "").strip()
    if queue == topology.INTAKE_QUEUE:
        return f"{kind}: {message}" if INTAKE_RETRY.match(message) else kind
    if not message:
        return kind
    message = _EMAIL.sub(lambda m: mask_email(m.group(0)), message)
    if len(message) > 200:
        message = message[:199] + "…"
    return f"{kind}: {message}"


def _safe_ids(value: Any, *, shown: int = 5) -> str:
    """An id, or a batch's list of ids (the first few, and how many more)."""
    if not isinstance(value, list):
        return _safe_id(value)
    ids = ", ".join(_safe_id(v) for v in value[:shown])
    more = f", +{len(value) - shown} more" if len(value) > shown else ""
    return f"[{ids}{more}]"


def _safe_id(value: Any) -> str:
    text = str(value) if isinstance(value, str | int) else ""
    return text if _ID.match(text) else "(hidden)"


def content_of(
    key: str, options: dict[str, Any], body: dict[str, Any], keys: Keys | None
) -> dict[str, Any] | None:
    """The actor's arguments: sealed in the options (opened with `keys`), or in clear in a
    message of ids or a dead letter from before sealing. None if sealed and unreadable."""
    sealed = options.get(SEALED)
    if sealed is None:
        raw_args = body.get("args")
        return {"args": raw_args if isinstance(raw_args, list) else []}
    if keys is None or not isinstance(sealed, str):
        return None
    try:
        return unseal(keys, key, sealed)
    except Exception:
        return None


def describe(
    queue: str,
    key: str,
    raw: bytes | str,
    score: float,
    *,
    masked_pii: bool,
    keys: Keys | None = None,
) -> DeadLetter:
    """A dead letter as the dashboard shows it. `masked_pii` adds the masked subject of
    an intake message (officers); without it, no personal data at all. `keys` open sealed
    arguments to summarise them."""
    try:
        body = json.loads(raw)
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    actor = str(body.get("actor_name") or "?")
    raw_options = body.get("options")
    options: dict[str, Any] = raw_options if isinstance(raw_options, dict) else {}
    content = content_of(key, options, body, keys)
    raw_args = content.get("args") if content is not None else None
    args: list[Any] = raw_args if isinstance(raw_args, list) else []
    subject = None
    request_id: str | None = None
    if actor == UNDECODABLE_ACTOR:
        summary = "(not a message: nothing to show)"
    elif content is None:
        summary = "(sealed: cannot be opened with the current keys)"
    elif actor == topology.INTAKE_ACTOR:
        doc = args[0] if args and isinstance(args[0], dict) else {}
        request_id = _safe_id(doc.get("request_id"))
        summary = f"request {request_id}, type {_safe_id(doc.get('type'))}"
        raw_subject = doc.get("subject")
        if masked_pii and isinstance(raw_subject, dict):
            subject = mask_subject(raw_subject)
    else:
        shown = [_safe_ids(a) for a in args]
        summary = ", ".join(shown) if shown else "(no arguments)"
        first = args[0] if args else None
        if isinstance(first, list) and len(first) == 1:
            first = first[0]  # a batch of one names its request
        if actor != topology.SEND_EMAIL_ACTOR and _safe_id(first) != "(hidden)":
            request_id = _safe_id(first)
    kwargs = (content or {}).get("kwargs") or body.get("kwargs")
    if kwargs and isinstance(kwargs, dict):
        summary += f" (+ keyword arguments {', '.join(sorted(map(str, kwargs)))})"
    retries = options.get("retries")
    return DeadLetter(
        queue=queue,
        key=key,
        message_id=_safe_id(body.get("message_id")),
        actor=actor,
        request_id=request_id,
        summary=summary,
        subject=subject,
        error=error_summary(
            options.get("traceback"), queue=queue, reason=options.get("dead_letter_reason")
        ),
        retries=retries if isinstance(retries, int) else 0,
        failed_at=datetime.fromtimestamp(score / 1000, UTC),
    )


class DeadLetters:
    """Reads with the dashboard's Redis client; replays through a broker of its own
    (built on first use from the settings, so the dashboard's App keeps whatever bus
    it was given)."""

    def __init__(self, app: App, redis_client: Callable[[], Any]):
        self.app = app
        self._redis = redis_client
        self._broker: dramatiq.Broker | None = None

    @property
    def ns(self) -> str:
        return self.app.settings.queue_namespace

    def _keys(self, queue: str) -> tuple[str, str]:
        if queue not in topology.ALL_QUEUES:
            raise DeadLetterGone(f"there is no queue {queue!r}")
        return f"{self.ns}:{queue}.XQ", f"{self.ns}:{queue}.XQ.msgs"

    def _keys_or_none(self) -> Keys | None:
        try:
            return self.app.keys
        except Exception:
            return None

    def _check_redis(self) -> None:
        if not self.app.settings.broker_url.startswith(("redis://", "rediss://", "unix://")):
            raise DeadLettersUnavailable("dead letters are read from Redis brokers only")

    def list(
        self, *, masked_pii: bool, queue: str | None = None, limit: int = LIST_LIMIT
    ) -> list[QueueDeadLetters]:
        import redis

        self._check_redis()
        queues = [queue] if queue else list(topology.ALL_QUEUES)
        secrets = self._keys_or_none()
        found = []
        try:
            for q in queues:
                zset, msgs = self._keys(q)
                total = int(self._redis().zcard(zset))
                entries = self._redis().zrange(zset, 0, limit - 1, withscores=True)
                keys = [k.decode() if isinstance(k, bytes) else str(k) for k, _ in entries]
                bodies = self._redis().hmget(msgs, keys) if keys else []
                letters = [
                    describe(q, key, body, score, masked_pii=masked_pii, keys=secrets)
                    for key, (_, score), body in zip(keys, entries, bodies, strict=True)
                    if body is not None
                ]
                found.append(QueueDeadLetters(q, total, letters))
        except (redis.RedisError, OSError) as exc:
            raise DeadLettersUnavailable(
                f"the broker does not answer ({type(exc).__name__})"
            ) from exc
        return found

    def _take(self, queue: str, key: str) -> tuple[bytes, float]:
        """Claim a dead letter: only one of two operators pressing at once gets it."""
        zset, msgs = self._keys(queue)
        body = self._redis().hget(msgs, key)
        score = self._redis().zscore(zset, key)
        if body is None or score is None or not self._redis().zrem(zset, key):
            raise DeadLetterGone("that dead letter is gone: replayed or discarded already")
        return body, float(score)

    def _bus_broker(self) -> dramatiq.Broker:
        if self._broker is None:
            from pipeline.bootstrap import make_broker

            self._broker = make_broker(self.app.settings)
        return self._broker

    def replay(self, queue: str, key: str, *, operator: str) -> str:
        """Publish the message again with a new id; returns the new message id."""
        from pipeline.bootstrap import DramatiqBus

        self._check_redis()
        zset, msgs = self._keys(queue)
        keys = self._keys_or_none()
        stored = self._redis().hget(msgs, key)
        if stored is None:
            raise DeadLetterGone("that dead letter is gone: replayed or discarded already")
        message, args = self._replayable(key, stored, keys)  # refused before it is claimed
        body, score = self._take(queue, key)
        letter = describe(queue, key, body, score, masked_pii=False, keys=keys)
        new_id = str(uuid.uuid4())
        try:
            # The audit entry commits only if the publish succeeded; a failed publish
            # puts the dead letter back.
            with transaction(self.app.sessions) as session:
                audit.record(
                    session,
                    "dead_letter_replayed",
                    request_id=letter.request_id,
                    actor=operator,
                    queue=queue,
                    task=letter.actor,
                    message_id=letter.message_id,
                    new_message_id=new_id,
                )
                DramatiqBus(self._bus_broker()).publish(
                    Envelope(
                        id=new_id,
                        actor=str(message["actor_name"]),
                        queue=str(message.get("queue_name") or queue).removesuffix(".DQ"),
                        args=args,
                    )
                )
        except Exception:
            self._redis().zadd(zset, {key: score})
            raise
        self._redis().hdel(msgs, key)
        return new_id

    @staticmethod
    def _replayable(
        key: str, body: bytes | str, keys: Keys | None
    ) -> tuple[dict[str, Any], tuple[Any, ...]]:
        """The stored message and the arguments to publish again, or why it cannot be."""
        try:
            message = json.loads(body)
        except ValueError:
            message = None
        if not isinstance(message, dict) or message.get("actor_name") == UNDECODABLE_ACTOR:
            raise PermanentError("that dead letter is not a message: it cannot be replayed")
        options = message.get("options")
        content = content_of(key, options if isinstance(options, dict) else {}, message, keys)
        if content is None or not isinstance(content.get("args"), list):
            raise PermanentError("that dead letter is sealed with a key no longer in the ring")
        return message, tuple(content["args"])

    def discard(self, queue: str, key: str, *, operator: str, reason: str) -> None:
        self._check_redis()
        if not reason.strip():
            raise PermanentError("say why the message is discarded")
        _, msgs = self._keys(queue)
        body, score = self._take(queue, key)
        letter = describe(queue, key, body, score, masked_pii=False, keys=self._keys_or_none())
        try:
            with transaction(self.app.sessions) as session:
                audit.record(
                    session,
                    "dead_letter_discarded",
                    request_id=letter.request_id,
                    actor=operator,
                    queue=queue,
                    task=letter.actor,
                    message_id=letter.message_id,
                    reason=reason.strip(),
                )
        except Exception:
            self._redis().zadd(self._keys(queue)[0], {key: score})
            raise
        self._redis().hdel(msgs, key)

    def close(self) -> None:
        if self._broker is not None:
            self._broker.close()
