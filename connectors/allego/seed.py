"""Demo Allego product stores: realistic, deterministic, and with known answers.

`seed_demo_stores` builds one SQLite database per product store plus the media folder,
from `random.Random(seed)`, so every run (and every test) sees the same people. The
manifest names a few demo people with their ids in each store and the number of
records each store holds about them, so the demo and the tests can check a request's
outcome against an answer worked out here, independently of the connectors.

The same rows can be written to PostgreSQL or MariaDB (`write_sql_store`) to check the
mappings there.
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import random
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from connectors.base import Identity

ALLEGO_DIR = Path(__file__).parent
STORES_TOML = ALLEGO_DIR / "stores.toml"
SQL_STORES = ("video", "coaching", "learning", "marketing", "billing")
MEDIA = "media"
EPOCH = dt.datetime(2023, 1, 2, 9, 0, 0)

FIRST = (
    "Alex",
    "Blair",
    "Casey",
    "Dana",
    "Eli",
    "Farah",
    "Gus",
    "Hana",
    "Ivo",
    "Jules",
    "Kai",
    "Lena",
    "Mateo",
    "Noor",
    "Omar",
    "Priya",
    "Quinn",
    "Rosa",
    "Sven",
    "Tara",
    "Uma",
    "Vik",
    "Wen",
    "Yara",
    "Zeke",
)
LAST = (
    "Adams",
    "Brooks",
    "Chen",
    "Diaz",
    "Evans",
    "Fischer",
    "Garcia",
    "Haddad",
    "Ito",
    "Jensen",
    "Kowalski",
    "Lopez",
    "Moreau",
    "Nakamura",
    "Olsen",
    "Patel",
    "Reyes",
    "Silva",
    "Tanaka",
    "Ueda",
    "Varga",
    "Weber",
    "Young",
    "Zhou",
)
TITLES = (
    "Account Executive",
    "Sales Manager",
    "Enablement Lead",
    "SDR",
    "VP Sales",
    "Customer Success Manager",
    "Solutions Engineer",
)
COMPANIES = ("Northwind", "Contoso", "Globex", "Initech", "Umbrella Health", "Hooli", "Acme Corp")
COURSES = (
    "Discovery calls",
    "Objection handling",
    "Negotiation basics",
    "Demo storytelling",
    "Pipeline hygiene",
    "Product: analytics",
    "Product: coaching",
    "Compliance 101",
    "Medical device sales",
    "Cold outreach",
    "Closing",
    "Account planning",
)
LISTS = ("newsletter", "product-updates", "webinars", "events")


# --------------------------------------------------------------------------- schemas


def build_metadata(store: str, schema: str | None = None) -> sa.MetaData:
    """The store's schema, with its foreign keys declared as a real product would."""
    md = sa.MetaData(schema=schema)
    p = f"{schema}." if schema else ""
    S, T, DTm, B, Int = sa.String, sa.Text, sa.DateTime, sa.Boolean, sa.Integer  # noqa: N806
    C, FK = sa.Column, sa.ForeignKey  # noqa: N806
    if store == "video":
        sa.Table(
            "users",
            md,
            C("id", S(20), primary_key=True),
            C("email", S(254), nullable=False),
            C("name", S(200)),
            C("job_title", S(200)),
            C("phone", S(32)),
            C("password_hash", S(100)),
            C("marketing_emails", B),
            C("created_at", DTm),
        )
        sa.Table(
            "videos",
            md,
            C("id", Int, primary_key=True, autoincrement=False),
            C("owner_id", S(20), FK(f"{p}users.id"), nullable=False),
            C("title", S(200)),
            C("description", T),
            C("uploaded_at", DTm),
        )
        sa.Table(
            "comments",
            md,
            C("id", Int, primary_key=True, autoincrement=False),
            C("author_id", S(20), FK(f"{p}users.id")),
            C("video_id", Int, FK(f"{p}videos.id"), nullable=False),
            C("body", T),
            C("created_at", DTm),
        )
        sa.Table(
            "views",
            md,
            C("id", Int, primary_key=True, autoincrement=False),
            C("viewer_id", S(20), FK(f"{p}users.id")),
            C("video_id", Int, FK(f"{p}videos.id"), nullable=False),
            C("viewed_at", DTm),
        )
    elif store == "coaching":
        sa.Table(
            "users",
            md,
            C("id", S(20), primary_key=True),
            C("email", S(254), nullable=False),
            C("name", S(200)),
            C("role", S(20)),
            C("team", S(100)),
            C("phone", S(32)),
            C("password_hash", S(100)),
            C("security_answer", S(200)),
            C("email_opt_in", B),
            C("created_at", DTm),
        )
        sa.Table(
            "practice_recordings",
            md,
            C("id", Int, primary_key=True, autoincrement=False),
            C("user_id", S(20), FK(f"{p}users.id"), nullable=False),
            C("title", S(200)),
            C("media_url", S(300)),
            C("recorded_at", DTm),
        )
        sa.Table(
            "feedback",
            md,
            C("id", Int, primary_key=True, autoincrement=False),
            C("recording_id", Int, FK(f"{p}practice_recordings.id"), nullable=False),
            C("reviewer_id", S(20), FK(f"{p}users.id")),
            C("body", T),
            C("created_at", DTm),
        )
        sa.Table(
            "scores",
            md,
            C("id", Int, primary_key=True, autoincrement=False),
            C("recording_id", Int, FK(f"{p}practice_recordings.id"), nullable=False),
            C("criterion", S(100)),
            C("score", Int),
        )
    elif store == "learning":
        sa.Table(
            "learners",
            md,
            C("id", S(20), primary_key=True),
            C("email", S(254), nullable=False),
            C("name", S(200)),
            C("company", S(200)),
            C("newsletter", B),
            C("created_at", DTm),
        )
        sa.Table(
            "courses",
            md,
            C("id", Int, primary_key=True, autoincrement=False),
            C("title", S(200)),
            C("category", S(100)),
        )
        sa.Table(
            "enrollments",
            md,
            C("id", Int, primary_key=True, autoincrement=False),
            C("learner_id", S(20), FK(f"{p}learners.id"), nullable=False),
            C("course_id", Int, FK(f"{p}courses.id"), nullable=False),
            C("enrolled_at", DTm),
            C("completed_at", DTm),
        )
        sa.Table(
            "quiz_results",
            md,
            C("id", Int, primary_key=True, autoincrement=False),
            C("enrollment_id", Int, FK(f"{p}enrollments.id"), nullable=False),
            C("quiz", S(200)),
            C("score", sa.Numeric(5, 2)),
            C("taken_at", DTm),
        )
    elif store == "marketing":
        sa.Table(
            "leads",
            md,
            C("id", Int, primary_key=True, autoincrement=False),
            C("email", S(254), nullable=False),
            C("name", S(200)),
            C("company", S(200)),
            C("phone", S(32)),
            C("source", S(50)),
            C("created_at", DTm),
        )
        sa.Table(
            "subscriptions",
            md,
            C("id", Int, primary_key=True, autoincrement=False),
            C("lead_id", Int, FK(f"{p}leads.id"), nullable=False),
            C("list_name", S(50)),
            C("opted_in", B),
        )
    elif store == "billing":
        sa.Table(
            "accounts",
            md,
            C("id", S(20), primary_key=True),
            C("email", S(254), nullable=False),
            C("name", S(200)),
            C("company", S(200)),
            C("billing_address", S(300)),
            C("created_at", DTm),
        )
        sa.Table(
            "invoices",
            md,
            C("id", S(20), primary_key=True),
            C("account_id", S(20), FK(f"{p}accounts.id"), nullable=False),
            C("amount", sa.Numeric(10, 2)),
            C("currency", S(3)),
            C("issued_at", sa.Date),
            C("card_last4", S(4)),
            C("card_number", S(19)),
        )
    else:
        raise ValueError(f"unknown demo store {store!r}")
    return md


