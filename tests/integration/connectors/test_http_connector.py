"""The HTTP API connector against a real HTTP server the tests start (a fake product
service on 127.0.0.1): the conformance kit, then retries, rate limit, pagination,
auth and errors. Waits are recorded by an injected sleep, never measured."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from connectors.base import ConnectorError, Identity, MappingError, StoreUnavailable
from connectors.http import HttpConnector, HttpMapping, RateLimiter
from connectors.registry import load_connectors
from connectors.testing import ConnectorContract, Scenario
from tests.integration.connectors.fake_product_api import TOKEN, FakeProductApi, serve

MAPPING = Path(__file__).with_name("crm_http.toml")
PERSON = Identity(email="robin.kit@example.com", name="Robin Kitson", phone="+1 555 0142")
TWIN = Identity(email="robin.kit@example.org", name="Robin Kitson")
SECRET = "argon2id$http-secret-0001"


def dataset(api: FakeProductApi) -> FakeProductApi:
    def user(uid: str, email: str, name: str, **extra: Any) -> None:
        api.users[uid] = {"id": uid, "email": email, "name": name, "newsletter": True, **extra}

    user("u-robin-01", PERSON.email, "Robin Kitson", title="AE", password_hash=SECRET)
    user("u-twin-02", TWIN.email, "Robin Kitson", title="Buyer", password_hash="argon2id$twin")
    # the service's search is loose: this one contains the person's address
    user("u-near-03", "xrobin.kit@example.com.au", "Rob Kit", password_hash="argon2id$near")
    for i in range(1, 6):
        api.notes[f"n-{i}"] = {"id": f"n-{i}", "user_id": "u-robin-01", "text": f"note {i}"}
    api.notes["n-twin"] = {"id": "n-twin", "user_id": "u-twin-02", "text": "twin-only note"}
    api.notes["n-near"] = {"id": "n-near", "user_id": "u-near-03", "text": "near-only note"}
    api.receipts["r-1"] = {"id": "r-1", "user_id": "u-robin-01", "amount": "9.00"}
    api.receipts["r-2"] = {"id": "r-2", "user_id": "u-twin-02", "amount": "4.00"}
    return api


class Waits:
    """A fake clock whose sleep advances it, recording each wait."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(round(seconds, 6))
        self.now += seconds


def connector(base_url: str, waits: Waits | None = None, **options: Any) -> HttpConnector:
    import tomllib

    waits = waits or Waits()
    mapping = HttpMapping.parse("crm", tomllib.loads(MAPPING.read_text(encoding="utf-8")))
    options.setdefault("rate_limit", 0)  # no limit unless a test sets one
    return HttpConnector(
        "crm", mapping, base_url, TOKEN, clock=waits.clock, sleep=waits.sleep, **options
    )


@pytest.fixture
def api() -> FakeProductApi:
    return dataset(FakeProductApi())


@pytest.fixture
def base_url(api: FakeProductApi) -> Iterator[str]:
    with serve(api) as url:
        yield url


class TestHttpConnectorConformance(ConnectorContract):
    """The kit, over a service that pages two items at a time."""

    @pytest.fixture
    def scenario(self, api: FakeProductApi, base_url: str) -> Iterator[Scenario]:
        api.page_size = 2
        yield Scenario(
            connector=connector(base_url),
            person=PERSON,
            lookalike=TWIN,
            expected_records=frozenset(
                {("users", "u-robin-01"), ("receipts", "r-1")}
                | {("notes", f"n-{i}") for i in range(1, 6)}
            ),
            secret_values=(SECRET,),
            secret_fields=("password_hash",),
            lookalike_markers=("twin-only note", "near-only note", "u-near-03"),
            retains=True,
        )


def test_a_loose_search_by_the_service_is_narrowed_to_the_exact_email(base_url: str) -> None:
    found = connector(base_url).locate(PERSON)
    assert [r.key for r in found.records if r.collection == "users"] == ["u-robin-01"]
    assert found.discovered_ids == {"crm": "u-robin-01"}


@pytest.mark.parametrize("style", ["cursor", "path"])
def test_every_page_is_followed_whether_next_is_a_cursor_or_a_path(
    api: FakeProductApi, base_url: str, style: str
) -> None:
    api.page_size, api.next_style = 2, style
    found = connector(base_url).locate(PERSON)
    assert sorted(r.key for r in found.records if r.collection == "notes") == [
        f"n-{i}" for i in range(1, 6)
    ]
    assert api.count("GET", "/users/u-robin-01/notes") == 3  # 2 + 2 + 1


def test_503s_are_retried_with_exponential_backoff(api: FakeProductApi, base_url: str) -> None:
    waits = Waits()
    api.fail_next(3, status=503)
    found = connector(base_url, waits, backoff_base=0.5).locate(PERSON)
    assert found.records
    assert waits.slept == [0.5, 1.0, 2.0]


def test_a_429_waits_as_long_as_retry_after_asks(api: FakeProductApi, base_url: str) -> None:
    waits = Waits()
    api.fail_next(1, status=429, retry_after="7")
    connector(base_url, waits, backoff_base=0.5).locate(PERSON)
    assert waits.slept == [7.0]


