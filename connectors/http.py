"""HTTP API connector: a product store behind its own REST service, by configuration only.

The service is described, not coded: where to find a person (by email, by user id),
where their collections are listed, how a person is updated and deleted, which
fields are secret, and the Art. 15 facts. Requests go through the standard library
(`urllib`) with a timeout, a client-side rate limit, retries with exponential backoff
on 429 and 5xx (honouring `Retry-After`), and page after page until the service says
there is no next page.

Store configuration (`stores.toml`)::

    [stores.crm]
    connector = "http"
    base_url = "https://crm.internal.allego.example/api"
    token_env = "CRM_API_TOKEN"      # the environment variable holding the token;
                                     # a `token` key in the config is refused
    auth_header = "Authorization"    # default; the value is "<auth_scheme> <token>"
    auth_scheme = "Bearer"           # default; "" sends the token alone
    mapping = "crm-http.toml"
    timeout = 10                     # seconds per request
    max_attempts = 5                 # per request, counting the first
    backoff_base = 0.5               # seconds; doubled per retry, capped by backoff_max
    backoff_max = 30
    rate_limit = 10                  # requests per second, at most; 0 for no limit

Mapping (`crm-http.toml`)::

    [store]
    title = "CRM"
    description = "Accounts and notes."

    [endpoints]
    find_by_email = { path = "/users", email_param = "email" }   # GET, paginated list
    find_by_id = "/users/{id}"                                  # GET one; 404 = nobody
    update = { method = "PATCH", path = "/users/{id}" }         # JSON body of fields
    delete = "/users/{id}"                                      # DELETE; 404 = gone
    contact = { method = "PATCH", path = "/users/{id}" }        # default: update
    health = "/health"

    [person]
    collection = "users"
    id_field = "id"
    email_field = "email"
    secret = ["password_hash"]
    correctable = { name = "name", job_title = "title" }        # common field -> API field
    contact = { field = "marketing_emails", opted_out = false }
    fields = { email = "contact details", name = "identity" }   # field -> category
    facts = { purpose = "...", categories = ["..."], recipients = ["..."],
              retention = "...", source = "..." }

    [collections.notes]
    list = "/users/{id}/notes"      # GET, paginated
    item = "/notes/{item_id}"       # DELETE target when erase = "delete"
    id_field = "id"
    erase = "delete"                # or { strategy = "retain", legal_basis = "...",
                                    #      period = "..." }
    fields = { text = "user content" }
    facts = { ... }

    [pagination]                    # how a page looks (a bare JSON list is one page)
    items = "items"                 # key of the list
    next = "next"                   # key of the next page: a URL, a path from the
                                    # host's root, or a cursor
    cursor_param = "cursor"         # query parameter a cursor is sent in

The person's email goes only in a query string, never into a log line or an error.
Errors: 429, 5xx, timeouts and refused connections are `StoreUnavailable` once the
retries are spent; any other 4xx is a `ConnectorError` (the request was wrong).
"""

from __future__ import annotations

import http.client
import json
import os
import threading
import time
import tomllib
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import structlog

from connectors.base import (
    Capability,
    ConnectorError,
    Correction,
    CorrectionResult,
    DataFacts,
    ErasureResult,
    FieldChange,
    Health,
    Identity,
    LocateResult,
    MappingError,
    OptOutResult,
    RecordRef,
    Retention,
    StoreExport,
    StoreMetadata,
    StoreUnavailable,
    UnsupportedAction,
)
from connectors.sql import validate_correction

log = structlog.get_logger()

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
MAX_PAGES = 10_000  # a service that never stops paging is broken, not large
Json = Any


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str
    email_param: str = "email"


@dataclass(frozen=True)
class Collection:
    name: str
    list_path: str
    item_path: str | None
    id_field: str
    strategy: str  # delete | retain
    legal_basis: str
    period: str
    secret: frozenset[str]