def write_sql_store(
    engine: Engine, store: str, rows: Mapping[str, list[dict[str, Any]]], schema: str | None = None
) -> None:
    """(Re)create the store's tables and insert its rows, parents first."""
    md = build_metadata(store, schema)
    md.drop_all(engine)
    md.create_all(engine)
    with engine.begin() as conn:
        for table in md.sorted_tables:
            data = rows.get(table.name, [])
            if data:
                conn.execute(table.insert(), data)


# --------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class DemoPerson:
    """A named demo person and what each store holds about them (the test oracle)."""

    key: str
    name: str
    email: str
    note: str
    product_ids: dict[str, str] = field(default_factory=dict)
    # store -> collection -> number of records that are this person's
    records: dict[str, dict[str, int]] = field(default_factory=dict)

    def identity(self, *, with_ids: bool = False) -> Identity:
        return Identity(
            email=self.email, name=self.name, product_ids=dict(self.product_ids) if with_ids else {}
        )


@dataclass(frozen=True)
class DemoManifest:
    seed: int
    people_count: int
    data_dir: str
    stores_dir: str
    config_path: str  # the stores.toml that wires these stores (with {data_dir})
    stores: dict[str, str]  # store -> database file or media folder
    people: dict[str, DemoPerson]

    def person(self, key: str) -> DemoPerson:
        return self.people[key]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)


