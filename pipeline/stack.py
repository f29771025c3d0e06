"""Start the pipeline's processes on this machine: for the demo and end-to-end tests.

Real processes, as the Procfile runs them: dramatiq workers, the web process and the
scheduler, and optionally the operations dashboard, each with its output in a log file.
Several worker groups stand for several hosts: each is its own `pipeline.cli worker`
process group, and they share only the broker and the state database.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO


def group_names(role: str, count: int) -> tuple[str, ...]:
    """`worker`, `worker-2`, ...: the names of `count` process groups of one role."""
    return tuple(role if i == 1 else f"{role}-{i}" for i in range(1, count + 1))


@dataclass
class LocalStack:
    env: dict[str, str]
    log_dir: Path
    processes: int = 1  # per worker group
    threads: int = 4
    web: bool = True
    scheduler: bool = True
    dashboard: bool = False
    worker_groups: int = 1  # `pipeline.cli worker` process groups, as on that many hosts
    children: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    _logs: list[IO[bytes]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.worker_groups < 1:
            raise ValueError(
                f"LocalStack(worker_groups={self.worker_groups}): pass 1 or more worker groups"
            )

    @property
    def worker_names(self) -> tuple[str, ...]:
        """The worker groups' names (and log files' stems): `worker`, `worker-2`, ..."""
        return group_names("worker", self.worker_groups)

    def _command(self, name: str) -> tuple[str, ...]:
        if name in self.worker_names:
            return ("worker", "--processes", str(self.processes), "--threads", str(self.threads))
        return (name,)

    def _spawn(self, name: str) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        out = (self.log_dir / f"{name}.log").open("ab")
        self._logs.append(out)
        env = {**os.environ, **self.env}
        self.children[name] = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", *self._command(name)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def start(self) -> LocalStack:
        for name in self.worker_names:
            self._spawn(name)
        if self.scheduler:
            self._spawn("scheduler")
        if self.web:
            self._spawn("web")
            self.wait_for_web()
        if self.dashboard:
            self._spawn("dashboard")
            self.wait_for_dashboard()
        return self

    @property
    def dashboard_url(self) -> str:
        host = self.env.get("PRIVACY_DASHBOARD_HOST", "127.0.0.1")
        return f"http://{host}:{self.env.get('PRIVACY_DASHBOARD_PORT', '8001')}"

    def wait_for_web(self, timeout: float = 30) -> None:
        base = self.env.get("PRIVACY_BASE_URL", "http://127.0.0.1:8000")
        self._wait_for("web", base, timeout)

    def wait_for_dashboard(self, timeout: float = 30) -> None:
        self._wait_for("dashboard", self.dashboard_url, timeout)

    def _wait_for(self, name: str, base: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                with urllib.request.urlopen(f"{base}/healthz", timeout=1):
                    return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"the {name} process did not answer at {base} within {timeout:.0f} s")

    def worker_pids(self) -> list[int]:
        """The dramatiq worker processes of every worker group (the children of each
        group's main process)."""
        pids: list[int] = []
        for name in self.worker_names:
            main = self.children.get(name)
            if main is None or main.poll() is not None:
                continue
            path = Path(f"/proc/{main.pid}/task/{main.pid}/children")
            try:
                pids.extend(int(p) for p in path.read_text().split())
            except OSError:
                continue
        return pids

    def revive(self) -> list[str]:
        """Restart any process that exited, as a supervisor would; returns their names.

        dramatiq stops its whole worker group when one worker process dies (say, killed
        with -9); in production systemd, Kubernetes or the Procfile runner restarts it.
        """
        restarted = []
        for name, child in list(self.children.items()):
            if child.poll() is not None:
                child.wait()
                self._spawn(name)
                restarted.append(name)
        return restarted

    def check_alive(self) -> None:
        for name, child in self.children.items():
            if child.poll() is not None:
                log = (self.log_dir / f"{name}.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"the {name} process exited with {child.returncode}:\n{log}")

    def stop(self, timeout: float = 20) -> None:
        for child in self.children.values():
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for child in self.children.values():
            try:
                child.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
        for out in self._logs:
            out.close()
        self.children.clear()

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()
