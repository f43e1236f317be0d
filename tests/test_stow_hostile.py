"""STOW-RS against hostile or unlucky senders, in a real uvicorn on loopback (the fixture
and helpers of tests/test_stow.py): a boundary the parser cannot take, thousands of small
parts under a service's file limit, a disk that fills while the body is spooled, a sender
that disconnects mid-body, a forged X-Forwarded-For; and a large part held once, not twice.

Each is refused whole with its reason and audited like any other refusal (never a 500 or
a traceback), nothing of the body is kept and no spool file is left behind.
"""

from __future__ import annotations

import errno
import os
import resource
import socket
import time
import tracemalloc
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from dicom_node.ingest.instance import StoreStatus
from dicom_node.web import stow
from tests.state import state_rows
from tests.test_stow import BOUNDARY, Site, multipart, site  # noqa: F401 (site: the fixture)


def _refusal(node: Site, seen: int, timeout: float = 0.0) -> dict[str, Any]:
    """The one stow-received record after the first ``seen`` (polled up to ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        records = node.audit("stow-received")[seen:]
        if records or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    assert len(records) == 1, records
    return records[0]


def _nothing_kept(node: Site, before: list[tuple[str, str]], held: int) -> None:
    assert node.instances() == before and node.quarantined() == held
    assert not list(node.rt.paths.tmp.glob("*")), "no spool file left behind"


def test_a_boundary_longer_than_the_parser_takes_is_refused_and_audited(site: Site) -> None:  # noqa: F811
    boundary = "b" * 300
    body = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    body += site.files[0].read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    before, held, seen = site.instances(), site.quarantined(), len(site.audit("stow-received"))
    answer = site.post(
        body, **{"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'}
    )
    assert answer.status_code == 400, answer.text
    assert "boundary" in answer.json()["detail"] and "256" in answer.json()["detail"]
    refused = _refusal(site, seen)
    assert refused["result"] == "refused" and refused["http_status"] == 400
    assert "boundary" in refused["reason"]
    _nothing_kept(site, before, held)


def test_many_parts_past_the_memory_budget_cost_one_descriptor(
    site: Site,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under a file limit a few dozen descriptors above what is open, 150 parts past the
    memory budget are stored (one spool file, not one per part)."""
    monkeypatch.setattr("dicom_node.web.stow._MEMORY_BUDGET", 0)
    parts = [site.files[0].read_bytes()] * 150
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # New descriptors take the lowest free numbers: at most 40 more than are open now.
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(len(os.listdir("/proc/self/fd")) + 40, hard), hard))
    try:
        answer = site.post(multipart(parts))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["00081199"]["Value"]) == len(parts)
    assert not list(site.rt.paths.tmp.glob("*")), "no spool file left behind"


class _FullDisk:
    """A temporary file on a full disk."""

    def __init__(self, *_args: Any, **_kwargs: Any) -> None:
        pass

    def write(self, _data: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    def close(self) -> None:
        pass


def test_a_body_that_cannot_be_spooled_is_refused_507_and_audited(
    site: Site,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("dicom_node.web.stow._MEMORY_BUDGET", 0)
    monkeypatch.setattr(
        "dicom_node.web.stow.tempfile",
        SimpleNamespace(TemporaryFile=_FullDisk, SpooledTemporaryFile=_FullDisk),
    )
    before, held, seen = site.instances(), site.quarantined(), len(site.audit("stow-received"))
    answer = site.post(multipart([f.read_bytes() for f in site.files[1:3]]))
    assert answer.status_code == 507, answer.text
    assert "No space left on device" in answer.json()["detail"]
    refused = _refusal(site, seen)
    assert refused["result"] == "refused" and refused["http_status"] == 507
    assert "cannot spool" in refused["reason"]
    _nothing_kept(site, before, held)


def test_a_sender_that_disconnects_mid_body_is_audited_and_nothing_is_kept(site: Site) -> None:  # noqa: F811
    """Two whole DICOM files are in the half that arrives: neither is stored."""
    body = multipart([f.read_bytes() for f in site.files])
    before, held, seen = site.instances(), site.quarantined(), len(site.audit("stow-received"))
    host, port = site.base.rsplit("/", 1)[-1].split(":")
    head = (
        f"POST /dicomweb/studies HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Authorization: Bearer {site.tokens['sender']}\r\n"
        f'Content-Type: multipart/related; type="application/dicom"; boundary={BOUNDARY}\r\n'
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(head + body[: len(body) // 2 + 100])
        time.sleep(0.3)
    refused = _refusal(site, seen, timeout=5)
    assert refused["result"] == "refused" and "disconnected before the body ended" in refused["reason"]
    assert refused["calling_ae"] == "CT_GATEWAY" and refused["bytes"] > 0
    _nothing_kept(site, before, held)


def test_x_forwarded_for_from_loopback_does_not_change_the_audited_peer(site: Site) -> None:  # noqa: F811
    seen = len(site.audit("stow-received"))
    answer = site.post(multipart([]), **{"X-Forwarded-For": "198.51.100.7"})
    assert answer.status_code == 400, answer.text
    _refusal(site, seen)
    (peer,) = state_rows(
        site.home,
        "select peer_host from audit_events where event = 'stow-received' order by seq desc limit 1",
        audit=True,
    )[0]
    assert peer == "127.0.0.1"


def test_a_large_part_is_held_once_not_twice(site: Site, tmp_path: Path) -> None:  # noqa: F811
    """The data set of a 40 MB part is read from the spool once (not whole, then copied)."""
    size = 40 * 2**20
    part = site.files[0].read_bytes() + b"\0" * size
    body = stow._Body(BOUNDARY.encode(), 2**30, str(tmp_path))
    sent = multipart([part])
    del part
    for start in range(0, len(sent), 2**20):
        body.feed(sent[start : start + 2**20])
    body.parser.finalize()
    del sent
    taken: list[int] = []

    def take(data_of: Any, *_args: Any, **_kwargs: Any) -> Any:
        taken.append(len(data_of()))
        return SimpleNamespace(status=StoreStatus.SUCCESS, counted="stored", reason=None)

    caller: Any = SimpleNamespace(user=SimpleNamespace(username="CT_GATEWAY"), address="127.0.0.1")
    tracemalloc.start()
    try:
        done = stow._store_parts(SimpleNamespace(take=take), body, caller, None)  # type: ignore[arg-type]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        body.close()
    assert len(done.stored) == 1 and taken[0] > size
    assert peak < 1.5 * size, f"peak {peak / 2**20:.0f} MB for a {size / 2**20:.0f} MB part"