# --------------------------------------------------------------------------- generation


@dataclass
class _Person:
    key: str | None
    first: str
    last: str
    email: str
    phone: str
    title: str
    company: str
    ids: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.first} {self.last}"


@dataclass
class DemoData:
    """All generated rows: store -> table -> rows, plus media files and the demo people."""

    sql: dict[str, dict[str, list[dict[str, Any]]]]
    media: dict[str, dict[str, bytes]]  # user id -> relative path -> content
    people: dict[str, DemoPerson]


DEMO_PEOPLE: tuple[dict[str, Any], ...] = (
    {
        "key": "dana",
        "first": "Dana",
        "last": "Reyes",
        "email": "dana.reyes@example.com",
        "ids": {
            "video": "v-10042",
            "coaching": "c-7a3f9",
            "learning": "L-000318",
            "marketing": "",
            "billing": "acct-004211",
            "media": "v-10042",
        },
        "note": "in every store, with videos, comments, invoices and media files",
    },
    {
        "key": "sam",
        "first": "Sam",
        "last": "Okafor",
        "email": "sam.okafor@example.com",
        "ids": {"video": "v-10077", "learning": "L-000552", "marketing": ""},
        "note": "in video, learning and marketing only; learning holds the email in other case",
    },
    {
        "key": "dana_lookalike",
        "first": "Dana",
        "last": "Reyes",
        "email": "dana.reyes@example.org",
        "ids": {
            "video": "v-10313",
            "coaching": "c-0be41",
            "billing": "acct-009930",
            "media": "v-10313",
        },
        "note": "same name as Dana, other email: must never be included in Dana's requests",
    },
    {
        "key": "nobody",
        "first": "Nora",
        "last": "Quist",
        "email": "nobody.known@example.net",
        "ids": {},
        "note": "no store knows this email",
    },
)


