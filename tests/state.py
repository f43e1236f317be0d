"""Reading a node home's databases directly, from tests and benchmarks (cheap polling).

SQL is written in the SQLite dialect with ``?`` placeholders; on PostgreSQL (the test
suite's ``--database=postgresql`` mode) the placeholders become ``%s``.
"""

from __future__ import annotations

import os
import sqlite3
import tomllib
from pathlib import Path
from typing import Any

from dicom_node.lab import localpeers
from dicom_node.paths import AUDIT_DATABASE_URL_ENV, DATABASE_URL_ENV
from tests import pg


def state_urls(home: Path) -> tuple[str, str] | None:
    """The server databases (index, audit) a node home uses; None for SQLite files in it:
    what the home's config (``dicom-node.toml``) names; else SQLite if the home has its
    files; else the pair the test suite's PostgreSQL mode gives the home, or the one this
    process's environment names."""
    config = home / "dicom-node.toml"
    storage = tomllib.loads(config.read_text()).get("storage", {}) if config.exists() else {}
    index_url, audit_url = storage.get("database_url"), storage.get("audit_database_url")
    if not index_url and (home / "var" / "node.db").exists():
        return None
    if not index_url and localpeers.DATABASES_FOR_HOME is not None:
        return localpeers.DATABASES_FOR_HOME(home)
    index_url = index_url or os.environ.get(DATABASE_URL_ENV)
    audit_url = audit_url or os.environ.get(AUDIT_DATABASE_URL_ENV)
    if index_url and audit_url and not str(index_url).startswith("sqlite"):
        return str(index_url), str(audit_url)
    return None


def state_rows(
    home: Path, sql: str, params: tuple[Any, ...] = (), *, audit: bool = False
) -> list[tuple[Any, ...]]:
    """Rows of ``sql`` (SQLite dialect, ``?`` placeholders) read directly from a node home's
    index or (``audit``) audit log, on SQLite or PostgreSQL; none while the table or the
    database file does not exist yet (cheap polling from tests)."""
    urls = state_urls(home)
    if urls is not None:
        return pg.rows(urls[1] if audit else urls[0], sql, params)
    path = home / "var" / ("audit.db" if audit else "node.db")
    if not path.exists():
        return []
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        return con.execute(sql, params).fetchall()
    except sqlite3.OperationalError:
        return []
    finally:
        con.close()
