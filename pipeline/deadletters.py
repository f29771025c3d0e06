"""Dead letters that say why, and hold nothing personal.

dramatiq gives up on a message in three places, and left alone it records no reason for
two of them and keeps personal data in all three:

- An exception in an actor's `throws` (the pipeline's PermanentError, e.g. UnknownRequest
  for an id the state database does not hold), or retries exhausted: the Retries
  middleware fails the message. The Redis broker's `nack` then moves the body *as it was
  last enqueued* from `ns:q.msgs` to the dead-letter set (`ns:q.XQ`, `ns:q.XQ.msgs`):
  whatever the worker learnt on the last attempt is lost, and an intake document is kept
  in clear for the 7 days dramatiq keeps dead letters.
- A message for an actor nobody declared: the consumer thread fails it and nacks it.
- Bytes that do not decode as a message: the Redis consumer raises out of `__next__`, the
  consumer thread logs, sleeps and restarts, and the bytes stay claimed by this worker
  (`ns:__acks__.<worker>.q`) together with every other message fetched in the same batch:
  those are neither run nor dead-lettered until the worker process is gone, and then the
  bytes are handed to the next worker, which stops on them the same way.

So:

- `ArgumentCheck` fails, before it runs, a message whose arguments do not fit its
  actor's signature (count, names, and `str` parameters given something else): retrying
  cannot fix it, and dramatiq would retry a TypeError for hours.
- `DeadLetterReasons` runs just before a nack (`before_nack`: after Retries decided,
  before the broker moves the body) and rewrites the stored body of the failing message
  into its dead letter: the reason (exception type, and outside intake the first line of
  its message, emails masked, at most 200 characters), the retry count, and the
  arguments, which stay in clear only when they are all ids on a stage queue. Anything
  else (every intake document, anything odd on a stage queue) is sealed with the key
  ring (AES-256-GCM, bound to the dead letter's key) so that an officer can still replay
  it from the dashboard. dramatiq's traceback is not kept: it is in the worker log.
- `RedisBroker` (dramatiq's, with its fetch checked) moves whatever it fetches that is
  not a well-formed message for this queue straight to the dead-letter set, sealed, with
  the reason, so the consumer only ever sees messages it can run.

Sealing is done at the moment of failure with the keys alone, not in the state database:
the database being down is the usual reason an intake document runs out of retries.
"""

from __future__ import annotations

import base64
import functools
import inspect
import json
import re
import types
import typing
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import redis
import structlog
from dramatiq import Middleware
from dramatiq.brokers.redis import RedisBroker as _RedisBroker
from dramatiq.common import current_millis, q_name
from dramatiq.errors import ActorNotFound, ConnectionClosed, DecodeError, DramatiqError, Retry
from dramatiq.message import Message, get_encoder

from pipeline import topology
from pipeline.dashboard.masking import mask_email
from pipeline.errors import PermanentError

if TYPE_CHECKING:
    import dramatiq
    from dramatiq.broker import MessageProxy

    from pipeline.crypto import Keys

log = structlog.get_logger()

REASON = "dead_letter_reason"  # option: why the message was given up on, no personal data
SEALED = "sealed"  # option: the content that may be personal, sealed with the key ring
WITHHELD = "content_withheld"  # option: set when the content could not be sealed
UNDECODABLE_ACTOR = "(undecodable)"  # actor name of a dead letter made from raw bytes
REASON_LIMIT = 200
MAX_IDS = 1000  # a longer list of ids is sealed like anything else that is not ids

