"""Local development services: make sure a Redis answers for the embedded default, and
start private PostgreSQL and RabbitMQ servers for fault tests.

``ensure_redis`` is what ``privacy demo`` (and anything else that runs the embedded
default) calls before it talks to the broker: if a Redis already answers at the URL it
does nothing; if the URL points at this machine and ``redis-server`` is installed it
starts a throwaway one (no persistence) as a child process; otherwise it fails with an
error that says how to get one.  Nothing here connects at import time.

``PrivatePostgres`` and ``PrivateRabbitmq`` start a server of the caller's own from the
machine's installed binaries, in a folder of the caller's, on free loopback ports, so a
fault harness can crash and restart it without touching the machine's shared servers.
Both servers refuse to run as root: as root they run as the package's service user
(``postgres``, ``rabbitmq``) through ``runuser``.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit

import redis

from pipeline.errors import PrivacyError
from pipeline.mailsink import free_port

__all__ = [
    "PrivatePostgres",
    "PrivateRabbitmq",
    "RedisUnavailableError",
    "ServiceUnavailableError",
    "ensure_redis",
    "redis_answers",
]

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


class ServiceUnavailableError(PrivacyError, RuntimeError):
    """A private server could not be started here (not installed, or it failed)."""


def _as_service_user(user: str) -> list[str]:
    """The command prefix that runs a server as `user` when we are root (PostgreSQL and
    RabbitMQ refuse root, or would leave root-owned files in their folders)."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam(user)
    except KeyError as exc:
        raise ServiceUnavailableError(
            f"running as root, and there is no {user!r} user to run the server as: install "
            f"the Debian package that creates it (`./dev services` does)"
        ) from exc
    return ["runuser", "-u", user, "--"]


def _own_folder(folder: Path, user: str) -> Path:
    """`folder`, created and writable by the service user. Its parent must let that user
    through (mode o+x)."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        entry = pwd.getpwnam(user)
        shutil.chown(folder, entry.pw_uid, entry.pw_gid)
    return folder


def _run(command: list[str], what: str, *, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    if done.returncode != 0:
        raise ServiceUnavailableError(
            f"{what} failed ({done.returncode}): {(done.stderr or done.stdout).strip()[-800:]}"
        )
    return done.stdout


def postgres_bin_dir() -> Path:
    """The newest installed PostgreSQL's binaries (Debian keeps them out of PATH)."""

    def version(path: str) -> tuple[int, ...]:
        return tuple(int(n) for n in re.findall(r"\d+", Path(path).parent.name))

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=version)
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("pg_ctl")
    if on_path:
        return Path(on_path).parent
    raise ServiceUnavailableError(
        "no PostgreSQL server binaries (pg_ctl) found in /usr/lib/postgresql/*/bin or on "
        "PATH: install the postgresql package (`./dev services` does)"
    )


class PrivatePostgres:
    """A PostgreSQL cluster of the caller's own: `initdb` into `folder`, trust auth on
    127.0.0.1, a free port, run with `pg_ctl`. `crash()` stops it the way a power cut
    or an OOM kill would (`-m immediate`: no checkpoint, every connection cut mid-
    transaction); `start()` then runs crash recovery."""

    user = "postgres"

    def __init__(self, folder: Path):
        self.folder = folder
        self.data = folder / "data"
        self.log = folder / "postgres.log"
        self.port = free_port()
        self.bin = postgres_bin_dir()
        self._prefix = _as_service_user(self.user)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def _ctl(self, *args: str) -> None:
        command = [*self._prefix, str(self.bin / "pg_ctl"), "-D", str(self.data), *args]
        _run(command, f"pg_ctl {args[-1]}")

    def start(self) -> PrivatePostgres:
        if not (self.data / "PG_VERSION").exists():
            _own_folder(self.folder, self.user)
            _run(
                [
                    *self._prefix,
                    str(self.bin / "initdb"),
                    "-D", str(self.data),
                    "-U", "postgres",
                    "--auth=trust",
                    "-E", "UTF8",
                    "--no-sync",
                ],
                "initdb",
            )  # fmt: skip
        options = (
            f"-c listen_addresses=127.0.0.1 -c port={self.port} "
            f"-c unix_socket_directories={self.folder}"
        )
        self._ctl("-l", str(self.log), "-o", options, "-w", "-t", "60", "start")
        return self

    def crash(self) -> None:
        self._ctl("-m", "immediate", "-w", "stop")

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._ctl("-m", "fast", "-w", "stop")


