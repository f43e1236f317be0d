"""A throwaway PostgreSQL server for the tests: Debian's ``postgresql`` binaries, one cluster
per test session in a temporary directory, reachable only through a Unix socket there (no
TCP port to collide with, nothing on the network).

``pytest --database=postgresql`` (or ``DICOM_NODE_TEST_DATABASE=postgresql``; ``make
test-postgres``) runs the whole suite with every node's index and audit log in a fresh
database of this server: the node reads ``DICOM_NODE_DATABASE_URL`` and
``DICOM_NODE_AUDIT_DATABASE_URL`` from the environment, which its child processes inherit.
The PostgreSQL-specific tests start one whatever the option says.
"""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg
from sqlalchemy.engine import make_url

SUPERUSER = "postgres"


def find_bin_dir() -> Path | None:
    """The newest Debian PostgreSQL ``bin`` directory (``/usr/lib/postgresql/<major>/bin``)."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parent.parent.name)
    )
    return Path(found[-1]).parent if found else None


class PostgresServer:
    """``initdb`` + ``pg_ctl start`` in a temporary directory; ``stop()`` removes it."""

    def __init__(self, bin_dir: Path, port: int = 5432) -> None:
        self.bin = bin_dir
        self.port = port
        self.root = Path(tempfile.mkdtemp(prefix="dicom-node-pg-"))
        self.data = self.root / "data"
        self.socket_dir = self.root
        self._names = itertools.count(1)
        # initdb refuses to run as root: the cluster belongs to the postgres system user
        self._as = ["runuser", "-u", SUPERUSER, "--"] if os.geteuid() == 0 else []

    def _run(self, *args: str) -> None:
        subprocess.run([*self._as, *args], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def start(self) -> PostgresServer:
        if self._as:
            shutil.chown(self.root, SUPERUSER)
        initdb = str(self.bin / "initdb")
        self._run(initdb, "-D", str(self.data), "-U", SUPERUSER, "--auth=trust", "-E", "UTF8")
        return self.resume()

    def pause(self) -> None:
        """Stop the server, keeping its data (``resume`` starts it again): the database gone."""
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def resume(self) -> PostgresServer:
        # a test server: durability is PostgreSQL's business and is not what the tests
        # measure, so it skips fsync; enough connections for several nodes at once
        options = (
            f"-c listen_addresses='' -c unix_socket_directories='{self.socket_dir}' -p {self.port}"
            " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
            " -c max_connections=500 -c shared_buffers=64MB"
        )
        self._run(
            str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", options,
            "-l", str(self.root / "server.log"), "-w", "-t", "60", "start",
        )  # fmt: skip
        return self

    def stop(self) -> None:
        if self.data.exists():
            subprocess.run(
                [*self._as, str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop"],
                check=False,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str, user: str = SUPERUSER) -> str:
        """The SQLAlchemy URL of ``database`` as ``user`` (over the Unix socket)."""
        return f"postgresql+psycopg://{user}@/{database}?host={self.socket_dir}&port={self.port}"

    def connect(self, database: str = "postgres", user: str = SUPERUSER) -> psycopg.Connection:
        return psycopg.connect(
            host=str(self.socket_dir), port=self.port, dbname=database, user=user, autocommit=True
        )

    def create_database(self, prefix: str = "t", template: str | None = None) -> str:
        """A new database (a copy of ``template``, else an empty one); its name."""
        name = f"{prefix}{next(self._names)}_{int(time.time() * 1000) % 100000}"
        with self.connect() as conn:
            conn.execute(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
        return name

    def drop_database(self, name: str) -> None:
        with self.connect() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def connect_url(url: str) -> psycopg.Connection:
    """An autocommit psycopg connection to a ``postgresql+psycopg://`` SQLAlchemy URL."""
    parsed = make_url(url)
    return psycopg.connect(
        dbname=parsed.database,
        user=parsed.username,
        password=parsed.password,
        host=str(parsed.query.get("host") or parsed.host or ""),
        port=str(parsed.query.get("port") or parsed.port or 5432),
        autocommit=True,
    )


def rows(url: str, statement: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    """Rows of a query written for SQLite (``?`` placeholders), run on PostgreSQL; none
    while the table does not exist yet."""
    try:
        with connect_url(url) as conn:
            cur = conn.execute(statement.replace("?", "%s"), params or None)
            return list(cur.fetchall()) if cur.description else []
    except psycopg.errors.UndefinedTable:
        return []
