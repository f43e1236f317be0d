"""Running the CLI in tests: the command in-process, what it created, its error box unwrapped."""

from __future__ import annotations

import re
from pathlib import Path

from typer.testing import CliRunner, Result

from dicom_node.cli import app


def cli(*args: str) -> Result:
    return CliRunner().invoke(app, list(args))


def tree(root: Path) -> list[str]:
    """Every path under ``root`` (relative), so "nothing was created" is one comparison."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def flat(text: str) -> str:
    """Typer's error box, unwrapped: the box drawing and line breaks removed."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())
