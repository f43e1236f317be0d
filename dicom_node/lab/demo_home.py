"""Whose home is it: the demo reuses only homes it made, and never destroys a node's state.

The demo marks a home it makes with :data:`MARKER`. A marked home is the demo's: a new
run clears what the last run left (its ``var/``, its local PACS) and writes its config and
policy again. An unmarked home that holds any of the things the demo would write or clear
(:data:`DEMO_WRITES`: a node's ``var/`` with its index and audit log, ``dicom-node.toml``,
``policy.yaml``, ...) belongs to someone else: the demo refuses it, and with ``fresh`` moves
those things, audit log included, into ``<home>/before-demo-<UTC stamp>/`` (a rename on the
same filesystem; nothing is deleted) before it claims the home.
"""

from __future__ import annotations

import datetime as dt
import shutil
from dataclasses import dataclass
from pathlib import Path

from dicom_node.serve import running_serve

#: The file that says "the demo made this home"; its absence protects everything else.
MARKER = ".dicom-node-demo"

#: What a demo run writes at the top of its home (and, for the first three, clears first).
DEMO_CLEARS = ("var", "orthanc-demo_pacs", "minipacs")
DEMO_WRITES = (*DEMO_CLEARS, "scanner-out", "dicom-node.toml", "policy.yaml", "serve.out", "ready")

#: Inside a node's var/, what is worth naming when the demo refuses.
_NODE_STATE = ("node.db", "audit.db", "data/studies")


class HomeNotTheDemos(Exception):
    """The home holds state the demo did not make (one line: what, and what to do)."""


@dataclass(frozen=True)
class DemoHome:
    """A home the demo may use; ``moved_aside`` is where ``fresh`` put ``moved`` (names)."""

    path: Path
    moved_aside: Path | None = None
    moved: tuple[str, ...] = ()


def _found(home: Path) -> list[str]:
    """What of :data:`DEMO_WRITES` is in ``home``, naming a node's databases and studies."""
    found: list[str] = []
    for name in DEMO_WRITES:
        if not (home / name).exists():
            continue
        inside = [f"var/{s}" for s in _NODE_STATE if name == "var" and (home / name / s).exists()]
        found.extend(inside or [name])
    return found


def _running_node(home: Path) -> int | None:
    """The pid of a live ``dicom-node serve`` on ``home`` (the holder of its pid-file lock;
    0 when one holds it but its pid cannot be read), or None."""
    return running_serve(home / "var" / "run" / "serve.pid")


def claim_home(home: Path, *, fresh: bool = False, now: dt.datetime | None = None) -> DemoHome:
    """Make ``home`` ready for a demo run, or refuse it.

    Parameters
    ----------
    home
        The demo's ``--home``.
    fresh
        Take a home that holds someone else's node: move what the demo would touch into
        ``<home>/before-demo-<UTC stamp>/`` first (never deleted).
    now
        The time the stamp is made of (default: now, UTC).

    Raises
    ------
    HomeNotTheDemos
        ``home`` is not a directory, a node is running on it, or it holds state the demo did
        not make and ``fresh`` is not set. Nothing under ``home`` has changed.
    """
    home = home.resolve()
    if home.exists() and not home.is_dir():
        raise HomeNotTheDemos(f"--home {home} is a file, not a directory: choose a directory for the demo")
    pid = _running_node(home)
    if pid is not None:
        raise HomeNotTheDemos(
            f"a dicom-node serve (pid {pid}) is using {home}; stop it first or use a different --home"
        )
    if (home / MARKER).is_file():
        for leftover in DEMO_CLEARS:  # the last demo run's, and only the demo's
            if (home / leftover).exists():
                shutil.rmtree(home / leftover)
        return DemoHome(home)
    found = _found(home)
    moved_aside: Path | None = None
    moved: list[str] = []
    if found and not fresh:
        raise HomeNotTheDemos(
            f"{home} holds a node the demo did not make ({', '.join(found)}): use a new or empty "
            f"--home, or pass --fresh to move it aside into {home}/before-demo-<UTC time>/ first "
            "(nothing is deleted)"
        )
    if found:
        stamp = (now or dt.datetime.now(dt.UTC)).strftime("%Y%m%dT%H%M%SZ")
        moved_aside = home / f"before-demo-{stamp}"
        for n in range(2, 100):  # two runs in one second: never merge into an earlier one
            if not moved_aside.exists():
                break
            moved_aside = home / f"before-demo-{stamp}-{n}"
        moved_aside.mkdir()
        for name in DEMO_WRITES:
            if (home / name).exists():
                (home / name).rename(moved_aside / name)
                moved.append(name)
    home.mkdir(parents=True, exist_ok=True)
    (home / MARKER).write_text(
        "Made by `dicom-node demo`: the next demo run clears its var/ (simulated data only).\n"
        "Delete this file to keep the next demo run from touching this home.\n"
    )
    return DemoHome(home, moved_aside, tuple(moved))
