"""The intake contract (R6): every kind of bad document gets its own code and a reason that
names the field, never the value; signed assertions (R7) are checked strictly."""

from __future__ import annotations

import contextlib
import copy
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline import contract
from pipeline.contract import check_assertion, parse, sign_assertion
from pipeline.errors import InvalidRequest
from pipeline.states import Jurisdiction, RequestType

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
KEY = b"k" * 32
KEYS = {"allego-app": KEY, "support-desk": b"s" * 32}


def valid(kind: str = "access", **changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "schema": contract.SCHEMA_ID,
        "request_id": "req-2026.06:001",
        "type": kind,
        "subject": {
            "email": "dana.reyes@example.com",
            "name": "Dana Reyes",
            "phone": "+1 (555) 010-0100",
            "product_ids": {"crm": "c-1"},
        },
        "jurisdiction": "gdpr",
        "received_at": "2026-05-31T10:00:00Z",
        "channel": "web",
    }
    if kind == "correct":
        doc["corrections"] = [{"field": "name", "value": "Dana R. Reyes"}]
    if kind == "concern":
        doc["concern"] = {"message": "Why do you email me?\nPlease stop."}
    for key, value in changes.items():
        if value is None:
            doc.pop(key, None)
        else:
            doc[key] = value
    return doc


def rejection(raw: Any, **kw: Any) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        parse(raw, now=NOW, **kw)
    return info.value


def with_subject(**fields: Any) -> dict[str, Any]:
    subject = {"email": "dana.reyes@example.com"}
    subject.update(fields)
    return valid(subject=subject)


# -- valid documents ------------------------------------------------------------------


@pytest.mark.parametrize("kind", [t.value for t in RequestType])
def test_a_valid_document_of_every_type_parses(kind):
    doc = parse(valid(kind), now=NOW)
    assert doc.type is RequestType(kind)
    assert doc.request_id == "req-2026.06:001"
    assert doc.subject.email == "dana.reyes@example.com"
    assert doc.jurisdiction is Jurisdiction.GDPR
    assert doc.received_at == datetime(2026, 5, 31, 10, 0, tzinfo=UTC)
    assert doc.corrections == ((("name", "Dana R. Reyes"),) if kind == "correct" else ())
    assert (doc.concern is not None) is (kind == "concern")


def test_a_document_parses_from_bytes_and_text_alike():
    raw = json.dumps(valid())
    assert parse(raw, now=NOW) == parse(raw.encode(), now=NOW)


def test_received_at_with_an_offset_is_converted_to_utc():
    doc = parse(valid(received_at="2026-05-31T12:00:00+02:00"), now=NOW)
    assert doc.received_at == datetime(2026, 5, 31, 10, 0, tzinfo=UTC)


def test_a_minimal_document_with_only_required_fields_parses():
    doc = parse(valid(subject={"email": "a@b.co"}), now=NOW)
    assert doc.subject.name is None and doc.subject.phone is None


# -- invalid documents: a specific code, a reason naming the field ---------------------