def test_backoff_is_capped(api: FakeProductApi, base_url: str) -> None:
    waits = Waits()
    api.fail_next(4, status=502)
    connector(base_url, waits, backoff_base=1, backoff_max=3, max_attempts=5).locate(PERSON)
    assert waits.slept == [1.0, 2.0, 3.0, 3.0]


def test_a_service_that_keeps_failing_is_unavailable_and_the_error_names_no_one(
    api: FakeProductApi, base_url: str
) -> None:
    api.fail_next(10, status=503)
    with pytest.raises(
        StoreUnavailable, match=r"find_by_email failed 3 time\(s\) \(HTTP 503\)"
    ) as err:
        connector(base_url, max_attempts=3).locate(PERSON)
    assert PERSON.email not in str(err.value)
    assert api.count("GET", "/users") == 3


def test_a_refused_request_is_a_connector_error_and_is_not_retried(
    api: FakeProductApi, base_url: str
) -> None:
    store = connector(base_url)
    store._auth = ("Authorization", "Bearer wrong-token")
    with pytest.raises(ConnectorError, match="HTTP 401") as err:
        store.locate(PERSON)
    assert not isinstance(err.value, StoreUnavailable)
    assert api.count("GET", "/users") == 1


def test_a_stalled_service_times_out_as_unavailable(api: FakeProductApi, base_url: str) -> None:
    api.stall_seconds = 1.0
    with pytest.raises(StoreUnavailable):
        connector(base_url, timeout=0.2, max_attempts=1).locate(PERSON)


def test_a_service_that_is_not_running_is_unavailable(api: FakeProductApi) -> None:
    with serve(api) as url:
        pass  # stopped: nothing listens on that port any more
    store = connector(url, max_attempts=2)
    with pytest.raises(StoreUnavailable):
        store.locate(PERSON)
    assert store.health().ok is False


def test_requests_are_spaced_to_the_rate_limit(api: FakeProductApi, base_url: str) -> None:
    waits = Waits()
    api.page_size = 1
    connector(base_url, waits, rate_limit=4).locate(PERSON)
    calls = len(api.requests)
    assert calls > 5
    assert waits.slept == [0.25] * (calls - 1)


def test_the_rate_limiter_lets_requests_through_once_time_has_passed() -> None:
    waits = Waits()
    limiter = RateLimiter(2, waits.clock, waits.sleep)
    limiter.wait()
    waits.now += 10
    limiter.wait()
    limiter.wait()
    assert waits.slept == [0.5]


def test_the_retry_after_header_may_be_an_http_date(api: FakeProductApi, base_url: str) -> None:
    waits = Waits()
    api.fail_next(1, status=503, retry_after="Wed, 21 Oct 2015 07:28:00 GMT")  # in the past
    connector(base_url, waits, backoff_base=0.5).locate(PERSON)
    assert waits.slept == [0.5]


def test_the_store_loads_from_config_with_the_token_from_the_environment(
    tmp_path: Path, base_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "stores.toml"
    config.write_text(
        f'[stores.crm]\nconnector = "http"\nbase_url = "{base_url}"\n'
        f'token_env = "CRM_TEST_TOKEN"\nmapping = "{MAPPING}"\nrate_limit = 50\n',
        encoding="utf-8",
    )
    monkeypatch.delenv("CRM_TEST_TOKEN", raising=False)
    with pytest.raises(MappingError, match=r"store 'crm'.*CRM_TEST_TOKEN is not set"):
        load_connectors(config, tmp_path)
    monkeypatch.setenv("CRM_TEST_TOKEN", TOKEN)
    stores = load_connectors(config, tmp_path)
    assert isinstance(stores["crm"], HttpConnector)
    assert stores["crm"].health().ok
    assert len(stores["crm"].locate(PERSON).records) == 7


def test_a_token_written_in_the_config_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "stores.toml"
    config.write_text(
        '[stores.crm]\nconnector = "http"\nbase_url = "http://127.0.0.1:1"\n'
        f'token = "{TOKEN}"\nmapping = "{MAPPING}"\n',
        encoding="utf-8",
    )
    with pytest.raises(MappingError, match="environment variable"):
        load_connectors(config, tmp_path)


@pytest.mark.parametrize(
    ("toml", "problem"),
    [
        ("[person]\nfacts = {}\n", "find_by_email or endpoints.find_by_id"),
        (
            '[endpoints]\nfind_by_id = "/u/{id}"\n[person]\nfacts = { purpose = "p" }\n',
            "person.facts lacks 'categories'",
        ),
        (
            '[endpoints]\nfind_by_id = "/u/{id}"\n[person.facts]\npurpose = "p"\n'
            'categories = ["c"]\nrecipients = ["r"]\nretention = "r"\nsource = "s"\n'
            '[collections.notes]\nlist = "/n"\nerase = "delete"\n',
            "set its `item` path",
        ),
        (
            '[endpoints]\nfind_by_id = "users/{id}"\n',
            "needs a path starting with '/'",
        ),
    ],
)
def test_a_wrong_mapping_is_refused_at_load_time(toml: str, problem: str) -> None:
    import tomllib

    with pytest.raises(MappingError, match=problem):
        HttpMapping.parse("crm", tomllib.loads(toml))