@dataclass(frozen=True)
class HttpMapping:
    """The service, as the mapping describes it; validated when loaded."""

    title: str
    description: str
    endpoints: Mapping[str, Endpoint]
    person_collection: str
    id_field: str
    email_field: str
    secret: frozenset[str]
    correctable: Mapping[str, str]
    contact_field: str | None
    opted_out_value: Any
    collections: Mapping[str, Collection]
    facts: Mapping[str, DataFacts]
    field_categories: Mapping[str, str]
    items_key: str
    next_key: str
    cursor_param: str

    @classmethod
    def parse(cls, store: str, raw: Mapping[str, Any]) -> HttpMapping:
        def fail(problem: str) -> MappingError:
            return MappingError(f"store {store!r}: {problem}")

        def facts_of(where: str, value: Any) -> DataFacts:
            if not isinstance(value, Mapping):
                raise fail(
                    f"{where}.facts is missing; declare purpose, categories, "
                    "recipients, retention and source"
                )
            try:
                return DataFacts(
                    purpose=str(value["purpose"]),
                    categories=tuple(value["categories"]),
                    recipients=tuple(value["recipients"]),
                    retention=str(value["retention"]),
                    source=str(value["source"]),
                    automated_decisions=str(value.get("automated_decisions", "none")),
                )
            except KeyError as exc:
                raise fail(f"{where}.facts lacks {exc}; add it") from exc

        endpoints: dict[str, Endpoint] = {}
        defaults = {
            "find_by_email": "GET",
            "find_by_id": "GET",
            "update": "PATCH",
            "delete": "DELETE",
            "contact": "PATCH",
            "health": "GET",
        }
        for key, value in dict(raw.get("endpoints", {})).items():
            if key not in defaults:
                raise fail(f"unknown endpoint {key!r}; use {sorted(defaults)}")
            if isinstance(value, str):
                value = {"path": value}
            if not isinstance(value, Mapping) or not str(value.get("path", "")).startswith("/"):
                raise fail(f"endpoint {key!r} needs a path starting with '/'")
            endpoints[key] = Endpoint(
                method=str(value.get("method", defaults[key])).upper(),
                path=str(value["path"]),
                email_param=str(value.get("email_param", "email")),
            )
        if "find_by_email" not in endpoints and "find_by_id" not in endpoints:
            raise fail("declare endpoints.find_by_email or endpoints.find_by_id to find people")
        person = raw.get("person")
        if not isinstance(person, Mapping):
            raise fail("[person] is missing; describe the person object")
        person_collection = str(person.get("collection", "people"))
        facts = {person_collection: facts_of("person", person.get("facts"))}
        categories = {
            f"{person_collection}.{k}": str(v) for k, v in dict(person.get("fields", {})).items()
        }
        collections: dict[str, Collection] = {}
        for name, value in dict(raw.get("collections", {})).items():
            if not isinstance(value, Mapping) or not str(value.get("list", "")).startswith("/"):
                raise fail(f"collections.{name}.list needs a path starting with '/'")
            erase = value.get("erase", "delete")
            if isinstance(erase, str):
                erase = {"strategy": erase}
            strategy = str(erase.get("strategy"))
            if strategy not in ("delete", "retain"):
                raise fail(f"collections.{name}.erase must be 'delete' or a retain table")
            if strategy == "retain" and not (erase.get("legal_basis") and erase.get("period")):
                raise fail(f"collections.{name} is retained: give its legal_basis and period")
            if strategy == "delete" and not value.get("item"):
                raise fail(f"collections.{name} is deleted item by item: set its `item` path")
            collections[name] = Collection(
                name=name,
                list_path=str(value["list"]),
                item_path=str(value["item"]) if value.get("item") else None,
                id_field=str(value.get("id_field", "id")),
                strategy=strategy,
                legal_basis=str(erase.get("legal_basis", "")),
                period=str(erase.get("period", "")),
                secret=frozenset(value.get("secret", ())),
            )
            facts[name] = facts_of(f"collections.{name}", value.get("facts"))
            categories.update(
                {f"{name}.{k}": str(v) for k, v in dict(value.get("fields", {})).items()}
            )
        correctable = {str(k): str(v) for k, v in dict(person.get("correctable", {})).items()}
        if correctable and "update" not in endpoints:
            raise fail("person.correctable needs endpoints.update")
        contact = person.get("contact")
        if contact is not None and "update" not in endpoints and "contact" not in endpoints:
            raise fail("person.contact needs endpoints.contact or endpoints.update")
        store_raw = dict(raw.get("store", {}))
        pages = dict(raw.get("pagination", {}))
        return cls(
            title=str(store_raw.get("title", store)),
            description=str(store_raw.get("description", "")),
            endpoints=endpoints,
            person_collection=person_collection,
            id_field=str(person.get("id_field", "id")),
            email_field=str(person.get("email_field", "email")),
            secret=frozenset(person.get("secret", ())),
            correctable=correctable,
            contact_field=str(contact["field"]) if contact else None,
            opted_out_value=contact.get("opted_out", False) if contact else None,
            collections=collections,
            facts=facts,
            field_categories=categories,
            items_key=str(pages.get("items", "items")),
            next_key=str(pages.get("next", "next")),
            cursor_param=str(pages.get("cursor_param", "cursor")),
        )