CASES: list[tuple[str, Any, str, str]] = [
    ("wrong schema", valid(schema="allego.privacy-request/2"), "unknown_schema", "schema"),
    ("schema missing", valid(schema=None), "unknown_schema", "schema"),
    ("unknown type", valid(type="sell_my_data"), "unknown_type", "type"),
    ("unknown jurisdiction", valid(jurisdiction="mars"), "unknown_jurisdiction", "jurisdiction"),
    ("unknown channel", valid(channel="pigeon"), "unknown_channel", "channel"),
    ("missing email", valid(subject={"name": "Dana"}), "missing_field", "subject.email"),
    ("missing subject", valid(subject=None), "missing_field", "subject"),
    ("bad email", with_subject(email="dana at example"), "invalid_format", "subject.email"),
    ("email wrong type", with_subject(email=42), "wrong_type", "subject.email"),
    (
        "timestamp without zone",
        valid(received_at="2026-05-31T10:00:00"),
        "bad_timestamp",
        "received_at",
    ),
    ("timestamp not a date", valid(received_at="last tuesday"), "bad_timestamp", "received_at"),
    ("date without time", valid(received_at="2026-05-31"), "bad_timestamp", "received_at"),
    (
        "timestamp in the future",
        valid(received_at="2026-06-02T12:00:00Z"),
        "bad_timestamp",
        "received_at",
    ),
    (
        "correction of unknown field",
        valid("correct", corrections=[{"field": "salary", "value": "1"}]),
        "unknown_correction_field",
        "corrections[0].field",
    ),
    (
        "corrections on an access request",
        valid(corrections=[{"field": "name", "value": "X"}]),
        "invalid_value",
        "corrections",
    ),
    (
        "the same field corrected twice",
        valid(
            "correct",
            corrections=[{"field": "name", "value": "A"}, {"field": "name", "value": "B"}],
        ),
        "invalid_value",
        "corrections",
    ),
    (
        "correct without corrections",
        valid("correct", corrections=None),
        "missing_field",
        "corrections",
    ),
    ("concern missing for a concern", valid("concern", concern=None), "missing_field", "concern"),
    (
        "concern on an erase request",
        valid("erase", concern={"message": "x"}),
        "invalid_value",
        "concern",
    ),
    (
        "crlf in name",
        with_subject(name="Dana\r\nBcc: evil@x.com"),
        "invalid_format",
        "subject.name",
    ),
    ("unknown top-level field", valid(notes="hi"), "unknown_field", "notes"),
    ("unknown subject field", with_subject(ssn="078-05-1120"), "unknown_field", "subject"),
    ("bad phone", with_subject(phone="call me maybe"), "invalid_format", "subject.phone"),
    ("empty name", with_subject(name=""), "empty_field", "subject.name"),
    ("request id with a slash", valid(request_id="a/b"), "invalid_format", "request_id"),
]


@pytest.mark.parametrize(
    ("raw", "code", "field"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_an_invalid_document_gets_its_specific_code_and_names_the_field(raw, code, field):
    error = rejection(raw)
    assert error.code == code
    assert field in error.reason


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (with_subject(name="Dana Reyes\n"), "subject.name"),
        (with_subject(phone="+1 555 0100\n"), "subject.phone"),
        (with_subject(email="dana@example.com\n"), "subject.email"),
        (with_subject(product_ids={"crm": "c-1\n"}), "subject.product_ids"),
        (valid(request_id="req-1\n"), "request_id"),
        (valid("correct", corrections=[{"field": "name", "value": "Dana\n"}]), "corrections"),
    ],
    ids=["name", "phone", "email", "product id", "request id", "correction value"],
)
def test_a_trailing_newline_in_a_single_line_field_is_rejected(raw, field):
    # JSON Schema patterns are ECMA-262: `$` is the end of the text, not "before a final \n"
    error = rejection(raw)
    assert error.code == "invalid_format"
    assert field in error.reason


def test_every_code_the_contract_raises_is_listed_for_intake_systems():
    import re
    from pathlib import Path

    source = Path(contract.__file__).read_text()
    raised = set(re.findall(r'code="([a-z_]+)"', source))
    raised |= set(re.findall(r'"((?:unknown|invalid)_[a-z_]+)"', source))
    raised.add("conflicting_request")  # raised by intake
    assert raised <= contract.REJECTION_CODES
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    assert all(f"`{code}`" in readme for code in contract.REJECTION_CODES)


def test_the_rejection_carries_the_request_id_so_it_can_be_recorded():
    assert rejection(valid(type="nope")).request_id == "req-2026.06:001"


def test_an_oversized_document_is_rejected_before_parsing():
    error = rejection(json.dumps(valid(concern={"message": "x" * 5000})), max_bytes=4096)
    assert error.code == "oversized"
    assert "4096" in error.reason


def test_an_oversized_mapping_is_rejected_too():
    assert rejection(valid(), max_bytes=100).code == "oversized"


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"{not json", "not valid JSON"),
        (b"", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        ('"just text"', "must be a JSON object"),
        (b"null", "must be a JSON object"),
        (b'{"schema": "\xff\xfe"}', "not valid UTF-8"),
    ],
    ids=["not json", "empty", "array", "string", "null", "invalid utf-8"],
)
def test_bytes_that_are_not_a_json_object_are_rejected_as_not_json(raw, reason):
    error = rejection(raw)
    assert error.code == "not_json"
    assert reason in error.reason


