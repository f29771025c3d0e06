"""The request lifecycle: the transition table is the only way a request moves."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.errors import InvalidTransition
from pipeline.states import (
    TERMINAL,
    TRANSITIONS,
    RequestType,
    State,
    check_transition,
    needs_locate,
    needs_verification,
)

ALLOWED = sorted((a, b) for a, targets in TRANSITIONS.items() for b in targets)
FORBIDDEN = sorted((a, b) for a, b in itertools.product(State, State) if b not in TRANSITIONS[a])


def test_the_table_names_every_state_and_only_states():
    assert set(TRANSITIONS) == set(State)
    for targets in TRANSITIONS.values():
        assert targets <= set(State)


@pytest.mark.parametrize(("current", "new"), ALLOWED, ids=lambda s: s.value)
def test_an_allowed_transition_passes(current, new):
    check_transition(current, new)


@pytest.mark.parametrize(("current", "new"), FORBIDDEN, ids=lambda s: s.value)
def test_any_other_transition_raises_invalid_transition(current, new):
    with pytest.raises(InvalidTransition, match=f"{current}.*{new}"):
        check_transition(current, new)


def test_allowed_and_forbidden_pairs_cover_every_pair_once():
    assert len(ALLOWED) + len(FORBIDDEN) == len(State) ** 2
    assert not set(ALLOWED) & set(FORBIDDEN)


def test_no_state_moves_to_itself():
    for state in State:
        assert state not in TRANSITIONS[state]


@pytest.mark.parametrize("state", sorted(TERMINAL), ids=lambda s: s.value)
def test_terminal_states_lead_nowhere(state):
    assert TRANSITIONS[state] == frozenset()
    for other in State:
        with pytest.raises(InvalidTransition):
            check_transition(state, other)


def test_terminal_states_are_exactly_done_expired_and_cancelled():
    assert {State.DONE, State.EXPIRED, State.CANCELLED} == TERMINAL
    assert {s for s, t in TRANSITIONS.items() if not t} == TERMINAL


def test_every_state_is_reachable_from_received_and_every_walk_can_end():
    reachable = {State.RECEIVED}
    frontier = [State.RECEIVED]
    while frontier:
        for nxt in TRANSITIONS[frontier.pop()]:
            if nxt not in reachable:
                reachable.add(nxt)
                frontier.append(nxt)
    assert reachable == set(State)
    for state in State:  # no state is a dead end short of a terminal one
        seen, stack = {state}, [state]
        while stack:
            for nxt in TRANSITIONS[stack.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append(nxt)
        assert seen & TERMINAL, f"{state} can never finish"


def test_a_request_is_done_only_after_the_person_was_notified():
    assert {s for s, t in TRANSITIONS.items() if State.DONE in t} == {State.NOTIFYING}


def test_nothing_is_disclosed_before_verification():
    before_verification = {State.RECEIVED, State.AWAITING_VERIFICATION}
    for state in before_verification:
        assert not TRANSITIONS[state] & {State.LOCATING, State.ACTING, State.NOTIFYING}


@given(st.lists(st.integers(min_value=0, max_value=100), max_size=40))
def test_a_random_walk_through_allowed_transitions_never_leaves_the_table(choices):
    state = State.RECEIVED
    for choice in choices:
        options = sorted(TRANSITIONS[state])
        if not options:
            assert state in TERMINAL
            break
        new = options[choice % len(options)]
        check_transition(state, new)
        assert new in TRANSITIONS[state]
        state = new
    assert state in set(State)


@given(st.sampled_from(list(State)), st.sampled_from(list(State)))
def test_check_transition_agrees_with_the_table(current, new):
    if new in TRANSITIONS[current]:
        check_transition(current, new)
    else:
        with pytest.raises(InvalidTransition):
            check_transition(current, new)


@pytest.mark.parametrize(
    ("kind", "verify", "locate"),
    [
        (RequestType.ACCESS, True, True),
        (RequestType.CORRECT, True, True),
        (RequestType.ERASE, True, True),
        (RequestType.OPT_OUT, False, True),  # R10: opt-out needs no verification
        (RequestType.CONCERN, False, False),  # a concern opens a case, searches nothing
    ],
    ids=lambda v: v.value if isinstance(v, RequestType) else str(v),
)
def test_which_request_types_need_verification_and_locate(kind, verify, locate):
    assert needs_verification(kind) is verify  # R7
    assert needs_locate(kind) is locate
