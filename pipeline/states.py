"""The request lifecycle as an explicit transition table.

Every state change goes through `check_transition`; anything not in the table is a bug
or a stale message and raises `InvalidTransition` instead of corrupting the request.
"""

from __future__ import annotations

import enum

from pipeline.errors import InvalidTransition


class RequestType(enum.StrEnum):
    ACCESS = "access"
    CORRECT = "correct"
    ERASE = "erase"
    OPT_OUT = "opt_out"
    CONCERN = "concern"


class Jurisdiction(enum.StrEnum):
    GDPR = "gdpr"
    CCPA = "ccpa"
    OTHER = "other"


class State(enum.StrEnum):
    RECEIVED = "received"  # stored by intake, acknowledgement queued
    AWAITING_VERIFICATION = "awaiting_verification"  # link mailed, waiting for the person
    VERIFIED = "verified"  # identity proven (or not needed), ready to locate
    LOCATING = "locating"  # one task per store finds the person's records
    ACTING = "acting"  # one task per store exports / corrects / erases / opts out
    NOTIFYING = "notifying"  # outcome composed, email queued
    DONE = "done"
    NEEDS_ATTENTION = "needs_attention"  # a store failed for good, or erasure left data
    EXPIRED = "expired"  # verification never completed; the person was told
    CANCELLED = "cancelled"


TERMINAL = frozenset({State.DONE, State.EXPIRED, State.CANCELLED})

TRANSITIONS: dict[State, frozenset[State]] = {
    State.RECEIVED: frozenset({State.AWAITING_VERIFICATION, State.VERIFIED, State.CANCELLED}),
    State.AWAITING_VERIFICATION: frozenset({State.VERIFIED, State.EXPIRED, State.CANCELLED}),
    State.VERIFIED: frozenset({State.LOCATING, State.ACTING, State.CANCELLED}),
    State.LOCATING: frozenset({State.ACTING, State.NEEDS_ATTENTION, State.CANCELLED}),
    State.ACTING: frozenset({State.NOTIFYING, State.NEEDS_ATTENTION, State.CANCELLED}),
    State.NOTIFYING: frozenset({State.DONE}),
    State.NEEDS_ATTENTION: frozenset({State.LOCATING, State.ACTING, State.CANCELLED}),
    State.DONE: frozenset(),
    State.EXPIRED: frozenset(),
    State.CANCELLED: frozenset(),
}


def check_transition(current: State, new: State) -> None:
    if new not in TRANSITIONS[current]:
        raise InvalidTransition(f"a request in state {current} cannot move to {new}")


def needs_verification(request_type: RequestType) -> bool:
    """Disclosure and deletion need proof of identity (R7); opt-out and concerns do not (R10)."""
    return request_type in {RequestType.ACCESS, RequestType.CORRECT, RequestType.ERASE}


def needs_locate(request_type: RequestType) -> bool:
    return request_type is not RequestType.CONCERN
