"""Deadlines (R1, R2, invariant 8): due dates, extensions within the law, at risk, overdue."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.policy import (
    AT_RISK_WINDOW,
    ExtensionRefused,
    add_months,
    due_date,
    extend,
    is_at_risk,
    is_overdue,
    max_due_date,
)
from pipeline.states import Jurisdiction

GDPR, CCPA, OTHER = Jurisdiction.GDPR, Jurisdiction.CCPA, Jurisdiction.OTHER


def at(year: int, month: int, day: int, hour: int = 10) -> datetime:
    return datetime(year, month, day, hour, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("received", "due"),
    [
        (at(2026, 3, 15), at(2026, 4, 15)),
        (at(2026, 1, 31), at(2026, 2, 28)),  # no 31 Feb: the last day of February
        (at(2028, 1, 31), at(2028, 2, 29)),  # leap year
        (at(2026, 3, 31), at(2026, 4, 30)),
        (at(2026, 12, 15), at(2027, 1, 15)),  # across the year end
        (at(2026, 2, 28), at(2026, 3, 28)),
    ],
    ids=str,
)
def test_gdpr_due_date_is_one_calendar_month_after_receipt(received, due):
    assert due_date(GDPR, received) == due


def test_ccpa_due_date_is_45_calendar_days_after_receipt():
    assert due_date(CCPA, at(2026, 1, 31)) == at(2026, 3, 17)


def test_other_jurisdictions_get_30_days():
    assert due_date(OTHER, at(2026, 1, 31)) == at(2026, 3, 2)


def test_due_date_keeps_the_time_of_day_and_zone():
    received = datetime(2026, 5, 4, 23, 59, 30, tzinfo=UTC)
    assert due_date(GDPR, received) == datetime(2026, 6, 4, 23, 59, 30, tzinfo=UTC)


def test_add_months_clamps_to_the_last_day_of_the_month():
    assert add_months(at(2026, 1, 31), 3) == at(2026, 4, 30)
    assert add_months(at(2026, 11, 30), 3) == at(2027, 2, 28)


def test_the_legal_maximum_is_gdpr_plus_two_months_and_ccpa_plus_45_days():
    received = at(2026, 1, 31)
    assert max_due_date(GDPR, received) == at(2026, 4, 30)
    assert max_due_date(CCPA, received) == received + timedelta(days=90)
    assert max_due_date(CCPA, received) - due_date(CCPA, received) == timedelta(days=45)


RECEIVED = at(2026, 3, 1)
ORIGINAL = due_date(GDPR, RECEIVED)  # 1 April


def test_an_extension_with_a_reason_within_the_period_and_the_limit_is_granted():
    new = at(2026, 5, 20)
    assert extend(GDPR, RECEIVED, ORIGINAL, new, "complex request", now=at(2026, 3, 20)) == new


def test_an_extension_to_exactly_the_legal_maximum_is_granted():
    limit = max_due_date(GDPR, RECEIVED)
    assert extend(GDPR, RECEIVED, ORIGINAL, limit, "many stores", now=RECEIVED) == limit


@pytest.mark.parametrize("reason", ["", "   ", "\n\t"])
def test_an_extension_without_a_reason_is_refused(reason):
    with pytest.raises(ExtensionRefused, match="reason"):
        extend(GDPR, RECEIVED, ORIGINAL, at(2026, 5, 1), reason, now=RECEIVED)


def test_an_extension_decided_after_the_original_due_date_is_refused():
    with pytest.raises(ExtensionRefused, match="within the original period"):
        extend(
            GDPR, RECEIVED, ORIGINAL, at(2026, 5, 1), "late", now=ORIGINAL + timedelta(seconds=1)
        )


def test_an_extension_beyond_gdpr_two_more_months_is_refused():
    too_far = max_due_date(GDPR, RECEIVED) + timedelta(seconds=1)
    with pytest.raises(ExtensionRefused, match="2026-06-01"):
        extend(GDPR, RECEIVED, ORIGINAL, too_far, "complex", now=RECEIVED)


def test_an_extension_beyond_ccpa_45_more_days_is_refused():
    original = due_date(CCPA, RECEIVED)
    with pytest.raises(ExtensionRefused, match="at most"):
        extend(CCPA, RECEIVED, original, original + timedelta(days=45, hours=1), "x", now=RECEIVED)
    assert extend(CCPA, RECEIVED, original, original + timedelta(days=45), "x", now=RECEIVED)


@pytest.mark.parametrize("delta", [timedelta(0), timedelta(days=-3)], ids=["same", "earlier"])
def test_an_extension_must_move_the_due_date_later(delta):
    with pytest.raises(ExtensionRefused, match="later"):
        extend(GDPR, RECEIVED, ORIGINAL, ORIGINAL + delta, "reason", now=RECEIVED)


def test_extension_refused_is_a_permanent_error():
    from pipeline.errors import PermanentError

    assert issubclass(ExtensionRefused, PermanentError)


def test_a_request_due_within_the_window_is_at_risk_but_not_overdue():
    now = at(2026, 4, 1)
    due = now + AT_RISK_WINDOW - timedelta(seconds=1)
    assert is_at_risk(due, now)
    assert not is_overdue(due, now)


def test_a_request_due_later_than_the_window_is_not_at_risk():
    now = at(2026, 4, 1)
    assert not is_at_risk(now + AT_RISK_WINDOW + timedelta(seconds=1), now)


def test_a_request_past_its_due_date_is_overdue_and_no_longer_merely_at_risk():
    now = at(2026, 4, 1)
    due = now - timedelta(seconds=1)
    assert is_overdue(due, now)
    assert not is_at_risk(due, now)


def test_a_request_due_this_very_moment_is_at_risk_not_overdue():
    now = at(2026, 4, 1)
    assert is_at_risk(now, now) and not is_overdue(now, now)


moments = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2100, 12, 1), timezones=st.just(UTC)
)


@given(moments, st.sampled_from(list(Jurisdiction)))
def test_the_due_date_is_always_after_receipt_and_before_the_legal_maximum(received, where):
    due = due_date(where, received)
    assert received < due < max_due_date(where, received)


@given(moments)
def test_a_gdpr_due_date_is_never_more_than_31_days_away(received):
    gap = due_date(GDPR, received) - received
    assert timedelta(days=28) <= gap <= timedelta(days=31)


@given(moments, st.integers(min_value=1, max_value=24))
def test_add_months_lands_in_the_right_month_never_past_the_day(moment, months):
    shifted = add_months(moment, months)
    assert (shifted.year * 12 + shifted.month) - (moment.year * 12 + moment.month) == months
    assert shifted.day <= moment.day
    assert shifted.time() == moment.time()