def test_a_lone_surrogate_smuggled_through_a_json_escape_is_rejected():
    raw = json.dumps(with_subject(name="Dana")).replace("Dana", "\\ud800Dana")
    error = rejection(raw.encode())
    assert error.code == "invalid_text"


def test_a_lone_surrogate_in_a_mapping_is_rejected():
    assert rejection(with_subject(name="Da\udc00na")).code == "invalid_text"


def test_a_deeply_nested_document_is_rejected():
    nested: dict[str, Any] = {}
    inner = nested
    for _ in range(50):
        inner["x"] = {}
        inner = inner["x"]
    error = rejection(valid(notes=nested))
    assert error.code == "too_deep"


def test_a_document_nested_beyond_the_json_parser_limit_is_rejected_not_crashed():
    raw = ("[" * 50_000 + "]" * 50_000).encode()
    assert rejection(raw, max_bytes=200_000).code == "not_json"


def test_a_mapping_nested_beyond_the_interpreter_limit_is_rejected_not_crashed():
    # found by bench/fuzz_intake.py: json.dumps of the mapping raised RecursionError
    nested: Any = "deep"
    for _ in range(5000):
        nested = {"k": nested}
    assert rejection(valid(notes=nested)).code == "too_deep"


def test_a_request_id_that_breaks_the_contract_is_not_carried_by_the_rejection():
    # found by bench/fuzz_intake.py: a lone surrogate in request_id reached the
    # rejections table and the insert crashed
    for bad in ("r-\udcf1", "r\r\nx", "-leading-dash", "x" * 129, "ok id"):
        error = rejection(valid(request_id=bad))
        assert error.request_id is None, bad


def test_a_mapping_that_is_not_json_serialisable_is_rejected():
    assert rejection({"schema": object()}).code == "not_json"


# -- the reason never contains the value -----------------------------------------------

MARK = "Zq7Xw"  # a run of characters no reason template contains


@pytest.mark.parametrize("field", ["email", "name", "phone"])
@given(
    before=st.text(max_size=30),
    after=st.text(max_size=30),
    breaker=st.sampled_from(["\n", "\r\n", "\x00", "\x7f", "<", "@@", " ", "\t"]),
)
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_a_rejected_subject_value_never_appears_in_the_reason(field, before, after, breaker):
    value = before + MARK + breaker + after
    try:
        parse(with_subject(**{field: value}), now=NOW)
    except InvalidRequest as error:
        assert MARK not in error.reason
        assert value not in error.reason
        assert error.code != "invalid"


@pytest.mark.parametrize("field", ["email", "name", "phone"])
@given(value=st.text(min_size=8))
def test_any_random_subject_value_is_never_echoed_in_the_reason(field, value):
    try:
        parse(with_subject(**{field: value}), now=NOW)
    except InvalidRequest as error:
        doc_text = json.dumps(valid())
        if value not in doc_text and value not in contract.SCHEMA_ID:
            assert value not in error.reason


@given(value=st.text(min_size=1, max_size=60).map(lambda s: MARK + s))
def test_a_bad_timestamp_or_correction_value_is_never_echoed(value):
    for doc in (
        valid(received_at=value),
        valid("correct", corrections=[{"field": value, "value": "x"}]),
        valid("correct", corrections=[{"field": "name", "value": value + "\n"}]),
    ):
        with pytest.raises(InvalidRequest) as info:
            parse(doc, now=NOW)
        assert MARK not in info.value.reason


# -- fuzz: nothing but InvalidRequest ever comes out -----------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5)
    ),
    max_leaves=30,
)


@given(json_values)
def test_parse_of_any_json_like_value_raises_only_invalid_request(value):
    with contextlib.suppress(InvalidRequest):
        parse(value if isinstance(value, dict) else json.dumps(value), now=NOW)


@given(st.binary(max_size=300))
def test_parse_of_any_bytes_raises_only_invalid_request(raw):
    with contextlib.suppress(InvalidRequest):
        parse(raw, now=NOW)


