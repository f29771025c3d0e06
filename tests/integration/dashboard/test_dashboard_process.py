"""The dashboard as a process of the local stack, as the demo runs it: the demo admin
signs in over HTTP and sees the requests; a re-run's new password replaces the old."""

from __future__ import annotations

import socket

import pytest

from pipeline.demo import dashboard_shows, demo_admin
from pipeline.stack import LocalStack
from tests.integration.dashboard.conftest import submit

pytestmark = pytest.mark.redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_stack_runs_the_dashboard_and_the_demo_admin_sees_the_requests(app, tmp_path):
    submit(app, "access", "r-in-dashboard")
    name, password = demo_admin(app)
    env = {
        "PRIVACY_DATA_DIR": str(app.settings.data_dir),
        "PRIVACY_DATABASE_URL": app.settings.state_url,
        "PRIVACY_QUEUE_NAMESPACE": app.settings.queue_namespace,
        "PRIVACY_DASHBOARD_PORT": str(free_port()),
    }
    stack = LocalStack(
        env=env, log_dir=tmp_path / "logs", web=False, scheduler=False, dashboard=True
    )
    with stack:
        url = stack.dashboard_url
        assert url.endswith(env["PRIVACY_DASHBOARD_PORT"])
        assert dashboard_shows(url, name, password, ["r-in-dashboard", "r-absent"]) == [
            "r-in-dashboard"
        ]
        again, new_password = demo_admin(app)  # a second demo run on the same data
        assert again == name and new_password != password
        with pytest.raises(LookupError):
            dashboard_shows(url, name, password, ["r-in-dashboard"])
        assert dashboard_shows(url, name, new_password, ["r-in-dashboard"]) == ["r-in-dashboard"]
    assert stack.children == {}
