"""Settings, read once from the environment by the composition root.

Every value has an embedded default that runs the demo on one machine: SQLite under a
local data folder, Redis on loopback, a local mail sink. Production sets PRIVACY_ENV to
`production`, which refuses demo keys.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ValueError(f"{name} must be a whole number, got {raw!r}") from exc


@dataclass(frozen=True)
class Settings:
    env: str = "demo"
    data_dir: Path = Path(".data")
    database_url: str = ""
    broker_url: str = "redis://127.0.0.1:6379/0"
    queue_namespace: str = "allego-privacy"
    smtp_host: str = "127.0.0.1"
    smtp_port: int = 8025
    smtp_timeout: int = 10
    mail_from: str = "Allego Privacy <privacy@allego.example>"
    base_url: str = "http://127.0.0.1:8000"
    web_host: str = "127.0.0.1"
    web_port: int = 8000
    keys_file: Path | None = None
    keys_env: Mapping[str, str] = field(default_factory=dict)
    stores_config: Path | None = None
    verify_ttl_seconds: int = 72 * 3600
    verify_max_attempts: int = 5
    download_ttl_seconds: int = 7 * 24 * 3600
    store_max_attempts: int = 6
    # a person with more records than this in a store (as located) is served there after
    # the others of their batch, alone, so that a big request never holds back the small
    # ones travelling with it
    heavy_records: int = 5000
    retry_base_ms: int = 1000
    retry_max_ms: int = 5 * 60 * 1000
    # how long a stage's messages may wait for others to share a batch message with
    # (`pipeline.outbox.Publisher`); 0 publishes each commit's messages at once
    batch_window_ms: int = 50
    # the same for verify messages, where the groups form that travel together through
    # the later stages: under load a request waits up to this long to be verified with
    # the others that came meanwhile; alone, it waits for nothing
    gather_window_ms: int = 200
    # requests past verification and not yet done (and not stalled) above which
    # verification leaves the requests that need no one's action waiting, oldest first,
    # until others finish: under a burst requests then finish group by group instead of
    # all at the end
    admit_max: int = 150
    # an idle stage queue is polled again after at most this long (Redis broker)
    worker_idle_poll_ms: int = 100
    # the same for a delay queue (messages due later: retries wait `retry_base_ms` or
    # more, which also bounds this)
    worker_delay_poll_ms: int = 1000
    stall_seconds: int = 300
    scheduler_interval_seconds: int = 5
    log_format: str = "console"
    max_document_bytes: int = 64 * 1024
    # Hostile callers. Web limits use the `limits` notation ("30/minute", "10/minute;100/hour").
    verify_limit_per_address: str = "30/minute"
    verify_limit_per_email: str = "10/minute"
    download_limit_per_address: str = "30/minute"
    download_limit_per_email: str = "10/hour"
    rate_limit_storage_url: str = ""  # empty: the broker's Redis, else per-process memory
    trusted_proxies: int = 0  # proxies in front of `privacy web` whose X-Forwarded-For counts
    verify_mails_per_email: int = 5  # unanswered confirmation mails per address per window
    verify_mail_window_seconds: int = 24 * 3600

    @property
    def production(self) -> bool:
        return self.env == "production"

    @property
    def state_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'state.db').resolve()}"

    @property
    def exports_dir(self) -> Path:
        return self.data_dir / "exports"

    @property
    def mail_dir(self) -> Path:
        return self.data_dir / "mail"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        data_dir = Path(env.get("PRIVACY_DATA_DIR", ".data"))
        keys_file = env.get("PRIVACY_KEYS_FILE")
        stores = env.get("PRIVACY_STORES_CONFIG")
        return cls(
            env=env.get("PRIVACY_ENV", "demo"),
            data_dir=data_dir,
            database_url=env.get("PRIVACY_DATABASE_URL", ""),
            broker_url=env.get("PRIVACY_BROKER_URL", cls.broker_url),
            queue_namespace=env.get("PRIVACY_QUEUE_NAMESPACE", cls.queue_namespace),
            smtp_host=env.get("PRIVACY_SMTP_HOST", cls.smtp_host),
            smtp_port=_int(env, "PRIVACY_SMTP_PORT", cls.smtp_port),
            smtp_timeout=_int(env, "PRIVACY_SMTP_TIMEOUT", cls.smtp_timeout),
            mail_from=env.get("PRIVACY_MAIL_FROM", cls.mail_from),
            base_url=env.get("PRIVACY_BASE_URL", cls.base_url).rstrip("/"),
            web_host=env.get("PRIVACY_WEB_HOST", cls.web_host),
            web_port=_int(env, "PRIVACY_WEB_PORT", cls.web_port),
            keys_file=Path(keys_file) if keys_file else None,
            keys_env={k: v for k, v in env.items() if k.startswith("PRIVACY_KEY")},
            stores_config=Path(stores) if stores else None,
            verify_ttl_seconds=_int(env, "PRIVACY_VERIFY_TTL", cls.verify_ttl_seconds),
            verify_max_attempts=_int(env, "PRIVACY_VERIFY_MAX_ATTEMPTS", cls.verify_max_attempts),
            download_ttl_seconds=_int(env, "PRIVACY_DOWNLOAD_TTL", cls.download_ttl_seconds),
            store_max_attempts=_int(env, "PRIVACY_STORE_MAX_ATTEMPTS", cls.store_max_attempts),
            heavy_records=_int(env, "PRIVACY_HEAVY_RECORDS", cls.heavy_records),
            retry_base_ms=_int(env, "PRIVACY_RETRY_BASE_MS", cls.retry_base_ms),
            retry_max_ms=_int(env, "PRIVACY_RETRY_MAX_MS", cls.retry_max_ms),
            batch_window_ms=_int(env, "PRIVACY_BATCH_WINDOW_MS", cls.batch_window_ms),
            gather_window_ms=_int(env, "PRIVACY_GATHER_WINDOW_MS", cls.gather_window_ms),
            admit_max=_int(env, "PRIVACY_ADMIT_MAX", cls.admit_max),
            worker_idle_poll_ms=_int(env, "PRIVACY_WORKER_IDLE_POLL_MS", cls.worker_idle_poll_ms),
            worker_delay_poll_ms=_int(
                env, "PRIVACY_WORKER_DELAY_POLL_MS", cls.worker_delay_poll_ms
            ),
            stall_seconds=_int(env, "PRIVACY_STALL_SECONDS", cls.stall_seconds),
            scheduler_interval_seconds=_int(
                env, "PRIVACY_SCHEDULER_INTERVAL", cls.scheduler_interval_seconds
            ),
            log_format=env.get(
                "PRIVACY_LOG_FORMAT",
                "json" if env.get("PRIVACY_ENV") == "production" else "console",
            ),
            max_document_bytes=_int(env, "PRIVACY_MAX_DOCUMENT_BYTES", cls.max_document_bytes),
            verify_limit_per_address=env.get(
                "PRIVACY_VERIFY_LIMIT_PER_ADDRESS", cls.verify_limit_per_address
            ),
            verify_limit_per_email=env.get(
                "PRIVACY_VERIFY_LIMIT_PER_EMAIL", cls.verify_limit_per_email
            ),
            download_limit_per_address=env.get(
                "PRIVACY_DOWNLOAD_LIMIT_PER_ADDRESS", cls.download_limit_per_address
            ),
            download_limit_per_email=env.get(
                "PRIVACY_DOWNLOAD_LIMIT_PER_EMAIL", cls.download_limit_per_email
            ),
            rate_limit_storage_url=env.get(
                "PRIVACY_RATE_LIMIT_STORAGE_URL", cls.rate_limit_storage_url
            ),
            trusted_proxies=_int(env, "PRIVACY_TRUSTED_PROXIES", cls.trusted_proxies),
            verify_mails_per_email=_int(
                env, "PRIVACY_VERIFY_MAILS_PER_EMAIL", cls.verify_mails_per_email
            ),
            verify_mail_window_seconds=_int(
                env, "PRIVACY_VERIFY_MAIL_WINDOW", cls.verify_mail_window_seconds
            ),
        )
