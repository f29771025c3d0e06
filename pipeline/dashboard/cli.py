"""`privacy operator ...` and `privacy dashboard`: registered on the main CLI."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

import click

from pipeline.errors import PrivacyError

if TYPE_CHECKING:
    from pipeline.bootstrap import App


def _app() -> App:
    from pipeline.cli import _app as make

    return make()


def _actor() -> str:
    return os.environ.get("PRIVACY_OPERATOR") or os.environ.get("USER") or "cli"


@click.group()
def operator() -> None:
    """Dashboard operators: who may sign in, with which role."""


@operator.command("create")
@click.argument("name")
@click.option(
    "--role",
    type=click.Choice(["viewer", "officer", "admin"]),
    required=True,
    help="viewer: flow and counts; officer: reveals PII and acts; admin: also operators.",
)
@click.option(
    "--password-stdin",
    is_flag=True,
    help="Read the password from the first line of standard input instead of prompting.",
)
def operator_create(name: str, role: str, password_stdin: bool) -> None:
    """Create an operator (the first admin, for instance)."""
    from pipeline.dashboard.auth import create_operator

    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    try:
        create_operator(_app(), name, role, password, actor=_actor())
    except PrivacyError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"operator {name} created with role {role}")


@operator.command("disable")
@click.argument("name")
def operator_disable(name: str) -> None:
    """Stop an operator signing in, and end their sessions now."""
    from pipeline.dashboard.auth import disable_operator

    try:
        disable_operator(_app(), name, actor=_actor())
    except PrivacyError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"operator {name} disabled")


@operator.command("list")
def operator_list() -> None:
    """Operators, their roles and whether they are active."""
    from pipeline.dashboard.auth import list_operators

    for o in list_operators(_app()):
        status = f"disabled {o.disabled_at:%Y-%m-%d}" if o.disabled_at else "active"
        click.echo(f"{o.name:<24} {o.role:<8} {status}")


@click.command()
def dashboard() -> None:
    """Serve the operations dashboard (PRIVACY_DASHBOARD_HOST, PRIVACY_DASHBOARD_PORT)."""
    from pipeline.dashboard.app import DEFAULT_PORT, serve
    from pipeline.migrate import require_current

    app = _app()
    require_current(app.engine)
    port = os.environ.get("PRIVACY_DASHBOARD_PORT") or str(DEFAULT_PORT)
    if not port.isdigit():
        raise click.ClickException(f"PRIVACY_DASHBOARD_PORT must be a port number, got {port!r}")
    serve(app, os.environ.get("PRIVACY_DASHBOARD_HOST", "127.0.0.1"), int(port))
