"""`privacy submit` and `pipeline.intake.submit` only enqueue: the document lands on the
real Redis as a message to actor `intake` on queue `privacy.intake` (the v1 contract)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import redis
from click.testing import CliRunner

from pipeline import contract, topology
from pipeline.bootstrap import App
from pipeline.cli import main
from pipeline.intake import submit
from pipeline.settings import Settings

DOC = {
    "schema": contract.SCHEMA_ID,
    "request_id": "cli-1",
    "type": "opt_out",
    "subject": {"email": "sam.okafor@example.com"},
    "jurisdiction": "ccpa",
    "received_at": "2026-11-20T10:00:00Z",
    "channel": "email",
}


def _queued(namespace: str) -> list[dict]:
    client = redis.Redis()
    try:
        ids = client.lrange(f"{namespace}:{topology.INTAKE_QUEUE}", 0, -1)
        raw = [client.hget(f"{namespace}:{topology.INTAKE_QUEUE}.msgs", i) for i in ids]
        for key in client.scan_iter(f"{namespace}:*"):
            client.delete(key)
        return [json.loads(r) for r in raw if r]
    finally:
        client.close()


def test_cli_submit_puts_the_document_on_the_intake_queue(tmp_path: Path) -> None:
    namespace = f"privacy-cli-{uuid.uuid4().hex[:8]}"
    env = {"PRIVACY_QUEUE_NAMESPACE": namespace, "PRIVACY_DATA_DIR": str(tmp_path)}
    result = CliRunner().invoke(main, ["submit", "-"], input=json.dumps(DOC), env=env)
    assert result.exit_code == 0, result.output
    (message,) = _queued(namespace)
    assert message["actor_name"] == topology.INTAKE_ACTOR
    assert message["queue_name"] == topology.INTAKE_QUEUE
    assert message["args"] == [DOC]


def test_submit_passes_text_that_is_not_json_on_for_intake_to_reject(tmp_path: Path) -> None:
    namespace = f"privacy-cli-{uuid.uuid4().hex[:8]}"
    app = App(Settings(data_dir=tmp_path, queue_namespace=namespace))
    submit("this is not { json", bus=app.bus)
    (message,) = _queued(namespace)
    assert message["args"] == ["this is not { json"]