class _Generator:
    def __init__(self, people: int, seed: int) -> None:
        self.rng = random.Random(seed)
        self.count = people
        self.used: set[str] = set()
        self.emails: set[str] = set()
        self.rows: dict[str, dict[str, list[dict[str, Any]]]] = {s: {} for s in SQL_STORES}
        self.media: dict[str, dict[str, bytes]] = {}
        self.seq: dict[str, int] = {}

    def add(self, store: str, table: str, row: dict[str, Any]) -> dict[str, Any]:
        self.rows[store].setdefault(table, []).append(row)
        return row

    def next_id(self, name: str) -> int:
        self.seq[name] = self.seq.get(name, 0) + 1
        return self.seq[name]

    def unique(self, make: Any) -> str:
        while True:
            value = make()
            if value not in self.used:
                self.used.add(value)
                return str(value)

    def when(self, days: int = 600) -> dt.datetime:
        return EPOCH + dt.timedelta(minutes=self.rng.randint(0, days * 24 * 60))

    def phone(self) -> str:
        return f"+1 555 {self.rng.randint(100, 999)} {self.rng.randint(1000, 9999)}"

    def people(self) -> list[_Person]:
        people: list[_Person] = []
        for spec in DEMO_PEOPLE:
            self.used.update(v for v in spec["ids"].values() if v)
            self.emails.add(spec["email"])
            people.append(
                _Person(
                    spec["key"],
                    spec["first"],
                    spec["last"],
                    spec["email"],
                    self.phone(),
                    self.rng.choice(TITLES),
                    self.rng.choice(COMPANIES),
                    dict(spec["ids"]),
                )
            )
        rng = self.rng
        for _ in range(self.count):
            first, last = rng.choice(FIRST), rng.choice(LAST)
            while True:
                domain = rng.choice(("example.com", "example.net", "mail.example"))
                email = f"{first}.{last}{rng.randint(1, 999)}@{domain}".lower()
                if email not in self.emails:
                    self.emails.add(email)
                    break
            person = _Person(
                None, first, last, email, self.phone(), rng.choice(TITLES), rng.choice(COMPANIES)
            )
            if rng.random() < 0.7:
                person.ids["video"] = self.unique(lambda: f"v-{rng.randint(10400, 99999)}")
                if rng.random() < 0.5:
                    person.ids["media"] = person.ids["video"]
            if rng.random() < 0.4:
                person.ids["coaching"] = self.unique(lambda: f"c-{rng.getrandbits(20):05x}")
            if rng.random() < 0.5:
                person.ids["learning"] = self.unique(lambda: f"L-{rng.randint(1000, 999999):06d}")
            if rng.random() < 0.4:
                person.ids["marketing"] = ""
            if rng.random() < 0.25:
                person.ids["billing"] = self.unique(
                    lambda: f"acct-{rng.randint(10000, 999999):06d}"
                )
            people.append(person)
        return people

    # each store: demo people get fixed, rich shapes; others random ones

    def video(self, people: list[_Person]) -> None:
        rng = self.rng
        users = [p for p in people if "video" in p.ids]
        for p in users:
            self.add(
                "video",
                "users",
                {
                    "id": p.ids["video"],
                    "email": p.email,
                    "name": p.name,
                    "job_title": p.title,
                    "phone": p.phone,
                    "password_hash": f"$argon2id$v=19${rng.getrandbits(64):016x}",
                    "marketing_emails": rng.random() < 0.6 or p.key == "dana",
                    "created_at": self.when(),
                },
            )
        videos_of: dict[str, list[int]] = {}
        for p in users:
            n = {"dana": 3, "dana_lookalike": 2, "sam": 1}.get(p.key or "", rng.randint(0, 3))
            for _ in range(n):
                vid = self.next_id("video")
                videos_of.setdefault(p.ids["video"], []).append(vid)
                self.add(
                    "video",
                    "videos",
                    {
                        "id": vid,
                        "owner_id": p.ids["video"],
                        "title": f"{rng.choice(COURSES)} practice #{vid}",
                        "description": f"Practice pitch for {rng.choice(COMPANIES)}",
                        "uploaded_at": self.when(),
                    },
                )
        all_videos = [v for vs in videos_of.values() for v in vs]
        ids = [p.ids["video"] for p in users]
        by_key = {p.key: p.ids["video"] for p in users if p.key}
        dana, twin = by_key["dana"], by_key["dana_lookalike"]
        others = [i for i in ids if i not in by_key.values()] or [by_key["sam"]]

        def comment(author: str, video: int) -> None:
            self.add(
                "video",
                "comments",
                {
                    "id": self.next_id("comment"),
                    "author_id": author,
                    "video_id": video,
                    "body": rng.choice(
                        (
                            "Great opener!",
                            "Slow down at pricing.",
                            "Nice close.",
                            "Try a question first.",
                            "Love the energy",
                        )
                    ),
                    "created_at": self.when(),
                },
            )

        def view(viewer: str, video: int) -> None:
            self.add(
                "video",
                "views",
                {
                    "id": self.next_id("view"),
                    "viewer_id": viewer,
                    "video_id": video,
                    "viewed_at": self.when(),
                },
            )

        dana_videos = videos_of[dana]
        not_dana = [v for v in all_videos if v not in dana_videos]
        comment(others[0], dana_videos[0])  # someone else on Dana's video
        comment(twin, dana_videos[0])  # the look-alike on Dana's video
        comment(dana, dana_videos[0])  # Dana replies on her own video
        comment(dana, not_dana[0])  # Dana on other people's videos
        comment(dana, not_dana[1])
        comment(others[1 % len(others)], dana_videos[1])
        view(dana, not_dana[2])
        view(dana, dana_videos[2])
        view(others[2 % len(others)], dana_videos[1])
        view(twin, dana_videos[2])
        for video in all_videos:
            for _ in range(rng.randint(0, 2)):
                comment(rng.choice(others), video)
            for _ in range(rng.randint(0, 3)):
                view(rng.choice(others), video)
        for p in users:
            if p.ids.get("media"):
                for video in videos_of.get(p.ids["video"], []):
                    files = self.media.setdefault(p.ids["video"], {})
                    files[f"videos/{video}.mp4"] = b"\x00\x00\x00\x18ftypmp42" + rng.randbytes(
                        rng.randint(512, 4096)
                    )
                    files[f"transcripts/{video}.txt"] = (
                        f"Transcript of practice video {video}.\nSpeaker: Hi, thanks for "
                        "taking the call today...\n"
                    ).encode()
                if p.ids["video"] not in self.media:
                    self.media[p.ids["video"]] = {}
                self.media[p.ids["video"]][OWNER_JSON] = json.dumps(
                    {"user_id": p.ids["video"], "email": p.email}
                ).encode()

    def coaching(self, people: list[_Person]) -> None:
        rng = self.rng
        users = [p for p in people if "coaching" in p.ids]
        for p in users:
            self.add(
                "coaching",
                "users",
                {
                    "id": p.ids["coaching"],
                    "email": p.email,
                    "name": p.name,
                    "role": rng.choice(("rep", "rep", "coach")),
                    "team": f"{p.company} {rng.choice(('East', 'West', 'EMEA'))}",
                    "phone": p.phone,
                    "password_hash": f"pbkdf2${rng.getrandbits(64):016x}",
                    "security_answer": rng.choice(("Rex", "Lisbon", "Blue")),
                    "email_opt_in": True,
                    "created_at": self.when(),
                },
            )
        ids = [p.ids["coaching"] for p in users]
        by_key = {p.key: p.ids["coaching"] for p in users if p.key}
        others = [i for i in ids if i not in by_key.values()] or [by_key["dana_lookalike"]]
        recs_of: dict[str, list[int]] = {}
        for p in users:
            for _ in range({"dana": 2, "dana_lookalike": 1}.get(p.key or "", rng.randint(0, 2))):
                rid = self.next_id("recording")
                recs_of.setdefault(p.ids["coaching"], []).append(rid)
                self.add(
                    "coaching",
                    "practice_recordings",
                    {
                        "id": rid,
                        "user_id": p.ids["coaching"],
                        "title": f"Roleplay {rid}",
                        "media_url": f"https://media.example/rec/{rid}",
                        "recorded_at": self.when(),
                    },
                )
                for criterion in ("clarity", "discovery", "next steps"):
                    self.add(
                        "coaching",
                        "scores",
                        {
                            "id": self.next_id("score"),
                            "recording_id": rid,
                            "criterion": criterion,
                            "score": rng.randint(1, 5),
                        },
                    )
                for _ in range(1 if p.key else rng.randint(0, 2)):
                    self.add(
                        "coaching",
                        "feedback",
                        {
                            "id": self.next_id("feedback"),
                            "recording_id": rid,
                            "reviewer_id": rng.choice(others),
                            "body": "Good structure; tighten the ask.",
                            "created_at": self.when(),
                        },
                    )
        # Dana reviews someone else's recording: not her record, but it points at her.
        other_recording = next(
            r for o in [*others, by_key["dana_lookalike"]] for r in recs_of.get(o, [])
        )
        self.add(
            "coaching",
            "feedback",
            {
                "id": self.next_id("feedback"),
                "recording_id": other_recording,
                "reviewer_id": by_key["dana"],
                "body": "Strong discovery questions.",
                "created_at": self.when(),
            },
        )

    def learning(self, people: list[_Person]) -> None:
        rng = self.rng
        for i, title in enumerate(COURSES, start=1):
            self.add(
                "learning",
                "courses",
                {
                    "id": i,
                    "title": title,
                    "category": "product" if "Product" in title else "skills",
                },
            )
        for p in people:
            if "learning" not in p.ids:
                continue
            email = "  Sam.Okafor@Example.com " if p.key == "sam" else p.email
            self.add(
                "learning",
                "learners",
                {
                    "id": p.ids["learning"],
                    "email": email,
                    "name": p.name,
                    "company": p.company,
                    "newsletter": True,
                    "created_at": self.when(),
                },
            )
            n = {"dana": 3, "sam": 2}.get(p.key or "", rng.randint(0, 3))
            for course in rng.sample(range(1, len(COURSES) + 1), n):
                eid = self.next_id("enrollment")
                self.add(
                    "learning",
                    "enrollments",
                    {
                        "id": eid,
                        "learner_id": p.ids["learning"],
                        "course_id": course,
                        "enrolled_at": self.when(),
                        "completed_at": None if rng.random() < 0.3 else self.when(),
                    },
                )
                for q in range(2 if p.key else rng.randint(0, 2)):
                    self.add(
                        "learning",
                        "quiz_results",
                        {
                            "id": self.next_id("quiz"),
                            "enrollment_id": eid,
                            "quiz": f"Quiz {q + 1}",
                            "score": decimal.Decimal(rng.randint(40, 100))
                            + decimal.Decimal("0.50"),
                            "taken_at": self.when(),
                        },
                    )

    def marketing(self, people: list[_Person]) -> None:
        rng = self.rng
        for p in people:
            if "marketing" not in p.ids:
                continue
            emails = [p.email, " Dana.Reyes@Example.COM"] if p.key == "dana" else [p.email]
            for email in emails:
                lid = self.next_id("lead")
                self.add(
                    "marketing",
                    "leads",
                    {
                        "id": lid,
                        "email": email,
                        "name": p.name,
                        "company": p.company,
                        "phone": p.phone,
                        "source": rng.choice(("webinar", "ebook", "demo request")),
                        "created_at": self.when(),
                    },
                )
                for name in rng.sample(LISTS, 2 if p.key else rng.randint(0, 2)):
                    self.add(
                        "marketing",
                        "subscriptions",
                        {
                            "id": self.next_id("subscription"),
                            "lead_id": lid,
                            "list_name": name,
                            "opted_in": True,
                        },
                    )

    def billing(self, people: list[_Person]) -> None:
        rng = self.rng
        for p in people:
            if "billing" not in p.ids:
                continue
            self.add(
                "billing",
                "accounts",
                {
                    "id": p.ids["billing"],
                    "email": p.email,
                    "name": p.name,
                    "company": p.company,
                    "billing_address": f"{rng.randint(1, 999)} Market St, Springfield",
                    "created_at": self.when(),
                },
            )
            card = "4111" + "".join(str(rng.randint(0, 9)) for _ in range(12))
            for _ in range(3 if p.key else rng.randint(0, 4)):
                issued = self.when(720)
                seq = self.next_id("invoice")
                self.add(
                    "billing",
                    "invoices",
                    {
                        "id": f"INV-{issued.year}-{seq:06d}",
                        "account_id": p.ids["billing"],
                        "amount": decimal.Decimal(rng.randint(1000, 90000)) / 100,
                        "currency": "USD",
                        "issued_at": issued.date(),
                        "card_last4": card[-4:],
                        "card_number": card,
                    },
                )


