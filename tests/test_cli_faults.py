"""Faults a user could trigger on the command line, each now one line (or a skipped file)
instead of a traceback or a write outside --out: `run` refuses input whose UIDs would name
paths (and says why it skipped each file), gives each pipeline and model its own output
UIDs, checks --out first; `echo` / `send` / `archives` name a bad value or an unknown host;
`simulate`, `train` and `evaluate` refuse what they cannot use."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import UID
from typer.testing import Result

from dicom_node.runtime import Runtime
from tests.cli_helpers import cli, flat, tree

pytestmark = pytest.mark.filterwarnings("ignore:.*VR UI:UserWarning")

CT_SMALL = Path(str(get_testdata_file("CT_small.dcm")))
INVALID_UID = "with an invalid UID (the receiver refuses these too)"
NO_META = "without SOP Class, SOP Instance or Transfer Syntax UID in the file meta"
#: Why no one can make a folder under /proc (root: it does not exist; others: not allowed).
CANNOT_MAKE = ("No such file or directory", "Permission denied")


def one_line(result: Result, code: int = 1) -> str:
    """The single error line of a command that failed as a user's error (no traceback)."""
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == code, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def crafted(path: Path, **attrs: str) -> Path:
    """CT_small with some attributes replaced, saved as ``path``."""
    ds = dcmread(CT_SMALL)
    for name, value in attrs.items():
        setattr(ds, name, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path)
    return path


# --- 1. run: a UID that would name a path outside --out is refused ----------------------------


@pytest.mark.parametrize(
    "attrs",
    [
        pytest.param({"SeriesInstanceUID": "../../escaped_series"}, id="relative-series"),
        pytest.param({"SeriesInstanceUID": "ESCAPE_ABS"}, id="absolute-series"),
        pytest.param({"StudyInstanceUID": "../../escaped_study"}, id="relative-study-of-two"),
        pytest.param({"SOPInstanceUID": "../../../escaped"}, id="relative-sop"),
    ],
)
def test_run_skips_invalid_uids_and_writes_only_under_out(tmp_path: Path, attrs: dict[str, str]) -> None:
    attrs = {k: str(tmp_path / "abs_escape") if v == "ESCAPE_ABS" else v for k, v in attrs.items()}
    inputs = tmp_path / "in"
    crafted(inputs / "bad.dcm", **attrs)
    if "SOPInstanceUID" in attrs:  # the file meta names the instance the same
        ds = dcmread(inputs / "bad.dcm")
        ds.file_meta.MediaStorageSOPInstanceUID = UID(attrs["SOPInstanceUID"])
        ds.save_as(inputs / "bad.dcm")
    crafted(inputs / "other-study.dcm", StudyInstanceUID="1.2.3.4.5")  # two studies: out/<study>/
    shutil.copyfile(CT_SMALL, inputs / "good.dcm")
    (inputs / "notes.txt").write_text("not DICOM")
    out = tmp_path / "o" / "a" / "b"
    home = tmp_path / "home"
    before = tree(tmp_path)

    result = cli("run", "forward", str(inputs), "--out", str(out), "--home", str(home))
    assert result.exit_code == 0, result.output
    assert f"skipped 2 file(s): 1 not DICOM Part 10, 1 {INVALID_UID}" in result.stdout.splitlines()
    written = set(tree(tmp_path)) - set(before)
    outside = [p for p in written if not p.startswith(("o", "home"))]
    assert outside == [], "written outside --out"
    assert all(p == "o" or p == "o/a" or p.startswith("o/a/b") or p.startswith("home") for p in written)
    copies = [p for p in out.rglob("*.dcm")]
    assert len(copies) == 2, copies  # good.dcm and other-study.dcm, each under its study
    for copy in copies:
        assert out.resolve() in copy.resolve().parents

    as_json = cli("run", "forward", str(inputs), "--out", str(tmp_path / "o2"), "--home", str(home), "--json")
    assert as_json.exit_code == 0, as_json.output
    parsed = json.loads(as_json.stdout)
    assert parsed["skipped_files"] == 2
    assert parsed["skipped_by_reason"] == {"not_part10": 1, "incomplete_file_meta": 0, "invalid_uid": 1}