PATHS = [
    ("schema",),
    ("request_id",),
    ("type",),
    ("subject",),
    ("subject", "email"),
    ("subject", "name"),
    ("subject", "phone"),
    ("subject", "product_ids"),
    ("jurisdiction",),
    ("received_at",),
    ("channel",),
    ("corrections",),
    ("concern",),
    ("verification",),
    ("extra",),
]


@given(
    kind=st.sampled_from([t.value for t in RequestType]),
    path=st.sampled_from(PATHS),
    value=json_values,
)
def test_parse_of_a_valid_document_with_any_field_replaced_raises_only_invalid_request(
    kind, path, value
):
    doc = valid(kind)
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    try:
        parse(doc, now=NOW)
    except InvalidRequest as error:
        assert error.reason and error.code


# -- signed assertions -----------------------------------------------------------------


def signed(kind: str = "access", *, key: bytes = KEY, system: str = "allego-app", **kw: Any):
    fields = {
        "request_id": "req-2026.06:001",
        "kind": kind,
        "email": "dana.reyes@example.com",
        "system": system,
        "expires_at": NOW + timedelta(minutes=10),
    }
    fields.update(kw)
    return sign_assertion(key, **fields)


def checked(doc: dict[str, Any], now: datetime = NOW) -> str:
    return check_assertion(parse(doc, now=now), KEYS, now)


def test_a_signed_assertion_round_trips():
    assert checked(valid(verification=signed())) == "allego-app"


def test_the_assertion_ignores_email_case_and_surrounding_space():
    doc = valid(verification=signed(email="  Dana.Reyes@Example.COM "))
    assert checked(doc) == "allego-app"


@pytest.mark.parametrize(
    ("make", "code"),
    [
        (lambda: valid(verification={**signed(), "signature": "A" * 43}), "bad_assertion"),
        (lambda: valid(verification={**signed(), "signature": "A" * 17}), "bad_assertion"),
        (lambda: valid(verification=signed(key=b"o" * 32)), "bad_assertion"),
        (lambda: valid(verification=signed(system="support-desk")), "bad_assertion"),
        (lambda: valid(verification=signed(system="unknown-app")), "bad_assertion"),
        (lambda: valid(verification=signed(email="other@example.com")), "bad_assertion"),
        (lambda: valid(verification=signed(kind="erase")), "bad_assertion"),
        (lambda: valid(verification=signed(request_id="req-other")), "bad_assertion"),
        (
            lambda: valid(verification=signed(expires_at=NOW - timedelta(seconds=1))),
            "expired_assertion",
        ),
    ],
    ids=[
        "altered signature",
        "short signature",
        "signed with another key",
        "signed as another system",
        "unknown system",
        "other email",
        "other type",
        "other request id",
        "expired",
    ],
)
def test_a_bad_assertion_is_rejected_with_its_code(make, code):
    with pytest.raises(InvalidRequest) as info:
        checked(make())
    assert info.value.code == code
    assert "verification" in info.value.reason


def test_a_valid_assertion_checked_after_its_expiry_is_rejected_as_expired():
    doc = valid(verification=signed())
    with pytest.raises(InvalidRequest) as info:
        check_assertion(parse(doc, now=NOW), KEYS, NOW + timedelta(minutes=11))
    assert info.value.code == "expired_assertion"


def test_an_assertion_with_a_changed_expiry_no_longer_matches():
    token = signed()
    token["expires_at"] = "2030-01-01T00:00:00Z"
    with pytest.raises(InvalidRequest) as info:
        checked(valid(verification=token))
    assert info.value.code == "bad_assertion"


def test_an_assertion_missing_a_field_is_a_contract_error():
    token = signed()
    del token["signature"]
    assert rejection(valid(verification=token)).code == "missing_field"


def test_content_fingerprint_ignores_key_order_but_not_content():
    a = valid()
    b = dict(reversed(list(copy.deepcopy(a).items())))
    assert contract.content_fingerprint(a) == contract.content_fingerprint(b)
    assert contract.content_fingerprint(a) != contract.content_fingerprint(valid(channel="email"))
