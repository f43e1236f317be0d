"""What the CLI prints is the text it was given: help texts keep the config's section names
("[workers]", "[archives.NAME]"), and values from the network or the database (a calling
AE title, a Patient ID, a refusal reason) are printed as they are, brackets and all, never
read as Rich markup (where "[b]" is a style and "[/x]" an error)."""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import typer
from pydicom.uid import ExplicitVRLittleEndian
from typer.testing import CliRunner

from dicom_node.cli import app
from dicom_node.ingest.indexer import Indexer
from dicom_node.ingest.store import InstanceStore, StoreOutcome
from dicom_node.lab.simulate import write_ct_series
from dicom_node.runtime import Runtime
from models.sim.phantom import PhantomSpec
from tests.cli_helpers import flat

# A section name in a help text: "[workers]", "\[archives.NAME]" (escaped for Rich); not
# "[1<=x<=64]" or "[default: ...]", which Click and Typer write themselves
SECTION = re.compile(r"\\?\[([a-z][a-z_.A-Z]*)\]")


def _commands(command: Any, path: list[str]) -> Iterator[tuple[Any, list[str]]]:
    yield command, path
    for name, sub in getattr(command, "commands", {}).items():
        yield from _commands(sub, [*path, name])


def test_help_texts_keep_the_config_section_names() -> None:
    runner = CliRunner()
    checked = 0
    for command, path in _commands(typer.main.get_command(app), []):
        texts = [command.help or ""] + [getattr(p, "help", None) or "" for p in command.params]
        # the subcommands' first lines are listed in this command's help too
        texts += [(sub.help or "").split("\n\n")[0] for sub in getattr(command, "commands", {}).values()]
        wanted = {f"[{m.group(1)}]" for text in texts for m in SECTION.finditer(text)}
        if not wanted:
            continue
        shown = flat(runner.invoke(app, [*path, "--help"], env={"COLUMNS": "300"}).output)
        for name in wanted:
            assert name in shown, f"`dicom-node {' '.join(path)} --help` lost {name!r}: {shown}"
            checked += 1
        assert "\\[" not in shown, f"`dicom-node {' '.join(path)} --help` shows an escape"
    assert checked >= 8  # [tls], [receiver], [workers], [archives.NAME] in several commands


HOSTILE_AE = "[/x]SCAN"  # a valid AE title (16 characters at most, no backslash)
HOSTILE_PATIENT = "[b]PAT[/b] [/nope]"


@pytest.fixture
def home_with_hostile_values(tmp_path: Path) -> Path:
    """A node home holding one study from a caller whose AE title and Patient ID look like
    Rich markup, and one quarantined instance whose reason quotes such a value."""
    sim = write_ct_series(tmp_path / "ct", PhantomSpec(rows=32, columns=32, slices=1, seed=5))
    ds = pydicom.dcmread(sim.files[0])
    ds.PatientID = HOSTILE_PATIENT
    ds.SeriesDescription = "[red]T1[/red]"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    from dicom_node.ingest.part10 import split_part10

    _, data = split_part10(buffer.getvalue())
    home = tmp_path / "node"
    rt = Runtime.open(None, home)
    store = InstanceStore(rt.paths, rt.db, Indexer(rt.db, rt.audit, gather_seconds=0.02))
    try:
        result = store.put(
            data,
            ExplicitVRLittleEndian,
            claimed_sop_uid=str(ds.SOPInstanceUID),
            calling_ae=HOSTILE_AE,
            peer_host="192.0.2.10",
        )
        assert result.outcome == StoreOutcome.STORED
        # not a DICOM data set at all: quarantined, from the same caller
        refused = store.put(
            b"\x00" * 64,
            ExplicitVRLittleEndian,
            claimed_sop_uid="1.2.3.[/x]",
            calling_ae=HOSTILE_AE,
            peer_host="192.0.2.10",
        )
        assert refused.outcome != StoreOutcome.STORED
    finally:
        store.close()
        rt.close()
    return home


@pytest.mark.parametrize("command", ["studies", "quarantine"])
def test_values_from_the_network_are_printed_as_they_are(
    home_with_hostile_values: Path, command: str
) -> None:
    result = CliRunner().invoke(app, [command, "--home", str(home_with_hostile_values)])
    assert result.exit_code == 0, result.output
    shown = flat(result.stdout)
    assert HOSTILE_AE in shown, shown
    if command == "studies":
        assert HOSTILE_PATIENT in shown, shown
    else:
        assert "1.2.3.[/x]" in shown, shown