_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")  # an id: no '@', no spaces, short
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")
_EMAIL = re.compile(r"[^\s@'\"<>(),;:]+@[^\s@'\"<>(),;:]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
INTAKE_RETRY = re.compile(r"^intake failed: [A-Za-z_][A-Za-z0-9_]*$")
_KEPT_OPTIONS = ("retries", "max_retries", "requeue_timestamp")
_RETRIES_DONE = "_dead_letter_retries_done"  # on the MessageProxy, while it is processed


class BadArguments(PermanentError):
    """A message's arguments do not fit its actor: retrying cannot help."""


def is_id(value: Any) -> bool:
    return isinstance(value, str) and bool(_ID.match(value))


def is_ids(value: Any) -> bool:
    """An id, or a list of ids (a batched stage message's first argument)."""
    if isinstance(value, list):
        return 0 < len(value) <= MAX_IDS and all(is_id(v) for v in value)
    return is_id(value)


def clean(text: str) -> str:
    """One line, emails masked, at most REASON_LIMIT characters."""
    lines = text.strip().splitlines()
    line = _CONTROL.sub(" ", lines[0] if lines else "").strip()
    line = _EMAIL.sub(lambda m: mask_email(m.group(0)), line)
    return line if len(line) <= REASON_LIMIT else line[: REASON_LIMIT - 1] + "…"


def reason_for(exc: BaseException | None, *, queue: str) -> str:
    """The exception type, and the first line of its message where it cannot hold personal
    data: outside intake (stage errors name ids), and in intake only the intake actor's
    own `intake failed: <Type>` and dramatiq's own errors."""
    if exc is None:
        return "Failed: rejected by a middleware without an error (see the worker log)"
    kind = type(exc).__name__
    if isinstance(exc, ActorNotFound):
        return clean(f"{kind}: no actor named {str(exc)!r} is declared")
    text = str(exc)
    if q_name(queue) == topology.INTAKE_QUEUE:
        intake_safe = isinstance(exc, BadArguments) or (
            isinstance(exc, DramatiqError) and not isinstance(exc, Retry)
        )
        if not (intake_safe or (isinstance(exc, Retry) and INTAKE_RETRY.match(text))):
            return kind
    first = clean(text)
    return clean(f"{kind}: {first}") if first else kind


# -- sealing ---------------------------------------------------------------------------


def _context(key: str) -> bytes:
    return f"dead-letter:{key}".encode()


def seal(keys: Keys, key: str, content: dict[str, Any]) -> str:
    """`content` encrypted with the active data key, bound to the dead letter's key."""
    blob = keys.ring.encrypt_json(content, context=_context(key))
    return base64.b64encode(blob).decode("ascii")


def unseal(keys: Keys, key: str, sealed: str) -> dict[str, Any]:
    """The sealed content of a dead letter; DecryptionFailed if it is not ours."""
    from pipeline.crypto import DecryptionFailed

    try:
        blob = base64.b64decode(sealed, validate=True)
    except (ValueError, TypeError) as exc:
        raise DecryptionFailed("not a sealed dead letter") from exc
    value = keys.ring.decrypt_json(blob, context=_context(key))
    if not isinstance(value, dict):
        raise DecryptionFailed("not a sealed dead letter")
    return value


def _sealed_options(
    keys: Callable[[], Keys] | None, key: str, content: dict[str, Any]
) -> dict[str, Any]:
    """The options that carry `content`: sealed, or withheld (and logged) if it cannot be."""
    try:
        if keys is None:
            raise RuntimeError("no keys were given to the broker")
        return {SEALED: seal(keys(), key, content)}
    except Exception as exc:
        log.error("dead_letter_content_withheld", key=key, error=type(exc).__name__)
        return {WITHHELD: f"could not be sealed ({type(exc).__name__}); not kept"}


# -- the dead letter of a failed message -----------------------------------------------


def dead_letter_body(
    message: dramatiq.Message[Any], reason: str, keys: Callable[[], Keys] | None
) -> bytes:
    """What the dead-letter set keeps of a failed message."""
    key = str(message.options.get("redis_message_id") or message.message_id)
    in_clear = (
        q_name(message.queue_name) != topology.INTAKE_QUEUE
        and not message.kwargs
        and all(is_ids(a) for a in message.args)
    )
    options: dict[str, Any] = {"redis_message_id": key, REASON: reason}
    options.update(
        {k: message.options[k] for k in _KEPT_OPTIONS if isinstance(message.options.get(k), int)}
    )
    if not in_clear:
        content = {"args": list(message.args), "kwargs": dict(message.kwargs)}
        options.update(_sealed_options(keys, key, content))
    body = {
        "queue_name": message.queue_name,
        "actor_name": message.actor_name,
        "args": list(message.args) if in_clear else [],
        "kwargs": {},
        "options": options,
        "message_id": message.message_id,
        "message_timestamp": message.message_timestamp,
    }
    return json.dumps(body, separators=(",", ":")).encode()


# Overwrite a claimed message's body, only if it is still there (nack then moves it).
_OVERWRITE = """
if redis.call("hexists", KEYS[1], ARGV[1]) == 1 then
    redis.call("hset", KEYS[1], ARGV[1], ARGV[2])
    return 1
end
return 0
"""


class DeadLetterReasons(Middleware):
    """Gives every dead letter its reason and seals what may be personal (see the module)."""

    def __init__(self, keys: Callable[[], Keys] | None = None):
        self.keys = keys
        self._scripts: dict[int, Any] = {}

    def before_process_message(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        # Retries counts the attempt that gives up too: keep the count of retries done.
        setattr(message, _RETRIES_DONE, message.options.get("retries", 0))

    def before_nack(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        reason = reason_for(getattr(message, "_exception", None), queue=message.queue_name)
        message.options[REASON] = reason  # in-memory brokers keep this copy
        retries = getattr(message, _RETRIES_DONE, message.options.get("retries", 0))
        message.options["retries"] = retries if isinstance(retries, int) else 0
        log.warning(
            "message_dead_lettered",
            queue=q_name(message.queue_name),
            actor=message.actor_name,
            message_id=message.message_id,
            retries=message.options["retries"],
            reason=reason,
        )
        key = message.options.get("redis_message_id")
        if not isinstance(broker, _RedisBroker) or not isinstance(key, str):
            return  # RabbitMQ dead-letters the message as delivered: the reason is logged
        body = dead_letter_body(message._message, reason, self.keys)
        script = self._scripts.get(id(broker.client))
        if script is None:
            script = self._scripts[id(broker.client)] = broker.client.register_script(_OVERWRITE)
        try:
            script(
                keys=[f"{broker.namespace}:{message.queue_name}.msgs"],
                args=[key, body],
            )
        except redis.ConnectionError as exc:
            # dramatiq retries the whole post-processing (this hook, then the nack) on
            # its own connection error, as it does for a nack that fails.
            raise ConnectionClosed(exc) from None


# -- arguments -------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def _shape(fn: Callable[..., Any]) -> tuple[inspect.Signature, dict[str, Any]]:
    signature = inspect.signature(fn)
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # an annotation that does not resolve: check the count only
        hints = {}
    return signature, hints


def _type_name(hint: Any) -> str | None:
    """The name of a type the check understands (a class, a union of them, `list[...]`);
    None for anything else (`Any`, `object`, other generics), which is not checked."""
    if hint is None or hint is Any or hint is object:
        return None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        names = [_type_name(arg) for arg in typing.get_args(hint)]
        return None if None in names else " | ".join(str(n) for n in names)
    if origin is list:
        inner = [_type_name(arg) for arg in typing.get_args(hint)]
        return f"list[{inner[0]}]" if inner and inner[0] else "list"
    return hint.__name__ if isinstance(hint, type) else None


def _fits(value: Any, hint: Any) -> bool:
    """Whether `value` is of `hint`, for a hint `_type_name` understands."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in typing.get_args(hint))
    if origin is list:
        inner = typing.get_args(hint)
        if not isinstance(value, list):
            return False
        return not inner or _type_name(inner[0]) is None or all(_fits(v, inner[0]) for v in value)
    return isinstance(value, hint)


def argument_problem(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """Why `args` and `kwargs` do not fit `fn`, naming parameters and types, never values;
    "" if they fit."""
    signature, hints = _shape(fn)
    kinds = {name: _type_name(hints.get(name)) for name in signature.parameters}
    params = ", ".join(
        f"{name}: {kind}" if kind is not None else name for name, kind in kinds.items()
    )
    shown = f"{getattr(fn, '__name__', 'the actor')}({params})"
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError:
        return (
            f"{shown} was sent {len(args)} positional and "
            f"{len(kwargs)} keyword argument{'s' if len(kwargs) != 1 else ''}"
        )
    for name, value in bound.arguments.items():
        kind = kinds.get(name)
        if kind is not None and not _fits(value, hints[name]):
            return f"{shown}: {name} must be {kind}, was {type(value).__name__}"
    return ""


class ArgumentCheck(Middleware):
    """Fails, before it runs, a message whose arguments do not fit its actor."""

    def before_process_message(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        if message.failed:
            return
        actor = broker.get_actor(message.actor_name)
        problem = argument_problem(actor.fn, tuple(message.args), dict(message.kwargs))
        if problem:
            message.fail()
            message.stuff_exception(BadArguments(problem))


# -- bytes that are no message ---------------------------------------------------------


def fetch_problem(body: bytes, queue_name: str) -> str:
    """Why `body`, fetched from `queue_name`, is not a message this worker can run and
    acknowledge; "" if it is. Names no value from the body."""
    try:
        fields = get_encoder().decode(body)
        if not isinstance(fields, dict):
            raise TypeError("not an object")
        Message(**fields)  # the fields dramatiq's own decoding needs, and no others
    except (DecodeError, ValueError, TypeError) as exc:  # its text may quote the body
        cause = exc.error if isinstance(exc, DecodeError) else exc
        return f"not a dramatiq message ({type(cause).__name__}, {len(body)} bytes)"
    if not isinstance(fields.get("args"), list):
        return "not a dramatiq message: args is not a list"
    for name, kind in (("kwargs", dict), ("options", dict), ("message_timestamp", int)):
        if not isinstance(fields.get(name), kind):
            return f"not a dramatiq message: {name} is not a {kind.__name__}"
    if not (isinstance(fields.get("actor_name"), str) and _NAME.match(fields["actor_name"])):
        return "not a dramatiq message: actor_name is not an actor name"
    if not is_id(fields.get("message_id")):
        return "not a dramatiq message: message_id is not an id"
    if not is_id(fields["options"].get("redis_message_id")):
        return "not a message of this broker: it has no redis_message_id"
    if fields.get("queue_name") != queue_name:
        return "its queue_name is not the queue it was found on"
    return ""


# Move one claimed body to the dead-letter set under a new body, if still claimed.
_QUARANTINE = """
if redis.call("srem", KEYS[1], ARGV[1]) == 1 then
    redis.call("hdel", KEYS[2], ARGV[1])
    redis.call("zadd", KEYS[3], ARGV[2], ARGV[1])
    redis.call("hset", KEYS[4], ARGV[1], ARGV[3])
    return 1
end
return 0
"""


class RedisBroker(_RedisBroker):
    """dramatiq's Redis broker, whose fetch moves to the dead-letter set whatever is not a
    well-formed message for its queue, instead of handing the consumer something that
    stops it (see the module). `keys` seal what is moved."""

    def __init__(
        self,
        *,
        keys: Callable[[], Keys] | None = None,
        idle_poll_ms: int = 100,
        delay_poll_ms: int = 1000,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.keys = keys
        self.idle_poll_ms = idle_poll_ms
        self.delay_poll_ms = delay_poll_ms
        self._quarantine = self.client.register_script(_QUARANTINE)

    def consume(self, queue_name: str, prefetch: int = 1, timeout: int = 5000) -> Any:
        """An idle queue's consumer polls again after at most `idle_poll_ms` (dramatiq's
        worker asks for up to a second): a request waits that long at most per stage.

        A delay queue's consumer polls after at most `delay_poll_ms`: what it holds is
        due later (the pipeline's retries wait `retry_base_ms` or more, which bounds it),
        and the worker keeps what it fetched until it is due. Each worker process polls
        one delay queue per queue; at the stage queues' pace they cost about as much CPU
        as the stage queues' own idle polls, with nothing to gain."""
        poll = self.idle_poll_ms if q_name(queue_name) == queue_name else self.delay_poll_ms
        return super().consume(queue_name, prefetch, min(timeout, poll))

    def do_fetch(self, queue_name: str, prefetch: int) -> list[bytes | None]:
        bodies: list[bytes | None] = self._dispatch("fetch")(queue_name, prefetch)
        kept: list[bytes | None] = []
        for body in bodies:
            problem = fetch_problem(body, queue_name) if body is not None else ""
            if problem:
                self.quarantine(queue_name, body, f"UndecodableMessage: {problem}")
            else:
                kept.append(body)
        return kept

    def quarantine(self, queue_name: str, body: bytes | None, reason: str) -> None:
        """Dead-letter the body this worker just claimed from `queue_name`: found by its
        content among this worker's claims (the fetch returns bodies, not ids)."""
        ns = self.namespace
        claims = f"{ns}:__acks__.{self.broker_id}.{queue_name}"
        messages = f"{ns}:{queue_name}.msgs"
        try:
            ids = list(self.client.smembers(claims))
            stored = self.client.hmget(messages, ids) if ids else []
            key = next((k for k, b in zip(ids, stored, strict=True) if b == body), None)
            if key is None:
                log.error("message_quarantine_missed", queue=q_name(queue_name), reason=reason)
                return
            key_text = key.decode() if isinstance(key, bytes) else str(key)
            content = {"raw": base64.b64encode(body or b"").decode("ascii")}
            options: dict[str, Any] = {"redis_message_id": key_text, REASON: reason}
            options.update(_sealed_options(self.keys, key_text, content))
            letter = {
                "queue_name": queue_name,
                "actor_name": UNDECODABLE_ACTOR,
                "args": [],
                "kwargs": {},
                "options": options,
                "message_id": key_text,
                "message_timestamp": current_millis(),
            }
            now = current_millis()
            self._quarantine(
                keys=[
                    claims,
                    messages,
                    f"{ns}:{q_name(queue_name)}.XQ",
                    f"{ns}:{q_name(queue_name)}.XQ.msgs",
                ],
                args=[key, now, json.dumps(letter, separators=(",", ":"))],
            )
        except redis.ConnectionError as exc:
            raise ConnectionClosed(exc) from None
        log.warning(
            "message_dead_lettered",
            queue=q_name(queue_name),
            actor=UNDECODABLE_ACTOR,
            message_id=key_text,
            size=len(body or b""),
            reason=reason,
        )