class RateLimiter:
    """At most `rate` requests per second across the connector's threads."""

    def __init__(
        self, rate: float, clock: Callable[[], float], sleep: Callable[[float], None]
    ) -> None:
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self.clock = clock
        self.sleep = sleep
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self) -> None:
        with self._lock:
            now = self.clock()
            start = max(now, self._next)
            self._next = start + self.interval
        if start > now:
            self.sleep(start - now)


class HttpConnector:
    """A store behind a REST service, driven by its mapping."""

    def __init__(
        self,
        name: str,
        mapping: HttpMapping,
        base_url: str,
        token: str,
        *,
        auth_header: str = "Authorization",
        auth_scheme: str = "Bearer",
        timeout: float = 10.0,
        max_attempts: int = 5,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        rate_limit: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.name = name
        self.mapping = mapping
        self.base_url = base_url.rstrip("/")
        self._auth = (auth_header, f"{auth_scheme} {token}".strip())
        self.timeout = timeout
        self.max_attempts = max(1, max_attempts)
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.sleep = sleep
        self.limiter = RateLimiter(rate_limit, clock, sleep)
        self.correctable_fields = frozenset(mapping.correctable)
        caps = {Capability.LOCATE, Capability.EXPORT}
        if "delete" in mapping.endpoints:
            caps.add(Capability.ERASE)
        if mapping.correctable:
            caps.add(Capability.CORRECT)
        if mapping.contact_field:
            caps.add(Capability.OPT_OUT)
        self.capabilities = frozenset(caps)
        self.metadata = StoreMetadata(
            name=name,
            title=mapping.title,
            description=mapping.description,
            facts=dict(mapping.facts),
            field_categories=dict(mapping.field_categories),
        )

    @classmethod
    def from_config(cls, name: str, settings: Mapping[str, Any], data_dir: Path) -> HttpConnector:
        if "token" in settings:
            raise MappingError(
                f"store {name!r}: a token is written in the configuration; put it in an "
                "environment variable and name that variable with `token_env`"
            )
        base_url = settings.get("base_url")
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise MappingError(f"store {name!r}: `base_url` must be an http(s) URL")
        token_env = settings.get("token_env")
        if not isinstance(token_env, str) or not token_env:
            raise MappingError(f"store {name!r}: `token_env` must name the token's variable")
        token = os.environ.get(token_env)
        if not token:
            raise MappingError(
                f"store {name!r}: environment variable {token_env} is not set; "
                "set it to the service's API token"
            )
        spec: Mapping[str, Any] = settings
        if settings.get("mapping") is not None:
            try:
                spec = tomllib.loads(Path(settings["mapping"]).read_text(encoding="utf-8"))
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise MappingError(
                    f"store {name!r}: mapping {settings['mapping']} cannot be read "
                    f"({type(exc).__name__}); fix the path or its TOML"
                ) from exc
        return cls(
            name,
            HttpMapping.parse(name, spec),
            base_url,
            token,
            auth_header=str(settings.get("auth_header", "Authorization")),
            auth_scheme=str(settings.get("auth_scheme", "Bearer")),
            timeout=float(settings.get("timeout", 10)),
            max_attempts=int(settings.get("max_attempts", 5)),
            backoff_base=float(settings.get("backoff_base", 0.5)),
            backoff_max=float(settings.get("backoff_max", 30)),
            rate_limit=float(settings.get("rate_limit", 10)),
        )

    # ------------------------------------------------------------- transport

    def _url(self, path: str, query: Mapping[str, str] | None = None, **values: str) -> str:
        quoted = {k: urllib.parse.quote(str(v), safe="") for k, v in values.items()}
        url = self.base_url + path.format(**quoted)
        if query:
            url += ("&" if "?" in url else "?") + urllib.parse.urlencode(query)
        return url

    def _call(self, endpoint: str, method: str, url: str, body: Json = None) -> tuple[int, Json]:
        """One request, retried; returns (status, JSON) for 2xx and 404.

        `endpoint` names the call in logs and errors: the URL may hold an email.
        """
        data = None if body is None else json.dumps(body).encode()
        for attempt in range(1, self.max_attempts + 1):
            self.limiter.wait()
            request = urllib.request.Request(url, data=data, method=method)
            request.add_header("Accept", "application/json")
            request.add_header(*self._auth)
            if data is not None:
                request.add_header("Content-Type", "application/json")
            delay: float | None = None
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    raw = response.read()
                    return response.status, json.loads(raw) if raw.strip() else None
            except urllib.error.HTTPError as exc:
                exc.close()
                if exc.code == 404:
                    return 404, None
                if exc.code not in RETRY_STATUSES:
                    raise ConnectorError(
                        f"store {self.name!r}: {endpoint} was refused with HTTP {exc.code}"
                    ) from exc
                problem = f"HTTP {exc.code}"
                delay = _retry_after(exc.headers.get("Retry-After"))
                cause: Exception = exc
            except (
                urllib.error.URLError,
                TimeoutError,
                ConnectionError,
                http.client.HTTPException,
            ) as exc:
                problem, cause = type(exc).__name__, exc
            except ValueError as exc:
                raise ConnectorError(
                    f"store {self.name!r}: {endpoint} answered with invalid JSON"
                ) from exc
            if attempt == self.max_attempts:
                log.warning(
                    "store_unavailable",
                    store=self.name,
                    endpoint=endpoint,
                    problem=problem,
                    attempts=attempt,
                )
                raise StoreUnavailable(
                    f"store {self.name!r}: {endpoint} failed {attempt} time(s) ({problem})"
                ) from cause
            backoff = min(self.backoff_max, self.backoff_base * 2 ** (attempt - 1))
            wait = max(backoff, delay) if delay is not None else backoff
            log.info(
                "store_request_retried",
                store=self.name,
                endpoint=endpoint,
                problem=problem,
                attempt=attempt,
                wait=round(wait, 3),
            )
            self.sleep(wait)
        raise AssertionError("unreachable")  # pragma: no cover

    def _pages(self, endpoint: str, url: str) -> Iterator[dict[str, Any]]:
        """Every item of a listing, following `next` links or cursors."""
        m = self.mapping
        first = url
        for _ in range(MAX_PAGES):
            status, page = self._call(endpoint, "GET", url)
            if status == 404 or page is None:
                return
            if isinstance(page, list):
                yield from page
                return
            if not isinstance(page, Mapping) or not isinstance(page.get(m.items_key), list):
                raise ConnectorError(
                    f"store {self.name!r}: {endpoint} returned a page without a "
                    f"{m.items_key!r} list; fix [pagination]"
                )
            yield from page[m.items_key]
            following = page.get(m.next_key)
            if not following:
                return
            following = str(following)
            if following.startswith(("http://", "https://")):
                if not following.startswith(self.base_url):
                    raise ConnectorError(
                        f"store {self.name!r}: {endpoint} points its next page off the service"
                    )
                url = following
            elif following.startswith("/"):  # a path from the host's root
                url = urllib.parse.urljoin(self.base_url, following)
            else:
                url = (
                    first
                    + ("&" if "?" in first else "?")
                    + urllib.parse.urlencode({m.cursor_param: following})
                )
        raise ConnectorError(f"store {self.name!r}: {endpoint} kept paging past {MAX_PAGES}")

    # ------------------------------------------------------------- finding

    def _people(self, identity: Identity) -> dict[str, dict[str, Any]]:
        m = self.mapping
        found: dict[str, dict[str, Any]] = {}
        email = identity.email.strip().lower() if identity.email else ""
        if email and "find_by_email" in m.endpoints:
            ep = m.endpoints["find_by_email"]
            url = self._url(ep.path, {ep.email_param: email})
            for person in self._pages("find_by_email", url):
                # services search loosely (prefixes, case): keep exact matches only
                if str(person.get(m.email_field, "")).strip().lower() == email:
                    found[str(person[m.id_field])] = person
        product_id = identity.product_ids.get(self.name)
        if product_id and "find_by_id" in m.endpoints and product_id not in found:
            ep = m.endpoints["find_by_id"]
            status, person = self._call("find_by_id", ep.method, self._url(ep.path, id=product_id))
            if status != 404 and isinstance(person, Mapping):
                found[str(person[m.id_field])] = dict(person)
        return found

    def _owned(
        self, identity: Identity
    ) -> tuple[dict[str, dict[str, Any]], dict[str, list[dict[str, Any]]]]:
        """The person's profiles, and their collections' items by collection.

        Collections are listed for the given user id too, so records kept under a legal
        obligation stay findable after the profile itself is gone.
        """
        people = self._people(identity)
        ids = list(people)
        product_id = identity.product_ids.get(self.name)
        if product_id and product_id not in people:
            ids.append(product_id)
        items: dict[str, list[dict[str, Any]]] = {}
        for collection in self.mapping.collections.values():
            seen: dict[str, dict[str, Any]] = {}
            for user_id in ids:
                url = self._url(collection.list_path, id=user_id)
                for item in self._pages(f"{collection.name}.list", url):
                    seen.setdefault(str(item[collection.id_field]), item)
            items[collection.name] = list(seen.values())
        return people, items

    # ------------------------------------------------------------- contract

    def locate(self, identity: Identity) -> LocateResult:
        people, items = self._owned(identity)
        m = self.mapping
        records = [RecordRef(m.person_collection, pid) for pid in people]
        for name, rows in items.items():
            c = m.collections[name]
            records.extend(
                RecordRef(
                    name, str(r[c.id_field]), via=f"{name}.owner", retained=c.strategy == "retain"
                )
                for r in rows
            )
        discovered = {self.name: next(iter(people))} if people else {}
        log.info("store_located", store=self.name, records=len(records))
        return LocateResult(self.name, tuple(records), discovered)

    def export(self, identity: Identity) -> StoreExport:
        people, items = self._owned(identity)
        m = self.mapping
        out: dict[str, list[dict[str, Any]]] = {}
        if people:
            out[m.person_collection] = [_without(p, m.secret) for p in people.values()]
        for name, rows in items.items():
            if rows:
                out[name] = [_without(r, m.collections[name].secret) for r in rows]
        log.info("store_exported", store=self.name, collections=len(out))
        return StoreExport(self.name, out)

    def correct(self, identity: Identity, corrections: tuple[Correction, ...]) -> CorrectionResult:
        if Capability.CORRECT not in self.capabilities:
            raise UnsupportedAction(f"store {self.name!r} holds no correctable fields")
        m = self.mapping
        not_held = tuple(
            dict.fromkeys(c.field for c in corrections if c.field not in m.correctable)
        )
        wanted = {c.field: validate_correction(c) for c in corrections if c.field in m.correctable}
        ep = m.endpoints["update"]
        changes: list[FieldChange] = []
        for pid, person in self._people(identity).items():
            body: dict[str, str] = {}
            for common, value in wanted.items():
                api_field = m.correctable[common]
                before = person.get(api_field)
                if before is None or str(before) != value:
                    body[api_field] = value
                    changes.append(
                        FieldChange(
                            m.person_collection,
                            pid,
                            common,
                            None if before is None else str(before),
                            value,
                        )
                    )
            if body:
                self._call("update", ep.method, self._url(ep.path, id=pid), body)
        log.info("store_corrected", store=self.name, changes=len(changes))
        return CorrectionResult(self.name, tuple(changes), not_held)

    def erase(self, identity: Identity) -> ErasureResult:
        if Capability.ERASE not in self.capabilities:
            raise UnsupportedAction(f"store {self.name!r} declares no delete endpoint")
        m = self.mapping
        people, items = self._owned(identity)
        deleted = 0
        retained: list[Retention] = []
        for name, rows in items.items():  # children before the person they belong to
            c = m.collections[name]
            if c.strategy == "retain":
                if rows:
                    retained.append(Retention(name, len(rows), c.legal_basis, c.period))
                continue
            assert c.item_path is not None
            for row in rows:
                url = self._url(c.item_path, item_id=str(row[c.id_field]))
                status, _ = self._call(f"{name}.delete", "DELETE", url)
                deleted += status != 404
        ep = m.endpoints["delete"]
        for pid in people:
            status, _ = self._call("delete", ep.method, self._url(ep.path, id=pid))
            deleted += status != 404
        log.info(
            "store_erased",
            store=self.name,
            deleted=deleted,
            retained=sum(r.count for r in retained),
        )
        return ErasureResult(self.name, deleted=deleted, anonymized=0, retained=tuple(retained))

    def opt_out(self, identity: Identity) -> OptOutResult:
        m = self.mapping
        if Capability.OPT_OUT not in self.capabilities or m.contact_field is None:
            raise UnsupportedAction(f"store {self.name!r} keeps no contact preference")
        ep = m.endpoints.get("contact") or m.endpoints["update"]
        updated = 0
        for pid, person in self._people(identity).items():
            if person.get(m.contact_field) != m.opted_out_value:
                body = {m.contact_field: m.opted_out_value}
                self._call("contact", ep.method, self._url(ep.path, id=pid), body)
                updated += 1
        log.info("store_opted_out", store=self.name, updated=updated)
        return OptOutResult(self.name, updated)

    def health(self) -> Health:
        ep = self.mapping.endpoints.get("health")
        if ep is None:
            return Health(ok=True, detail="no health endpoint declared")
        try:
            status, _ = self._call("health", ep.method, self._url(ep.path))
        except ConnectorError as exc:
            return Health(ok=False, detail=str(exc))
        if status == 404:
            return Health(ok=False, detail="health endpoint answered 404")
        return Health(ok=True)

    def close(self) -> None:
        """Nothing to release: every request opens and closes its own connection."""


def _without(row: Mapping[str, Any], secret: frozenset[str]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k not in secret}


def _retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
