"""``dicom-node user add | list | passwd | disable``: accounts for the web pages."""

from __future__ import annotations

import getpass
import sys
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
