"""Query parameters shared by the web pages and the REST API, checked the same way: a bad
one is a 400 that names it and says why."""

from __future__ import annotations

import datetime as dt

from fastapi.exceptions import RequestValidationError

#: Searchable dates (a wider year is a typo, and the far ends overflow the clock).
FIRST_YEAR, LAST_YEAR = 1900, 2999


class BadParameter(ValueError):
    """A parameter the page or the API cannot use: a 400 that names it and why."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def search_instant(name: str, value: str | None, end: bool = False) -> float | None:
    """A search date (``YYYY-MM-DD`` or ISO date-time) as a timestamp; ``end``: a bare date
    means up to the end of that day. Raises :class:`BadParameter` for anything else."""
    if not value:
        return None
    try:
        day = dt.datetime.fromisoformat(value.strip())
    except ValueError:
        raise BadParameter(f"{name}: {value[:40]!r} is not a date (write YYYY-MM-DD)") from None
    if not FIRST_YEAR <= day.year <= LAST_YEAR:
        raise BadParameter(f"{name}: year {day.year} is outside {FIRST_YEAR}-{LAST_YEAR}")
    if end and len(value.strip()) <= 10:
        day += dt.timedelta(days=1)
    return day.timestamp()


def validation_problems(exc: RequestValidationError) -> str:
    """FastAPI's validation errors (the first five) as ``parameter: problem; …``."""
    problems = []
    for error in exc.errors()[:5]:
        where = ".".join(str(part) for part in error.get("loc", ()) if part not in ("query", "path", "body"))
        problems.append(f"{where or 'request'}: {error.get('msg', 'invalid')}")
    return "; ".join(problems)