OWNER_JSON = "owner.json"

# who owns what, written out by hand so the oracle does not reuse the connector's logic
_OWNERSHIP: dict[str, tuple[str, str, dict[str, tuple[str, str, str]]]] = {
    # store: (identity table, email column, {child: (owner column, parent table, parent column)})
    "video": (
        "users",
        "email",
        {
            "videos": ("owner_id", "users", "id"),
            "comments": ("author_id", "users", "id"),
            "views": ("viewer_id", "users", "id"),
        },
    ),
    "coaching": (
        "users",
        "email",
        {
            "practice_recordings": ("user_id", "users", "id"),
            "feedback": ("recording_id", "practice_recordings", "id"),
            "scores": ("recording_id", "practice_recordings", "id"),
        },
    ),
    "learning": (
        "learners",
        "email",
        {
            "enrollments": ("learner_id", "learners", "id"),
            "quiz_results": ("enrollment_id", "enrollments", "id"),
        },
    ),
    "marketing": ("leads", "email", {"subscriptions": ("lead_id", "leads", "id")}),
    "billing": ("accounts", "email", {"invoices": ("account_id", "accounts", "id")}),
}


def _expected(data: DemoData, email: str, media_id: str | None) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for store, (identity, email_col, children) in _OWNERSHIP.items():
        tables = data.sql[store]
        owned: dict[str, list[dict[str, Any]]] = {
            identity: [
                r
                for r in tables.get(identity, [])
                if str(r[email_col]).strip().lower() == email.lower()
            ]
        }
        for child, (col, parent, pcol) in children.items():  # dicts keep parent-first order
            keys = {r[pcol] for r in owned.get(parent, [])}
            owned[child] = [r for r in tables.get(child, []) if r[col] in keys]
        counts = {t: len(rows) for t, rows in owned.items() if rows}
        if counts:
            out[store] = counts
    files = data.media.get(media_id or "", {})
    if files:
        out[MEDIA] = {"profile": 1}
        for collection in ("videos", "transcripts"):
            out[MEDIA][collection] = sum(1 for f in files if f.startswith(f"{collection}/"))
    return out


