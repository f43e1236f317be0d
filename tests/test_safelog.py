"""What libraries say reaches the log as "where", never as "what": warnings, log records and
exception messages that may quote a data set's values."""

from __future__ import annotations

import io
import logging
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from highdicom.valuerep import check_person_name

from dicom_node.safelog import PhiSafeFilter, describe_exception, origin_of, route_warnings_and_crashes

NAME = "ZELDAPHI QUIXOTEPHI"
SITE = Path(pydicom.__file__).parent  # a real library file, wherever the venv is


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """The root logger with one handler set up as ``setup_logging`` does; hooks restored."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(PhiSafeFilter())
    root = logging.getLogger()
    saved = (warnings.showwarning, sys.excepthook, threading.excepthook, root.level)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    route_warnings_and_crashes()
    try:
        yield out
    finally:
        root.removeHandler(handler)
        warnings.showwarning, sys.excepthook, threading.excepthook = saved[:3]
        root.setLevel(saved[3])


def test_origin_of_files() -> None:
    assert origin_of(str(Path(__file__).parents[1] / "dicom_node" / "safelog.py")) == "node"
    assert origin_of(logging.__file__) == "other"
    assert origin_of(str(SITE / "config.py")) == "library"


def test_highdicom_person_name_warning_is_logged_without_the_name(captured: io.StringIO) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        check_person_name(NAME)  # highdicom's warning quotes the name
    text = captured.getvalue()
    assert "WARNING py.warnings: UserWarning from highdicom/valuerep.py" in text
    assert "ZELDAPHI" not in text and "QUIXOTEPHI" not in text


def test_library_log_text_is_withheld_and_node_text_kept(captured: io.StringIO) -> None:
    library = logging.LogRecord(
        "pydicom",
        logging.WARNING,
        str(SITE / "valuerep.py"),
        42,
        "Invalid value for VR PN: %r",
        (NAME,),
        None,
    )
    logging.getLogger("pydicom").handle(library)
    logging.getLogger("dicom_node.ingest.receiver").info("study %s stored", "1.2.3")
    lines = captured.getvalue().splitlines()
    assert lines == [
        "WARNING pydicom: warning from pydicom at pydicom/valuerep.py:42 "
        "(library text withheld: it may quote patient data)",
        "INFO dicom_node.ingest.receiver: study 1.2.3 stored",
    ]


def test_exception_messages_from_libraries_are_withheld(captured: io.StringIO) -> None:
    try:
        pydicom.valuerep.IS(NAME)  # pydicom's message quotes the value
    except ValueError as exc:
        from_library = exc
    assert describe_exception(from_library) == "ValueError (message withheld: raised in pydicom)"
    assert describe_exception(OSError("connection refused")) == "OSError: connection refused"

    log = logging.getLogger("dicom_node.worker")
    log.warning("delivery failed: %s", from_library)
    try:
        raise RuntimeError("job 7 could not be encoded") from from_library
    except RuntimeError:
        log.exception("job 7 crashed")
    text = captured.getvalue()
    assert "delivery failed: ValueError (message withheld: raised in pydicom)" in text
    assert "RuntimeError: job 7 could not be encoded" in text, "the node's own message stays"
    assert "pydicom/valuerep.py" in text, "library frames stay: where to look"
    assert "ZELDAPHI" not in text


def test_uncaught_exception_in_a_thread_goes_through_the_log(captured: io.StringIO) -> None:
    def crash() -> None:
        pydicom.valuerep.IS(NAME)

    worker = threading.Thread(target=crash, name="crasher")
    worker.start()
    worker.join()
    text = captured.getvalue()
    assert "CRITICAL dicom_node.safelog: uncaught ValueError in thread crasher" in text
    assert "ZELDAPHI" not in text


def test_cli_commands_print_library_warnings_without_their_text(tmp_path: Path) -> None:
    """`dicom-node run` builds objects in-process: highdicom's warning must not quote the name."""
    import subprocess

    script = (
        "import sys, warnings\n"
        "from dicom_node.safelog import protect_stderr\n"
        "protect_stderr()\n"
        "from highdicom.valuerep import check_person_name\n"
        f"check_person_name({NAME!r})\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "UserWarning from highdicom" in result.stderr
    assert "ZELDAPHI" not in result.stderr + result.stdout


def test_every_record_is_one_line_with_control_characters_escaped(captured: io.StringIO) -> None:
    log = logging.getLogger("dicom_node.ingest.receiver")
    log.warning("association from %s@%s rejected", "A\r\nFORGED RECORD", "10.0.0.9\x1b[2J\x85\u2028")
    try:
        raise ValueError("peer said:\nFORGED TOO")
    except ValueError:
        log.exception("report from %s refused", "B\tC")
    lines = captured.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert lines[0] == (
        "WARNING dicom_node.ingest.receiver: association from A\\x0d\\x0aFORGED RECORD"
        "@10.0.0.9\\x1b[2J\\x85\\u2028 rejected"
    )
    assert lines[1].startswith("ERROR dicom_node.ingest.receiver: report from B\\x09C refused\\x0a")
    assert "Traceback (most recent call last):\\x0a" in lines[1], "the traceback folded in"
    assert lines[1].endswith("ValueError: peer said:\\x0aFORGED TOO")
