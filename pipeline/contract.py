"""The intake contract, version 1: parse and validate a request document.

The JSON Schema in `schema/privacy-request-1.json` is the published contract; this
module applies it and the rules a schema cannot state (timestamps, the signed
assertion). Every rejection names the field and the rule it broke, and never echoes
the value: a rejection reason is stored and logged, and the value may be personal data.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cache
from importlib import resources
from typing import Any

from jsonschema import Draft202012Validator, validators
from jsonschema.exceptions import ValidationError

from pipeline.errors import InvalidRequest
from pipeline.states import Jurisdiction, RequestType

SCHEMA_ID = "allego.privacy-request/1"
_FUTURE_TOLERANCE = timedelta(minutes=15)
# every code a rejection may carry (the README lists them for intake systems)
REJECTION_CODES = frozenset(
    {
        "not_json", "oversized", "too_deep", "invalid_text", "unknown_schema",
        "unknown_type", "unknown_jurisdiction", "unknown_channel", "missing_field",
        "wrong_type", "invalid_format", "invalid_value", "empty_field", "unknown_field",
        "unknown_correction_field", "bad_timestamp", "too_long", "conflicting_request",
        "bad_assertion", "expired_assertion",
    }
)  # fmt: skip
# the schema's request_id pattern: a rejection carries the id only when it is one
_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


@cache
def schema() -> dict[str, Any]:
    text = resources.files("pipeline").joinpath("schema/privacy-request-1.json").read_text()
    return json.loads(text)  # type: ignore[no-any-return]


@cache
def _ecma_regex(pattern: str) -> re.Pattern[str]:
    """JSON Schema patterns are ECMA-262, where `$` ends the text; Python's `$` also
    matches before a final newline, which would let `"Dana\\n"` through."""
    if pattern.endswith("$") and not pattern.endswith("\\$"):
        pattern = pattern[:-1] + r"\Z"
    return re.compile(pattern)


def _pattern(
    validator: Any, pattern: str, instance: Any, _schema: Mapping[str, Any]
) -> Iterator[ValidationError]:
    if validator.is_type(instance, "string") and not _ecma_regex(pattern).search(instance):
        yield ValidationError("does not match the pattern")


_Validator = validators.extend(Draft202012Validator, {"pattern": _pattern})


@cache
def _validator() -> Draft202012Validator:
    return _Validator(schema())  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Subject:
    email: str
    name: str | None = None
    phone: str | None = None
    product_ids: Mapping[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "email": self.email,
            "name": self.name,
            "phone": self.phone,
            "product_ids": dict(self.product_ids),
        }


@dataclass(frozen=True)
class Assertion:
    system: str
    expires_at: datetime
    signature: str


@dataclass(frozen=True)
class IntakeDocument:
    request_id: str
    type: RequestType
    subject: Subject
    jurisdiction: Jurisdiction
    received_at: datetime
    channel: str
    corrections: tuple[tuple[str, str], ...] = ()
    concern: str | None = None
    verification: Assertion | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False)


def _where(error: ValidationError) -> str:
    parts = [str(p) if not isinstance(p, int) else f"[{p}]" for p in error.absolute_path]
    text = ".".join(parts).replace(".[", "[")
    return text or "document"


_CODES: dict[tuple[str, ...], str] = {
    ("type",): "unknown_type",
    ("schema",): "unknown_schema",
    ("jurisdiction",): "unknown_jurisdiction",
    ("channel",): "unknown_channel",
}


def _explain(error: ValidationError) -> InvalidRequest:
    """Turn a schema error into a specific reason that does not repeat the value."""
    where = _where(error)
    path = tuple(str(p) for p in error.absolute_path)
    v = error.validator
    if v == "required":
        missing = error.message.split("'")[1] if "'" in error.message else "a field"
        target = f"{where}.{missing}" if where != "document" else missing
        return InvalidRequest(f"{target} is required", code="missing_field")
    if v == "const" and path == ("schema",):
        return InvalidRequest(f"schema must be {SCHEMA_ID!r}", code="unknown_schema")
    if v == "enum":
        allowed = ", ".join(str(x) for x in error.validator_value)
        code = _CODES.get(
            path, "unknown_correction_field" if path[-1:] == ("field",) else "invalid_value"
        )
        return InvalidRequest(f"{where} must be one of: {allowed}", code=code)
    if v == "type":
        return InvalidRequest(f"{where} must be of type {error.validator_value}", code="wrong_type")
    if v == "additionalProperties":
        extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        safe = [e for e in extra if e.isidentifier() and len(e) <= 40]
        named = ", ".join(safe) if len(safe) == len(extra) else "a field"
        return InvalidRequest(f"{where} has an unknown field: {named}", code="unknown_field")
    if v in ("maxLength", "maxItems", "maxProperties"):
        return InvalidRequest(
            f"{where} is too long (at most {error.validator_value})", code="too_long"
        )
    if v in ("minLength", "minItems"):
        return InvalidRequest(f"{where} must not be empty", code="empty_field")
    if v == "pattern":
        what = {
            "email": "a valid email address",
            "phone": "a phone number (digits, +, spaces)",
            "request_id": "letters, digits and . _ : - only",
        }.get(path[-1] if path else "")
        detail = f"must be {what}" if what else "contains characters that are not allowed"
        return InvalidRequest(f"{where} {detail}", code="invalid_format")
    return InvalidRequest(f"{where} is invalid ({v})", code="invalid_value")


def _timestamp(value: str, where: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError as exc:
        raise InvalidRequest(
            f"{where} must be an RFC 3339 timestamp", code="bad_timestamp"
        ) from exc
    if "T" not in value.upper() or parsed.tzinfo is None:
        raise InvalidRequest(
            f"{where} must be an RFC 3339 timestamp with a time zone", code="bad_timestamp"
        )
    return parsed.astimezone(UTC)


def decode(raw: bytes | str | Mapping[str, Any], *, max_bytes: int) -> dict[str, Any]:
    """Bytes, text or an object in; a JSON object out, or a specific rejection."""
    if isinstance(raw, Mapping):
        try:
            size = len(json.dumps(raw, ensure_ascii=False).encode("utf-8", "surrogatepass"))
        except RecursionError as exc:
            raise InvalidRequest("document is nested too deeply", code="too_deep") from exc
        except (TypeError, ValueError) as exc:
            raise InvalidRequest("document is not JSON-serialisable", code="not_json") from exc
        if size > max_bytes:
            raise InvalidRequest(f"document is larger than {max_bytes} bytes", code="oversized")
        doc = dict(raw)
    else:
        data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
        if len(data) > max_bytes:
            raise InvalidRequest(f"document is larger than {max_bytes} bytes", code="oversized")
        try:
            doc = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise InvalidRequest("document is not valid UTF-8", code="not_json") from exc
        except (ValueError, RecursionError) as exc:
            raise InvalidRequest("document is not valid JSON", code="not_json") from exc
    if not isinstance(doc, dict):
        raise InvalidRequest("document must be a JSON object", code="not_json")
    return doc


def parse(
    raw: bytes | str | Mapping[str, Any], *, max_bytes: int = 64 * 1024, now: datetime | None = None
) -> IntakeDocument:
    doc = decode(raw, max_bytes=max_bytes)
    given = doc.get("request_id")
    request_id = given if isinstance(given, str) and _REQUEST_ID.fullmatch(given) else None
    try:
        _check_strings(doc)
        if doc.get("schema") != SCHEMA_ID:  # another version cannot be judged by this one
            raise InvalidRequest(f"schema must be {SCHEMA_ID!r}", code="unknown_schema")
        error = _best_error(doc)
        if error is not None:
            raise _explain(error)
        return _build(doc, now or datetime.now(UTC))
    except InvalidRequest as exc:
        exc.request_id = request_id
        raise


def _check_strings(value: Any, depth: int = 0) -> None:
    """Lone surrogates (invalid UTF-8 smuggled through JSON escapes) never get further."""
    if depth > 32:
        raise InvalidRequest("document is nested too deeply", code="too_deep")
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidRequest(
                "document holds text that is not valid Unicode", code="invalid_text"
            ) from exc
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_strings(k, depth + 1)
            _check_strings(v, depth + 1)
    elif isinstance(value, list):
        for v in value:
            _check_strings(v, depth + 1)


def _best_error(doc: dict[str, Any]) -> ValidationError | None:
    errors = list(_validator().iter_errors(doc))
    if not errors:
        return None
    # the shallowest error first: "subject is required" beats its consequences
    errors.sort(key=lambda e: (len(e.absolute_path), e.validator != "required"))
    return errors[0]


def _build(doc: dict[str, Any], now: datetime) -> IntakeDocument:
    kind = RequestType(doc["type"])
    received_at = _timestamp(doc["received_at"], "received_at")
    if received_at > now + _FUTURE_TOLERANCE:
        raise InvalidRequest("received_at lies in the future", code="bad_timestamp")
    if "corrections" in doc and kind is not RequestType.CORRECT:
        raise InvalidRequest("corrections belong only to a correct request", code="invalid_value")
    if "concern" in doc and kind is not RequestType.CONCERN:
        raise InvalidRequest("concern belongs only to a concern request", code="invalid_value")
    s = doc["subject"]
    subject = Subject(
        email=s["email"].strip(),
        name=s.get("name"),
        phone=s.get("phone"),
        product_ids=dict(s.get("product_ids", {})),
    )
    corrections = tuple((c["field"], c["value"]) for c in doc.get("corrections", ()))
    if len({f for f, _ in corrections}) != len(corrections):
        raise InvalidRequest("corrections name the same field twice", code="invalid_value")
    assertion = None
    if "verification" in doc:
        v = doc["verification"]
        assertion = Assertion(
            system=v["system"],
            expires_at=_timestamp(v["expires_at"], "verification.expires_at"),
            signature=v["signature"],
        )
    return IntakeDocument(
        request_id=doc["request_id"],
        type=kind,
        subject=subject,
        jurisdiction=Jurisdiction(doc["jurisdiction"]),
        received_at=received_at,
        channel=doc["channel"],
        corrections=corrections,
        concern=doc["concern"]["message"] if "concern" in doc else None,
        verification=assertion,
        raw=doc,
    )


# -- signed assertions --------------------------------------------------------------


def assertion_message(
    request_id: str, kind: str, email: str, system: str, expires_at: str
) -> bytes:
    return "|".join(
        [SCHEMA_ID, request_id, kind, email.strip().lower(), system, expires_at]
    ).encode()


def sign_assertion(
    key: bytes, *, request_id: str, kind: str, email: str, system: str, expires_at: datetime
) -> dict[str, str]:
    """What an intake system puts in `verification` (shipped for intake teams and tests)."""
    stamp = expires_at.astimezone(UTC).isoformat().replace("+00:00", "Z")
    mac = hmac.new(key, assertion_message(request_id, kind, email, system, stamp), hashlib.sha256)
    return {
        "system": system,
        "expires_at": stamp,
        "signature": base64.urlsafe_b64encode(mac.digest()).decode().rstrip("="),
    }


def check_assertion(doc: IntakeDocument, intake_keys: Mapping[str, bytes], now: datetime) -> str:
    """Verify the signed assertion; returns the system name. Invalid or expired is rejected,
    never downgraded to email confirmation."""
    a = doc.verification
    assert a is not None
    key = intake_keys.get(a.system)
    if key is None:
        raise InvalidRequest(
            "verification.system is not a known intake system",
            code="bad_assertion",
            request_id=doc.request_id,
        )
    raw_expiry = doc.raw["verification"]["expires_at"]
    expected = hmac.new(
        key,
        assertion_message(doc.request_id, doc.type.value, doc.subject.email, a.system, raw_expiry),
        hashlib.sha256,
    ).digest()
    given = a.signature + "=" * (-len(a.signature) % 4)
    try:
        given_raw = base64.urlsafe_b64decode(given)
    except ValueError as exc:
        raise InvalidRequest(
            "verification.signature is not valid", code="bad_assertion", request_id=doc.request_id
        ) from exc
    if not hmac.compare_digest(expected, given_raw):
        raise InvalidRequest(
            "verification.signature does not match",
            code="bad_assertion",
            request_id=doc.request_id,
        )
    if a.expires_at <= now:
        raise InvalidRequest(
            "verification has expired", code="expired_assertion", request_id=doc.request_id
        )
    return a.system


def content_fingerprint(doc: Mapping[str, Any]) -> bytes:
    """Canonical bytes of a document, for comparing a resubmission with the original."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode(
        "utf-8", "surrogatepass"
    )
