"""Deadlines (R1, R2, R8): when a request is due and how far it may be extended."""

from __future__ import annotations

import calendar
from datetime import datetime, timedelta

from pipeline.errors import PermanentError
from pipeline.states import Jurisdiction

AT_RISK_WINDOW = timedelta(days=7)
CONCERN_RESPONSE = timedelta(days=30)


class ExtensionRefused(PermanentError):
    """An extension broke the law's limits or came without a reason."""


def add_months(moment: datetime, months: int) -> datetime:
    """Calendar months as GDPR counts them: 31 Jan + 1 month is the last day of February."""
    month_index = moment.month - 1 + months
    year = moment.year + month_index // 12
    month = month_index % 12 + 1
    day = min(moment.day, calendar.monthrange(year, month)[1])
    return moment.replace(year=year, month=month, day=day)


def due_date(jurisdiction: Jurisdiction, received_at: datetime) -> datetime:
    """GDPR one month from receipt (Art. 12(3)); CCPA 45 calendar days; other 30 days."""
    if jurisdiction is Jurisdiction.GDPR:
        return add_months(received_at, 1)
    if jurisdiction is Jurisdiction.CCPA:
        return received_at + timedelta(days=45)
    return received_at + timedelta(days=30)


def max_due_date(jurisdiction: Jurisdiction, received_at: datetime) -> datetime:
    """The latest a request may be extended to: GDPR +2 months, CCPA +45 days, other +30."""
    if jurisdiction is Jurisdiction.GDPR:
        return add_months(received_at, 3)
    if jurisdiction is Jurisdiction.CCPA:
        return received_at + timedelta(days=90)
    return received_at + timedelta(days=60)


def extend(
    jurisdiction: Jurisdiction,
    received_at: datetime,
    original_due: datetime,
    new_due: datetime,
    reason: str,
    now: datetime,
) -> datetime:
    """Check an extension: a reason, within the original period, within the legal maximum."""
    if not reason.strip():
        raise ExtensionRefused("an extension needs a recorded reason")
    if now > original_due:
        raise ExtensionRefused("an extension must be decided within the original period")
    if new_due <= original_due:
        raise ExtensionRefused("an extension must move the due date later")
    limit = max_due_date(jurisdiction, received_at)
    if new_due > limit:
        raise ExtensionRefused(f"the law allows extending to {limit.date().isoformat()} at most")
    return new_due


def is_at_risk(due_at: datetime, now: datetime) -> bool:
    return now <= due_at <= now + AT_RISK_WINDOW


def is_overdue(due_at: datetime, now: datetime) -> bool:
    return now > due_at
