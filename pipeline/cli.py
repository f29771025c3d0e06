"""`privacy`: the command line for intake systems, operators and developers."""

from __future__ import annotations

import json
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import click

from connectors.cli import connector_group
from pipeline.bootstrap import App
from pipeline.dashboard import cli as dashboard_cli
from pipeline.errors import PrivacyError


def _app() -> App:
    from pipeline.logs import configure_logging

    app = App.from_env()
    configure_logging(app.settings)
    return app


def _operator() -> str:
    return os.environ.get("PRIVACY_OPERATOR") or os.environ.get("USER") or "cli"


@click.group()
def main() -> None:
    """Allego's privacy-request pipeline."""


@main.command()
@click.argument("source", type=click.File("rb"))
def submit(source: Any) -> None:
    """Put a request document (FILE, or - for stdin) on the intake queue."""
    from pipeline.intake import submit as submit_doc

    message_id = submit_doc(source.read(), bus=_app().bus)
    click.echo(f"queued as message {message_id}")


@main.command()
@click.argument("request_id")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def status(request_id: str, as_json: bool) -> None:
    """Show a request's state, stores, emails and deadline (never personal data)."""
    from pipeline.status import describe_request

    try:
        info = describe_request(_app(), request_id)
    except PrivacyError as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(
        f"{info['request_id']}  {info['type']}  {info['state']}"
        f"{'  (' + info['reason'] + ')' if info['reason'] else ''}"
    )
    flag = " OVERDUE" if info["overdue"] else " at risk" if info["at_risk"] else ""
    click.echo(
        f"  due {info['due_at']}{flag}  received {info['received_at']}  "
        f"verified by {info['verified_by'] or '-'}"
    )
    for t in info["stores"]:
        click.echo(
            f"  {t['phase']:<8} {t['store']:<12} {t['status']:<8} attempts={t['attempts']}"
            f"{'  ' + t['error'] if t['error'] else ''}"
        )
    for e in info["emails"]:
        click.echo(f"  email {e['event']:<24} {e['status']}")


@main.command()
def migrate() -> None:
    """Bring the state database's schema to the current revision."""
    from pipeline.migrate import upgrade

    app = _app()
    upgrade(app.engine)
    click.echo("state database is at the current schema")


@main.command()
@click.option("--processes", default=2, show_default=True)
@click.option("--threads", default=4, show_default=True)
def worker(processes: int, threads: int) -> None:
    """Run dramatiq worker processes for every stage queue."""
    from pipeline.migrate import require_current

    app = _app()
    require_current(app.engine)
    app.connectors  # noqa: B018 - validate every connector before taking messages
    app.close()
    os.execv(
        sys.executable,
        [
            sys.executable,
            "-m",
            "dramatiq",
            "workers.actors",
            "--processes",
            str(processes),
            "--threads",
            str(threads),
        ],
    )


@main.command()
def web() -> None:
    """Serve the confirmation and download pages."""
    from pipeline.migrate import require_current
    from pipeline.web import serve

    app = _app()
    require_current(app.engine)
    serve(app)


@main.command()
def scheduler() -> None:
    """Run the reconciler: outbox relay, expiries, stalled requests."""
    from pipeline.migrate import require_current
    from pipeline.reconcile import run_forever

    app = _app()
    require_current(app.engine)
    run_forever(app)


@main.command()
def mailsink() -> None:
    """Run the development mail sink (writes every message to the data folder)."""
    from pipeline.mailsink import run_forever

    app = _app()
    run_forever(app.settings.smtp_host, app.settings.smtp_port, app.settings.mail_dir)


@main.command()
@click.option("--people", default=200, show_default=True)
def seed(people: int) -> None:
    """(Re)create the demo Allego product stores in the data folder."""
    from connectors.allego.seed import seed_demo_stores

    manifest = seed_demo_stores(_app().settings.data_dir, people=people)
    click.echo(f"seeded demo stores in {manifest.stores_dir}")


@main.command()
@click.option("--timeout", default=180, show_default=True, help="Seconds to wait for requests.")
def demo(timeout: int) -> None:
    """Seed the stores, start everything, run one request of each type end to end."""
    from pipeline.demo import run_demo

    sys.exit(run_demo(timeout=timeout))