def test_run_on_only_invalid_uids_says_why_and_creates_nothing(tmp_path: Path) -> None:
    bad = crafted(tmp_path / "in" / "rel.dcm", SeriesInstanceUID="../../escaped_series")
    before = tree(tmp_path)
    result = cli("run", "forward", str(bad), "--out", str(tmp_path / "o"), "--home", str(tmp_path / "h"))
    assert one_line(result) == (
        f"error: no DICOM Part 10 files found in {bad} (skipped 1 file(s): 1 {INVALID_UID})"
    )
    assert tree(tmp_path) == before


# --- 2. run: another pipeline or model never shares output UIDs ------------------------------


def _sop_uids(directory: Path) -> set[str]:
    return {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in directory.rglob("*.dcm")}


def test_run_output_uids_name_the_pipeline_and_model(tmp_path: Path) -> None:
    home = str(tmp_path / "home")

    def run(pipeline: str, out: str) -> set[str]:
        result = cli("run", pipeline, str(CT_SMALL), "--out", str(tmp_path / out), "--home", home, "--json")
        assert result.exit_code == 0, result.output
        uids = _sop_uids(tmp_path / out)
        assert uids
        return uids

    classical = run("denoise-classical", "c1")
    assert run("denoise-classical", "c2") == classical, "the same run twice gives the same UIDs"
    restored = run("restoration", "r1")
    assert not classical & restored, "two pipelines wrote objects under the same SOP Instance UIDs"


# --- 3. run: a Part 10 file without the file meta's UIDs is skipped, with the reason ----------


@pytest.mark.parametrize("element", ["MediaStorageSOPInstanceUID", "MediaStorageSOPClassUID"])
def test_run_skips_a_file_without_meta_uids(tmp_path: Path, element: str) -> None:
    ds = dcmread(CT_SMALL)
    delattr(ds.file_meta, element)
    nometa = tmp_path / "nometa.dcm"
    ds.save_as(nometa, enforce_file_format=False)
    out, home = tmp_path / "o", tmp_path / "h"

    result = cli("run", "forward", str(nometa), str(CT_SMALL), "--out", str(out), "--home", str(home))
    assert result.exit_code == 0, result.output
    assert f"skipped 1 file(s): 1 {NO_META}" in result.stdout.splitlines()
    assert len(list(out.rglob("*.dcm"))) == 1

    alone = cli("run", "forward", str(nometa), "--out", str(tmp_path / "o2"), "--home", str(home))
    assert (
        one_line(alone) == f"error: no DICOM Part 10 files found in {nometa} (skipped 1 file(s): 1 {NO_META})"
    )
    assert not (tmp_path / "o2").exists()


# --- 4. --out that is a file: checked first, nothing created ----------------------------------


@pytest.mark.parametrize("below", [False, True], ids=["file", "under-a-file"])
def test_run_out_that_is_a_file(tmp_path: Path, below: bool) -> None:
    afile = tmp_path / "afile"
    afile.write_text("")
    out = afile / "sub" if below else afile
    before = tree(tmp_path)
    result = cli("run", "forward", str(CT_SMALL), "--out", str(out), "--home", str(tmp_path / "home"))
    assert one_line(result) == f"error: --out {out}: {afile} exists and is not a directory"
    assert tree(tmp_path) == before, "the node home was created"


@pytest.mark.parametrize("kind", ["ct", "sct", "ldct", "prognosis"])
def test_simulate_out_that_is_a_file(tmp_path: Path, kind: str) -> None:
    afile = tmp_path / "afile"
    afile.write_text("")
    before = tree(tmp_path)
    result = cli("simulate", kind, "--out", str(afile))
    assert one_line(result) == f"error: --out {afile}: {afile} exists and is not a directory"
    assert tree(tmp_path) == before


@pytest.mark.parametrize("kind", ["ct", "sct", "ldct", "prognosis", "synthesis"])
def test_simulate_out_that_cannot_be_created(kind: str) -> None:
    """A folder no one can make (under /proc) was a FileNotFoundError traceback."""
    out = "/proc/dicom-node-test/out"
    result = cli("simulate", kind, "--out", out)
    assert one_line(result) in {f"error: --out {out}: cannot create it ({why})" for why in CANNOT_MAKE}


