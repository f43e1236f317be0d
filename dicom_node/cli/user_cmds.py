"""``dicom-node user add | list | passwd | disable``: accounts for the web pages."""

from __future__ import annotations

import getpass
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from audit import AuditEvent
from dicom_node.cli.common import (
    ConfigOpt,
    HomeOpt,
    JsonOpt,
    app,
    console,
    fail,
    open_existing,
    open_runtime,
    os_user,
    print_json,
)
from dicom_node.db.schema import MAX_ROW_ID
from dicom_node.web.users import Role, UserError, UserStore

user_app = typer.Typer(help="Accounts for the web pages (roles: auditor, operator).", no_args_is_help=True)
app.add_typer(user_app, name="user")

StdinOpt = Annotated[bool, typer.Option("--password-stdin", help="Read the password from standard input.")]


def _password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\n")
    if not sys.stdin.isatty():
        raise fail("no terminal to ask for the password: pass --password-stdin and pipe it in")
    first = getpass.getpass("password: ")
    if first != getpass.getpass("again: "):
        raise fail("the two passwords differ")
    return first


@user_app.command("add")
def add(
    username: Annotated[str, typer.Argument(help="Login name.")],
    role: Annotated[Role, typer.Option(help="What the account may do on the web pages.")],
    password_stdin: StdinOpt = False,
    config: ConfigOpt = None,
    home: HomeOpt = Path("."),
) -> None:
    """Create an account."""
    password = _password(password_stdin)
    runtime = open_runtime(config, home)
    try:
        user = UserStore(runtime.db).add(username, role.value, password)
    except UserError as exc:
        raise fail(str(exc)) from None
    runtime.audit.record(
        AuditEvent.USER_CHANGED, actor=os_user(), action="added", user=username, role=user.role.value
    )
    runtime.close()
    console.print(f"added {user.username} ({user.role.value})")


@user_app.command("passwd")
def passwd(
    username: Annotated[str, typer.Argument(help="Login name.")],
    password_stdin: StdinOpt = False,
    config: ConfigOpt = None,
    home: HomeOpt = Path("."),
) -> None:
    """Set a new password."""
    password = _password(password_stdin)
    runtime = open_existing(config, home)
    try:
        UserStore(runtime.db).set_password(username, password)
    except UserError as exc:
        raise fail(str(exc)) from None
    runtime.audit.record(AuditEvent.USER_CHANGED, actor=os_user(), action="password changed", user=username)
    runtime.close()
    console.print(f"password of {username} changed")


@user_app.command("disable")
def disable(
    username: Annotated[str, typer.Argument(help="Login name.")],
    config: ConfigOpt = None,
    home: HomeOpt = Path("."),
) -> None:
    """Disable an account (its sessions end now; the audit log keeps its name)."""
    runtime = open_existing(config, home)
    try:
        UserStore(runtime.db).disable(username)
    except UserError as exc:
        raise fail(str(exc)) from None
    runtime.audit.record(AuditEvent.USER_CHANGED, actor=os_user(), action="disabled", user=username)
    runtime.close()
    console.print(f"disabled {username}")


@user_app.command("list")
def list_users(config: ConfigOpt = None, home: HomeOpt = Path("."), json_out: JsonOpt = False) -> None:
    """Accounts and their roles."""
    runtime = open_existing(config, home)
    users = UserStore(runtime.db).list()
    runtime.close()
    if json_out:
        print_json([{"username": u.username, "role": u.role.value, "disabled": u.disabled} for u in users])
        return
    table = Table(title=f"{len(users)} user(s)", title_justify="left")
    for col in ("user", "role", "disabled"):
        table.add_column(col)
    for u in users:
        table.add_row(u.username, u.role.value, "yes" if u.disabled else "")
    console.print(table)


token_app = typer.Typer(
    help="API tokens for scripts and other systems: each acts with its user's role.", no_args_is_help=True
)
user_app.add_typer(token_app, name="token")


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts)) if ts else ""


@token_app.command("create")
def token_create(
    username: Annotated[str, typer.Argument(help="The user the token acts for (with their role).")],
    name: Annotated[str, typer.Option("--name", help="What it is for, e.g. 'ris-bridge' (audited).")],
    days: Annotated[
        float | None, typer.Option(help="Valid this many days (default: until revoked).", min=0.001, max=3650)
    ] = None,
    config: ConfigOpt = None,
    home: HomeOpt = Path("."),
) -> None:
    """Make a token and print it once (it is kept only as a hash: copy it now)."""
    runtime = open_existing(config, home)
    try:
        record, token = UserStore(runtime.db).create_token(username, name, days)
    except UserError as exc:
        raise fail(str(exc)) from None
    runtime.audit.record(
        AuditEvent.USER_CHANGED,
        actor=os_user(),
        action="api token created",
        user=username,
        token_id=record.id,
        token_name=name,
        expires_at=record.expires_at,
    )
    runtime.close()
    console.print(
        f"API token {record.id} for {username} ({name})"
        + (f", valid until {_when(record.expires_at)}" if record.expires_at else ", valid until revoked")
        + ". It is shown only now; send it as 'Authorization: Bearer <token>':",
        highlight=False,
    )
    print(token)


@token_app.command("list")
def token_list(
    username: Annotated[str | None, typer.Option("--user", help="Only this user's tokens.")] = None,
    config: ConfigOpt = None,
    home: HomeOpt = Path("."),
    json_out: JsonOpt = False,
) -> None:
    """Tokens (never their value): owner, name, state, when made and last used."""
    runtime = open_existing(config, home)
    tokens = UserStore(runtime.db).tokens(username)
    runtime.close()
    if json_out:
        print_json(
            [
                {
                    "id": k.id,
                    "user": k.username,
                    "name": k.name,
                    "state": k.state(),
                    "created_at": k.created_at,
                    "expires_at": k.expires_at,
                    "revoked_at": k.revoked_at,
                    "last_used_at": k.last_used_at,
                }
                for k in tokens
            ]
        )
        return
    table = Table(title=f"{len(tokens)} API token(s)", title_justify="left")
    for col in ("id", "user", "name", "state", "created", "expires", "last used"):
        table.add_column(col)
    for k in tokens:
        table.add_row(
            str(k.id),
            k.username,
            k.name,
            k.state(),
            _when(k.created_at),
            _when(k.expires_at),
            _when(k.last_used_at),
        )
    console.print(table)


@token_app.command("revoke")
def token_revoke(
    token_id: Annotated[int, typer.Argument(help="The token id (`user token list`).", min=1, max=MAX_ROW_ID)],
    config: ConfigOpt = None,
    home: HomeOpt = Path("."),
) -> None:
    """Revoke a token: refused from its next request on."""
    runtime = open_existing(config, home)
    try:
        record = UserStore(runtime.db).revoke_token(token_id)
    except UserError as exc:
        raise fail(str(exc)) from None
    runtime.audit.record(
        AuditEvent.USER_CHANGED,
        actor=os_user(),
        action="api token revoked",
        user=record.username,
        token_id=record.id,
        token_name=record.name,
    )
    runtime.close()
    console.print(f"revoked API token {record.id} ({record.username}, {record.name})", highlight=False)