@main.command()
@click.argument("request_id")
def retry(request_id: str) -> None:
    """Retry the failed stores of a request that needs attention."""
    from pipeline.operations import retry_request

    stores = retry_request(_app(), request_id, actor=_operator())
    click.echo(f"retrying {', '.join(stores) or 'the action stage'}")


@main.command()
@click.argument("request_id")
@click.option("--to", "new_due", required=True, help="New due date (RFC 3339 or YYYY-MM-DD).")
@click.option("--reason", required=True)
def extend(request_id: str, new_due: str, reason: str) -> None:
    """Extend a request's deadline within the law, with a reason the person is told."""
    from datetime import UTC

    from pipeline.operations import extend_deadline

    moment = datetime.fromisoformat(new_due)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    try:
        extend_deadline(_app(), request_id, moment, reason, actor=_operator())
    except PrivacyError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo("deadline extended; the person will be told")


@main.command()
@click.argument("request_id")
@click.option("--reason", required=True)
def cancel(request_id: str, reason: str) -> None:
    """Cancel a request (recorded with the reason)."""
    from pipeline.operations import cancel_request

    cancel_request(_app(), request_id, reason, actor=_operator())
    click.echo("cancelled")


@main.command("close-concern")
@click.argument("request_id")
@click.option("--reply", required=True, help="The privacy team's answer to the person.")
def close_concern(request_id: str, reply: str) -> None:
    """Close a concern's case and mail the reply (with the right to complain)."""
    from pipeline.notify import close_case

    close_case(_app(), request_id, reply, actor=_operator())
    click.echo("case closed; reply queued")


@main.command("is-contactable")
@click.argument("email")
def is_contactable(email: str) -> None:
    """Exit 0 if EMAIL may be contacted, 1 if it opted out or was erased."""
    from pipeline.suppression import is_contactable as check

    ok = check(email, app=_app())
    click.echo("contactable" if ok else "suppressed")
    sys.exit(0 if ok else 1)


@main.group()
def audit() -> None:
    """The tamper-evident audit log."""


@audit.command("verify")
def audit_verify() -> None:
    """Walk the hash chain; name the first broken entry."""
    from pipeline.audit import verify_chain

    with _app().sessions() as session:
        report = verify_chain(session)
    if report.intact:
        click.echo(f"audit chain intact: {report.entries} entries")
        return
    click.echo(f"audit chain BROKEN at entry {report.first_broken_id}: {report.problem}", err=True)
    sys.exit(1)


@main.group()
def keys() -> None:
    """Key material."""


@keys.command("rotate")
def keys_rotate() -> None:
    """Add a new data key and make it active (running processes pick it up)."""
    from pipeline.rotation import rotate

    click.echo(f"active key is now {rotate(_app())}; run `privacy keys reencrypt` next")


@keys.command("reencrypt")
@click.option("--batch", default=200, show_default=True)
def keys_reencrypt(batch: int) -> None:
    """Move every field and archive to the active key, in batches, while requests flow."""
    from pipeline.rotation import reencrypt

    click.echo(f"re-encrypted {reencrypt(_app(), batch=batch)} ciphertext(s)")


@keys.command("usage")
def keys_usage() -> None:
    """How many ciphertexts each key id still protects."""
    from pipeline.rotation import usage

    app = _app()
    counts = usage(app)
    for kid in app.keys.ring.key_ids:
        marker = " (active)" if kid == app.keys.ring.active else ""
        click.echo(f"{kid}{marker}: {counts.get(kid, 0)}")


@keys.command("retire")
@click.argument("key_id")
def keys_retire(key_id: str) -> None:
    """Remove an old key from the ring; refused while anything still uses it."""
    from pipeline.rotation import retire

    try:
        retire(_app(), key_id)
    except PrivacyError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"retired {key_id}")


@keys.command("generate")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
def keys_generate(path: Path) -> None:
    """Write fresh production keys to PATH (mode 600); point PRIVACY_KEYS_FILE at it."""
    from pipeline.crypto import Keys

    if path.exists():
        raise click.ClickException(f"{path} exists; refusing to overwrite keys")
    path.write_text(json.dumps(Keys.generate(demo=False).to_json(), indent=2))
    path.chmod(0o600)
    click.echo(f"wrote {path}")


main.add_command(dashboard_cli.operator)
main.add_command(dashboard_cli.dashboard)
main.add_command(connector_group)

if __name__ == "__main__":
    main()