@pytest.mark.parametrize(
    "args",
    [
        ["evaluate", "restoration", "--report"],
        ["evaluate", "sct", "--report"],
        ["evaluate", "prognosis", "--report"],
        ["evaluate", "synthesis", "--report"],
        ["train", "restoration", "--out"],
        ["train", "sct", "--out"],
        ["run", "forward", str(CT_SMALL), "--out"],
    ],
    ids=lambda a: "-".join(a[:2]),
)
def test_an_output_folder_that_cannot_be_made_is_refused_before_the_work(
    args: list[str], tmp_path: Path
) -> None:
    """An evaluation or a training run wrote its report or weights only at the end: a folder
    that could not be made cost the whole run and then a traceback."""
    out = "/proc/dicom-node-test/out"
    result = cli(*args, out, "--home", str(tmp_path / "home")) if args[0] == "run" else cli(*args, out)
    assert one_line(result) in {f"error: {args[-1]} {out}: cannot create it ({why})" for why in CANNOT_MAKE}


def test_simulate_on_a_disk_that_fills_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dicom_node.lab import simulate

    def full(*args: Any, **kwargs: Any) -> Any:
        raise OSError(28, "No space left on device", str(tmp_path / "out" / "0001.dcm"))

    monkeypatch.setattr(simulate, "write_ct_series", full)
    out = tmp_path / "out"
    result = cli("simulate", "ct", "--out", str(out), "--slices", "2", "--size", "32")
    assert one_line(result) == (
        f"error: writing the simulated study to {out} failed: No space left on device ({out / '0001.dcm'})"
    )


# --- 5. echo and send: a bad value or an unknown host is one line -----------------------------

AE_RULE = "is not a valid AE title (1-16 printable ASCII characters, no backslash)"


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["echo", "127.0.0.1", "70000"], "error: PORT 70000: Input should be less than or equal to 65535"),
        (["echo", "127.0.0.1", "0"], "error: PORT 0: Input should be greater than or equal to 1"),
        (["echo", "127.0.0.1", "104", "--aet", "A" * 17], f"error: --aet: '{'A' * 17}' {AE_RULE}"),
        (["echo", "127.0.0.1", "104", "--calling", "ÄÖ"], f"error: --calling: 'ÄÖ' {AE_RULE}"),
        (["echo", "127.0.0.1", "104", "--timeout", "0"], "error: --timeout 0: must be more than 0 seconds"),
        (
            ["send", "IN", "--to", "X@127.0.0.1:99999"],
            "error: --to 'X@127.0.0.1:99999': port 99999: Input should be less than or equal to 65535",
        ),
        (
            ["send", "IN", "--to", "A\\B@127.0.0.1:104"],
            f"error: --to 'A\\\\B@127.0.0.1:104': AE title: 'A\\\\B' {AE_RULE}",
        ),
        (
            ["send", "IN", "--to", "A@127.0.0.1:104", "--timeout", "0"],
            "error: --timeout 0.0: Input should be greater than 0",
        ),
        (["send", "IN", "--to", "A@127.0.0.1:104", "--calling", "ÄÖ"], f"error: --calling: 'ÄÖ' {AE_RULE}"),
    ],
    ids=[
        "port-high",
        "port-0",
        "aet-long",
        "calling-ascii",
        "echo-timeout",
        "send-port",
        "send-aet",
        "send-timeout",
        "send-calling",
    ],  # fmt: skip
)
def test_echo_and_send_name_a_bad_value(tmp_path: Path, args: list[str], line: str) -> None:
    args = [str(CT_SMALL) if a == "IN" else a for a in args]
    home = tmp_path / "home"
    result = cli(*args, "--home", str(home))
    assert one_line(result) == line
    assert not home.exists()


