"""``[logging] format = "json"`` and ``destination`` (issue 21): one JSON object a line,
patient data still withheld, and one copy of each record under systemd."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import pytest

from dicom_node.config import NodeConfig
from dicom_node.paths import NodePaths
from dicom_node.runtime import log_destinations, setup_logging, under_journald


@pytest.fixture
def clean_root() -> object:
    root = logging.getLogger()
    before, level = list(root.handlers), root.level
    yield root
    for handler in list(root.handlers):
        if handler not in before:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)


def test_json_lines_carry_the_event_and_withhold_library_text(tmp_path: Path, clean_root: object) -> None:
    config = NodeConfig.model_validate({"logging": {"format": "json", "destination": "file"}})
    paths = NodePaths.for_home(tmp_path, config)
    paths.log_file.parent.mkdir(parents=True, exist_ok=True)
    setup_logging(paths, config)
    log = logging.getLogger("dicom_node.jobs.runner")
    log.info("job %d: %s", 7, "queued\nforged line")
    # a record from a library's code path: its text may quote a patient's name
    library = logging.LogRecord(
        "highdicom.base",
        logging.WARNING,
        "/x/site-packages/highdicom/base.py",
        199,
        "name %s",
        ("DOE^JANE",),
        None,
    )
    logging.getLogger("highdicom.base").handle(library)
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("job %d crashed", 8)
    for handler in logging.getLogger().handlers:
        handler.flush()
    lines = paths.log_file.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line is one object
    first = next(r for r in records if r["event"] == "job %d: %s")
    assert first["message"] == "job 7: queued\\x0aforged line" and first["level"] == "INFO"
    assert first["logger"] == "dicom_node.jobs.runner" and first["pid"] == os.getpid()
    assert first["time"].endswith("+00:00")
    withheld = next(r for r in records if r["logger"] == "highdicom.base")
    assert "DOE^JANE" not in json.dumps(withheld) and "withheld" in withheld["message"]
    crashed = next(r for r in records if r["event"] == "job %d crashed")
    assert "ValueError" in crashed["message"]


def test_destinations(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    assert log_destinations("auto") == (True, True)
    assert log_destinations("file") == (True, False)
    assert log_destinations("stderr") == (False, True)
    assert log_destinations("both") == (True, True)
    assert log_destinations("stderr", stderr_wanted=False) == (True, False)
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        pytest.skip("no stderr file descriptor here")
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    assert under_journald()
    assert log_destinations("auto") == (False, True)  # journald keeps it, once
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino + 1}")  # inherited, not ours
    assert not under_journald() and log_destinations("auto") == (True, True)
