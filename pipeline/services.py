"""Local development services: make sure a Redis answers for the embedded default.

``ensure_redis`` is what ``privacy demo`` (and anything else that runs the embedded
default) calls before it talks to the broker: if a Redis already answers at the URL it
does nothing; if the URL points at this machine and ``redis-server`` is installed it
starts a throwaway one (no persistence) as a child process; otherwise it fails with an
error that says how to get one.  Nothing here connects at import time.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit

import redis

from pipeline.errors import PrivacyError

__all__ = ["RedisUnavailableError", "ensure_redis", "redis_answers"]

LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1", "ip6-localhost"})
DEFAULT_REDIS_PORT = 6379
START_TIMEOUT_S = 10.0
PING_TIMEOUT_S = 0.5


class RedisUnavailableError(PrivacyError, RuntimeError):
    """No Redis answers at the broker URL and none could be started here."""


def redis_answers(url: str, *, timeout: float = PING_TIMEOUT_S) -> bool:
    """True when a Redis at ``url`` answers PING within ``timeout`` seconds."""
    client = redis.Redis.from_url(
        url, socket_connect_timeout=timeout, socket_timeout=timeout, retry_on_timeout=False
    )
    try:
        return bool(client.ping())
    except (redis.exceptions.RedisError, OSError):
        return False
    finally:
        client.close()


def _redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[-1]
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return parts._replace(netloc=user + netloc).geturl()


def _install_hint(url: str) -> str:
    return (
        f"No Redis answers at {_redact(url)}. Install one (Debian/Ubuntu: "
        "`apt-get install redis-server`; `./dev demo` does this for you) so it can be "
        "started automatically, or set PRIVACY_BROKER_URL to a Redis that is running "
        "(e.g. redis://host:6379/0)."
    )


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


def ensure_redis(
    url: str, *, data_dir: Path, start_timeout: float = START_TIMEOUT_S
) -> subprocess.Popen[bytes] | None:
    """Make sure a Redis answers at ``url``.

    Returns ``None`` if one already answers, or the ``Popen`` of a ``redis-server`` this
    function started (the caller owns it: ``terminate()`` and ``wait()`` it when done).
    Raises :class:`RedisUnavailableError` when no Redis answers and none can be started
    here (the URL is not on this machine, or ``redis-server`` is not installed).
    """
    if redis_answers(url):
        return None

    parts = urlsplit(url)
    if parts.scheme != "redis":
        raise RedisUnavailableError(
            f"Cannot start a local Redis for {_redact(url)}: only redis:// URLs are started "
            "automatically. " + _install_hint(url)
        )
    host = parts.hostname or "localhost"
    port = parts.port or DEFAULT_REDIS_PORT
    if host not in LOOPBACK_HOSTS:
        raise RedisUnavailableError(
            f"Redis at {host}:{port} does not answer and is not on this machine, so it "
            "is not started automatically. " + _install_hint(url)
        )

    binary = shutil.which("redis-server")
    if binary is None:
        raise RedisUnavailableError("redis-server is not on PATH. " + _install_hint(url))

    run_dir = Path(data_dir) / "redis"
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / f"redis-{port}.log"
    err_path = run_dir / f"redis-{port}.stderr"
    bind = "::1" if host in ("::1", "ip6-localhost") else "127.0.0.1"
    command = [
        binary,
        "--port", str(port),
        "--bind", bind,
        "--save", "",
        "--appendonly", "no",
        "--daemonize", "no",
        "--dir", str(run_dir),
        "--logfile", str(log_path),
    ]  # fmt: skip
    log_path.unlink(missing_ok=True)  # so an error report shows this run only
    # Startup errors (bad option, port taken) go to stderr before the log file is
    # opened, so keep stderr in a file rather than a pipe nobody drains.
    with err_path.open("wb") as err_file:
        proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err_file,
        )

    deadline = time.monotonic() + start_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        if redis_answers(url, timeout=0.2):
            return proc
        time.sleep(0.1)

    # It exited early or never answered: clean up and say why.
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        what = f"did not answer within {start_timeout:g} s"
    else:
        what = f"exited with code {proc.returncode}"
    detail = "\n".join(t for t in (_tail(err_path), _tail(log_path)) if t)
    raise RedisUnavailableError(
        f"Started {binary} on {bind}:{port} but it {what}."
        + (f"\n{detail}" if detail else "")
        + f"\nLog: {log_path}"
    )