def _fail_lookups(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every name lookup fails as for a host that does not exist (no real DNS in tests)."""

    def unknown(*args: Any, **kwargs: Any) -> Any:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", unknown)


@pytest.fixture
def no_dns(monkeypatch: pytest.MonkeyPatch) -> None:
    _fail_lookups(monkeypatch)


NOT_FOUND = "host 'nosuch.invalid' not found (Name or service not known)"


def test_echo_an_unknown_host(no_dns: None, tmp_path: Path) -> None:
    result = cli("echo", "nosuch.invalid", "104", "--home", str(tmp_path / "h"))
    where = "ANY-SCP@nosuch.invalid:104"
    assert one_line(result) == f"error: no association with {where}: cannot connect to {where}: {NOT_FOUND}"


def test_send_an_unknown_host(no_dns: None, tmp_path: Path) -> None:
    result = cli("send", str(CT_SMALL), "--to", "PACS@nosuch.invalid:104", "--json", "--home", str(tmp_path))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 1, result.output
    [series] = json.loads(result.stdout)["series"]
    assert series["error"] == f"cannot connect to PACS@nosuch.invalid:104: {NOT_FOUND}"


def test_archives_echo_and_find_an_unknown_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "node.toml"
    config.write_text('[archives.pacs]\nae_title = "PACS"\nhost = "nosuch.invalid"\nport = 104\n')
    home = tmp_path / "home"
    Runtime.open(config, home).close()
    _fail_lookups(monkeypatch)  # after the home is made
    where = "archive pacs (PACS@nosuch.invalid:104)"
    common = ["--config", str(config), "--home", str(home)]
    echoed = cli("archives", "echo", "pacs", *common)
    assert one_line(echoed) == f"error: cannot connect to {where}: {NOT_FOUND}"
    found = cli("archives", "find", "pacs", "--patient", "P1", *common)
    assert one_line(found) == f"error: cannot connect to {where}: {NOT_FOUND}"


# --- 6. simulate --seed, train --paired-low, evaluate --model -------------------------------


@pytest.mark.parametrize("kind", ["ct", "sct", "prognosis", "ldct", "synthesis"])
def test_simulate_a_negative_seed_is_a_usage_error(tmp_path: Path, kind: str) -> None:
    result = cli("simulate", kind, "--out", str(tmp_path / "o"), "--seed", "-1")
    assert result.exit_code == 2, result.output
    assert "Invalid value for '--seed': Input should be greater than or equal to 0" in flat(result.stderr)
    assert not (tmp_path / "o").exists()


def test_train_paired_series_with_a_non_dicom_file(tmp_path: Path) -> None:
    low = tmp_path / "low"
    low.mkdir()
    shutil.copyfile(CT_SMALL, low / "a.dcm")
    (low / "readme.txt").write_text("not DICOM")
    out = tmp_path / "model"
    result = cli(
        "train", "restoration", "--out", str(out), "--paired-low", str(low), "--paired-reference", str(low)
    )
    assert one_line(result) == f"error: {low / 'readme.txt'}: not a DICOM Part 10 file"
    assert not out.exists()


def test_evaluate_restoration_with_an_invalid_card(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "card.json").write_text("{not json")
    report = tmp_path / "report"
    result = cli("evaluate", "restoration", "--report", str(report), "--model-dir", str(model))
    assert one_line(result) == (
        f"error: model card {model / 'card.json'} is not valid JSON: "
        "Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"
    )
    assert not report.exists()


def test_evaluate_sct_with_another_models_card(tmp_path: Path) -> None:
    from models.zoo import ZOO, versions

    restoration = ZOO / "ldct-restoration" / versions("ldct-restoration")[-1]
    report = tmp_path / "report"
    result = cli("evaluate", "sct", "--report", str(report), "--model", str(restoration))
    line = one_line(result)
    assert line.startswith(
        f"error: {restoration / 'card.json'} is not a card of this kind of model (it is 'ldct-restoration'): "
    )
    assert line.endswith(" (pass --model DIR to evaluate another model directory)")
    assert not report.exists()


@pytest.mark.parametrize("patient_id", ["P" * 65, "A\\B", " "])
def test_simulate_writes_only_a_patient_id_the_standard_allows(tmp_path: Path, patient_id: str) -> None:
    """The node's own receiver refuses a Patient ID over 64 characters (cut short it could
    name another patient): its simulator must not write one."""
    result = cli("simulate", "ct", "--patient-id", patient_id, "--out", str(tmp_path / "out"))
    assert result.exit_code == 2, result.output
    assert "a Patient ID has 1 to 64 characters and no backslash" in flat(result.stderr)
    assert not (tmp_path / "out").exists()