def generate_demo_data(*, people: int = 200, seed: int = 7) -> DemoData:
    """Every store's rows, deterministic for a given (people, seed)."""
    gen = _Generator(people, seed)
    everyone = gen.people()
    gen.video(everyone)
    gen.coaching(everyone)
    gen.learning(everyone)
    gen.marketing(everyone)
    gen.billing(everyone)
    data = DemoData(gen.rows, gen.media, {})
    for person in everyone:
        if person.key is None:
            continue
        ids = {s: v for s, v in person.ids.items() if v}
        spec = next(s for s in DEMO_PEOPLE if s["key"] == person.key)
        data.people[person.key] = DemoPerson(
            key=person.key,
            name=person.name,
            email=person.email,
            note=str(spec["note"]),
            product_ids=ids,
            records=_expected(data, person.email, ids.get(MEDIA)),
        )
    return data


def sqlite_path(data_dir: Path, store: str) -> Path:
    return Path(data_dir) / "stores" / f"{store}.db"


def seed_demo_stores(data_dir: Path, *, people: int = 200, seed: int = 7) -> DemoManifest:
    """Recreate every demo store under `data_dir/stores/` from scratch; same input, same stores."""
    data_dir = Path(data_dir)
    stores_dir = data_dir / "stores"
    if stores_dir.exists():
        shutil.rmtree(stores_dir)
    stores_dir.mkdir(parents=True)
    data = generate_demo_data(people=people, seed=seed)
    locations: dict[str, str] = {}
    for store in SQL_STORES:
        path = sqlite_path(data_dir, store)
        engine = sa.create_engine(f"sqlite:///{path}")
        try:
            write_sql_store(engine, store, data.sql[store])
        finally:
            engine.dispose()
        locations[store] = str(path)
    media_root = stores_dir / MEDIA
    for user_id, files in data.media.items():
        for rel, content in files.items():
            target = media_root / user_id / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
    media_root.mkdir(exist_ok=True)
    locations[MEDIA] = str(media_root)
    manifest = DemoManifest(
        seed=seed,
        people_count=people,
        data_dir=str(data_dir),
        stores_dir=str(stores_dir),
        config_path=str(STORES_TOML),
        stores=locations,
        people=data.people,
    )
    (stores_dir / "manifest.json").write_text(manifest.to_json(), encoding="utf-8")
    return manifest
