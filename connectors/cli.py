"""`privacy connector ...`: dry-run a store for one person, scaffold a connector package.

Kept apart from the pipeline's CLI: it needs only the connectors and their
configuration, never the state database or the broker.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import click


@click.group("connector")
def connector_group() -> None:
    """Product store connectors: check one against its live store, or start a new one."""


def _config_and_data(config: Path | None) -> tuple[Path | None, Path]:
    data_dir = Path(os.environ.get("PRIVACY_DATA_DIR", ".data"))
    if config is None and os.environ.get("PRIVACY_STORES_CONFIG"):
        config = Path(os.environ["PRIVACY_STORES_CONFIG"])
    return config, data_dir


@connector_group.command("dry-run")
@click.argument("store")
@click.option("--email", required=True, help="The person's email address.")
@click.option("--user-id", default=None, help="The person's user id in this store, if known.")
@click.option(
    "--config",
    "config",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Stores config (default: $PRIVACY_STORES_CONFIG or the shipped one).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def dry_run_command(
    store: str, email: str, user_id: str | None, config: Path | None, as_json: bool
) -> None:
    """What STORE would export and erase for one person, changing nothing.

    Shows counts and field names, never the values themselves.
    """
    from connectors.base import ConnectorError, Identity
    from connectors.dryrun import CannotPlan, dry_run
    from connectors.registry import close_all, load_connectors

    config, data_dir = _config_and_data(config)
    # stdout is for the answer alone (--json is parsed): whatever the stores or their
    # drivers print while working goes to stderr
    with contextlib.redirect_stdout(sys.stderr):
        try:
            connectors = load_connectors(config, data_dir)
        except ConnectorError as exc:
            raise click.ClickException(str(exc)) from exc
        try:
            if store not in connectors:
                raise click.ClickException(
                    f"no store {store!r} is configured; configured: {', '.join(sorted(connectors))}"
                )
            identity = Identity(email=email, product_ids={store: user_id} if user_id else {})
            try:
                result = dry_run(connectors[store], identity)
            except CannotPlan as exc:
                raise click.ClickException(str(exc)) from exc
            except ConnectorError as exc:
                raise click.ClickException(f"{type(exc).__name__}: {exc}") from exc
        finally:
            close_all(connectors)
    if as_json:
        click.echo(json.dumps(result.as_dict(), indent=2, sort_keys=True))
        return
    located = ", ".join(f"{k} {v}" for k, v in sorted(result.located.items())) or "nothing"
    click.echo(f"store {store}: located {located} ({result.retained} retained)")
    if result.export is None:
        click.echo("export: not supported by this store")
    else:
        click.echo("export would hold:")
        for collection, info in sorted(result.export.items()):
            if collection == "(files)":
                click.echo(f"  files: {info['rows']} file(s), {info['fields'][0]}")
                continue
            click.echo(f"  {collection}: {info['rows']} row(s); {', '.join(info['fields'])}")
    plan = result.erase
    if plan is None:
        click.echo("erase: not supported by this store")
    else:
        click.echo("erase would:")
        for label, counts in (
            ("delete", plan.delete),
            ("delete others' rows hanging on them", plan.dependents),
            ("unlink others' rows (set to NULL)", plan.unlink),
            ("anonymize", plan.anonymize),
        ):
            if counts:
                click.echo(
                    f"  {label}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
                )
        for collection, kept in sorted(plan.retain.items()):
            click.echo(f"  retain: {collection} {kept.count} ({kept.legal_basis}; {kept.period})")
        if not (plan.delete or plan.dependents or plan.unlink or plan.anonymize or plan.retain):
            click.echo("  nothing")
    click.echo("nothing was changed")


@connector_group.command("scaffold")
@click.argument("name")
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False))
def scaffold_command(name: str, directory: Path) -> None:
    """Write a connector package NAME into DIRECTORY: code, mapping, fixture, kit test."""
    from connectors.scaffold import ScaffoldError, scaffold

    try:
        written = scaffold(name, directory)
    except ScaffoldError as exc:
        raise click.ClickException(str(exc)) from exc
    for path in written:
        click.echo(f"wrote {path}")
    click.echo(f"next: cd {directory} && pytest   (then fill in the marked parts)")
