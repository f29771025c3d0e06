"""ensure_redis: reuse a Redis that answers, start one on loopback, or say how to get one."""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.services import RedisUnavailableError, ensure_redis, redis_answers


@pytest.fixture
def redis_server_binary() -> str:
    """./dev services installs redis-server; its absence is a failure, never a skip."""
    path = shutil.which("redis-server")
    assert path, "redis-server is not installed: run ./dev services"
    return path


needs_redis_server = pytest.mark.usefixtures("redis_server_binary")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def started(tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Collects the servers a test starts and stops them whatever happens."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        _stop(proc)


@needs_redis_server
def test_starts_a_throwaway_redis_then_reuses_it(
    tmp_path: Path, started: list[subprocess.Popen[bytes]]
) -> None:
    url = f"redis://127.0.0.1:{_free_port()}/0"
    assert not redis_answers(url)

    proc = ensure_redis(url, data_dir=tmp_path)
    assert proc is not None
    started.append(proc)
    assert proc.poll() is None
    assert redis_answers(url)
    assert (tmp_path / "redis").is_dir()

    # A second call finds the one that answers and starts nothing.
    assert ensure_redis(url, data_dir=tmp_path) is None

    _stop(proc)
    assert not redis_answers(url)


@needs_redis_server
def test_port_taken_by_something_else_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        with pytest.raises(RedisUnavailableError, match=rf"127\.0\.0\.1:{port}"):
            ensure_redis(f"redis://127.0.0.1:{port}/0", data_dir=tmp_path, start_timeout=5)


def test_no_redis_and_no_binary_says_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    url = f"redis://127.0.0.1:{_free_port()}/0"

    with pytest.raises(RedisUnavailableError) as info:
        ensure_redis(url, data_dir=tmp_path)
    message = str(info.value)
    assert "apt-get install redis-server" in message
    assert "PRIVACY_BROKER_URL" in message
    assert url in message


def test_a_remote_redis_that_does_not_answer_is_never_started_here(tmp_path: Path) -> None:
    # 192.0.2.0/24 is TEST-NET-1: reserved, never routed.
    url = "redis://192.0.2.1:6379/0"
    with pytest.raises(RedisUnavailableError, match="not on this machine"):
        ensure_redis(url, data_dir=tmp_path)
    assert not (tmp_path / "redis").exists()