def rabbitmq_bin_dir() -> Path:
    """Where the RabbitMQ scripts are (Debian's /usr/sbin ones are wrappers that switch to
    the system node's user and folder; the real ones are in /usr/lib/rabbitmq/bin)."""
    debian = Path("/usr/lib/rabbitmq/bin")
    if (debian / "rabbitmq-server").exists():
        return debian
    on_path = shutil.which("rabbitmq-server")
    if on_path:
        return Path(on_path).parent
    raise ServiceUnavailableError(
        "rabbitmq-server is not installed: install the rabbitmq-server package "
        "(`./dev services` does)"
    )


class PrivateRabbitmq:
    """A RabbitMQ node of the caller's own (its own node name, ports, database and logs in
    `folder`, no plugins), beside any system node: restarting it disturbs nobody else.
    `restart()` stops and starts the RabbitMQ application on the node: every connection
    is cut, and durable queues come back with their persistent messages."""

    user = "rabbitmq"

    def __init__(self, folder: Path):
        self.folder = folder
        self.port = free_port()
        self.node = f"privacy-{self.port}@localhost"
        self.bin = rabbitmq_bin_dir()
        self._prefix = _as_service_user(self.user)
        home = pwd.getpwnam(self.user).pw_dir if self._prefix else os.environ.get("HOME", "")
        self._env = {
            **os.environ,
            "HOME": home,  # where the Erlang cookie the CLI shares with the node lives
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(free_port()),
            "RABBITMQ_MNESIA_BASE": str(folder / "mnesia"),
            "RABBITMQ_LOG_BASE": str(folder / "log"),
            "RABBITMQ_PID_FILE": str(folder / "node.pid"),
            "RABBITMQ_CONFIG_FILE": str(folder / "rabbitmq"),  # not the system node's
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(folder / "enabled_plugins"),
        }

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    def _command(self, script: str, *args: str) -> list[str]:
        env = [f"{k}={v}" for k, v in self._env.items() if k == "HOME" or k.startswith("RABBIT")]
        return [*self._prefix, "env", *env, str(self.bin / script), *args]

    def _ctl(self, *args: str) -> None:
        _run(self._command("rabbitmqctl", "-n", self.node, *args), f"rabbitmqctl {args[0]}")

    def start(self) -> PrivateRabbitmq:
        _own_folder(self.folder, self.user)
        (self.folder / "rabbitmq.conf").write_text("")
        (self.folder / "enabled_plugins").write_text("[].\n")
        if self._prefix:
            entry = pwd.getpwnam(self.user)
            for name in ("rabbitmq.conf", "enabled_plugins"):
                shutil.chown(self.folder / name, entry.pw_uid, entry.pw_gid)
        _run(self._command("rabbitmq-server", "-detached"), "rabbitmq-server")
        self._ctl("wait", str(self.folder / "node.pid"), "--timeout", "90")
        return self

    def restart(self, down_seconds: float = 0.0) -> None:
        self._ctl("stop_app")
        time.sleep(down_seconds)
        self._ctl("start_app")

    def stop(self) -> None:
        pid_file = self.folder / "node.pid"
        try:
            self._ctl("stop")
        except (ServiceUnavailableError, subprocess.TimeoutExpired):
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(pid_file.read_text().strip()), signal.SIGKILL)
