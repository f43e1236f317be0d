"""A DICOMweb archive that answers nonsense gets one line, never a traceback; a redirect
is not followed (a query names a patient: it goes only to the configured URL)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from dicom_node.config import NodeConfig
from dicom_node.ingest.archives import ArchiveError, Archives, StudyQuery
from dicom_node.runtime import Runtime

ANSWERS: dict[str, tuple[int, dict[str, str], bytes]] = {
    "not-json": (200, {"Content-Type": "application/dicom+json"}, b"<html>oops</html>"),
    "not-a-list": (200, {"Content-Type": "application/dicom+json"}, json.dumps({"a": 1}).encode()),
    "not-dicom-json": (
        200,
        {"Content-Type": "application/dicom+json"},
        json.dumps([{"0020000D": "not an element"}, {"zz": {"vr": "UI"}}]).encode(),
    ),
    "redirect": (302, {"Location": "http://192.0.2.1/elsewhere"}, b""),
}


@pytest.fixture
def archive_answering(request: pytest.FixtureRequest) -> Iterator[str]:
    status, headers, body = ANSWERS[request.param]

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/dicom-web"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("archive_answering", list(ANSWERS), indirect=True)
def test_an_archive_answering_nonsense_is_one_line(archive_answering: str, tmp_path: Path) -> None:
    config = NodeConfig.model_validate(
        {"archives": {"web": {"method": "dicomweb", "dicomweb_url": archive_answering, "timeout_seconds": 5}}}
    )
    rt = Runtime.open(None, tmp_path)
    try:
        archive = Archives(config, tmp_path, rt.audit).get("web")
        with pytest.raises(ArchiveError) as info:
            archive.find_studies(StudyQuery(patient_id="P1"))
    finally:
        rt.close()
    message = str(info.value)
    assert "\n" not in message
    assert ("not DICOM JSON" in message) or ("redirect, which is not followed" in message), message
