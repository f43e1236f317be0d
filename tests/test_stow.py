"""STOW-RS in (POST /dicomweb/studies) and out (a ``dicomweb`` destination): the node's
receiver path behind an HTTP front, in a real uvicorn on loopback; SIMULATED CT slices.

In: a sender's token stores a study (data set bytes identical, indexed, audited with the
sender as calling AE); duplicates count as stored; a part that is not DICOM fails alone
(202) and is quarantined; a study that is not the URL's fails (409, 0xA900); a malformed
or truncated body, a wrong media type or an oversized body is refused whole with the
reason and nothing of it is kept; the wrong role is 403 and no token 401.
Out: the outbox posts a series with dicomweb-client to a DICOMweb server (this node's own
STOW-RS), confirms every instance from the answer, and dead-letters a refused token with
the reason; a peer that is down is retried.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select, update

from dicom_node.config import NodeConfig
from dicom_node.db import schema as t
from dicom_node.delivery.outbox import Outbox, create_deliveries
from dicom_node.ingest.indexer import Indexer
from dicom_node.ingest.part10 import split_part10
from dicom_node.ingest.receiver import Receiver
from dicom_node.ingest.store import InstanceStore
from dicom_node.jobs.state import JobState, create_job, transition
from dicom_node.lab.localpeers import free_port
from dicom_node.lab.simulate import write_ct_series
from dicom_node.net.tls import ClientTls
from dicom_node.runtime import Runtime
from dicom_node.web.app import WebContext, create_app
from dicom_node.web.server import WebServer
from dicom_node.web.users import UserError, UserStore
from models.sim.phantom import PhantomSpec
from pipelines.base import OutputInstance
from tests.conftest import state_rows

PASSWORD = "a long enough password"
BOUNDARY = "dicom-node-test-boundary"


@dataclass
class Site:
    base: str
    home: Path
    rt: Runtime
    store: InstanceStore
    tokens: dict[str, str]
    files: list[Path]
    study_uid: str

    def post(
        self, body: bytes, who: str | None = "sender", path: str = "/dicomweb/studies", **headers: str
    ) -> httpx.Response:
        sent = {
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}',
            **headers,
        }
        if who:
            sent["Authorization"] = f"Bearer {self.tokens[who]}"
        return httpx.post(self.base + path, content=body, headers=sent, timeout=60)

    def instances(self) -> list[tuple[str, str]]:
        self.store.indexer.flush()
        return [
            (r[0], r[1]) for r in state_rows(self.home, "select sop_uid, path from instances order by id")
        ]

    def quarantined(self) -> int:
        return len(state_rows(self.home, "select id from quarantine"))

    def audit(self, event: str) -> list[dict[str, Any]]:
        self.store.indexer.flush()
        rows = state_rows(
            self.home,
            "select actor, calling_ae, facts from audit_events where event = ? order by seq",
            (event,),
            audit=True,
        )
        return [{"actor": a, "calling_ae": c, **json.loads(f)} for a, c, f in rows]


def multipart(parts: list[bytes], *, content_type: str = "application/dicom", close: bool = True) -> bytes:
    body = b""
    for part in parts:
        body += f"--{BOUNDARY}\r\nContent-Type: {content_type}\r\n\r\n".encode() + part + b"\r\n"
    return body + (f"--{BOUNDARY}--\r\n".encode() if close else b"")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    base = tmp_path_factory.mktemp("stow")
    home = base / "home"
    rt = Runtime.open(None, home, {"web": {"stow_max_mb": 2}})
    store = InstanceStore(rt.paths, rt.db, Indexer(rt.db, rt.audit, gather_seconds=0.01))
    receiver = Receiver(rt.config, rt.paths, store, rt.audit)
    users = UserStore(rt.db)
    users.add("CT_GATEWAY", "sender", PASSWORD)
    users.add("olga", "operator", PASSWORD)
    tokens = {
        "sender": users.create_token("CT_GATEWAY", "gateway")[1],
        "operator": users.create_token("olga", "x")[1],
    }
    sim = write_ct_series(base / "sim", PhantomSpec(rows=64, columns=64, slices=4, seed=5))
    ctx = WebContext(rt.config, rt.db, rt.audit, rt.paths.checkpoint_file(rt.config), receiver=receiver)
    port = free_port()
    server = WebServer(create_app(ctx), "127.0.0.1", port)
    server.start()
    try:
        yield Site(f"http://127.0.0.1:{port}", home, rt, store, tokens, list(sim.files), sim.study_uid)
    finally:
        server.stop()
        store.close()
        rt.close()


def test_a_sender_stores_a_study_byte_identical_indexed_and_audited(site: Site) -> None:
    answer = site.post(multipart([f.read_bytes() for f in site.files[:3]]))
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/dicom+json"
    referenced = answer.json()["00081199"]["Value"]
    sent = {str(split_part10(f.read_bytes())[0].MediaStorageSOPInstanceUID): f for f in site.files[:3]}
    assert {item["00081155"]["Value"][0] for item in referenced} == set(sent)
    stored = dict(site.instances())
    assert set(sent) <= set(stored)
    for uid, original in sent.items():
        kept = (site.rt.paths.data / stored[uid]).read_bytes()
        assert split_part10(kept)[1] == split_part10(original.read_bytes())[1], "data set bytes as sent"
    records = [r for r in site.audit("instance-stored") if r["calling_ae"] == "CT_GATEWAY"]
    assert len(records) >= 3
    (request,) = [r for r in site.audit("stow-received") if r.get("stored") == 3]
    assert request["actor"] == "api:CT_GATEWAY" and request["token_name"] == "gateway"
    assert request["result"] == "stored" and request["http_status"] == 200
    # the same instances again: duplicates of stored ones count as stored
    again = site.post(multipart([f.read_bytes() for f in site.files[:3]]))
    assert again.status_code == 200 and len(again.json()["00081199"]["Value"]) == 3
    assert len(site.instances()) == len(stored)


def test_a_part_that_is_not_dicom_fails_alone_and_is_kept_in_quarantine(site: Site) -> None:
    before, held = len(site.instances()), site.quarantined()
    answer = site.post(multipart([site.files[3].read_bytes(), b"this is not a DICOM file"]))
    assert answer.status_code == 202, answer.text
    body = answer.json()
    assert len(body["00081199"]["Value"]) == 1
    (failed,) = body["00081198"]["Value"]
    assert failed["00081197"]["Value"] == [0xC000] and "not a DICOM Part 10" in failed["00000902"]["Value"][0]
    assert len(site.instances()) == before + 1 and site.quarantined() == held + 1


def test_parts_past_the_memory_budget_go_to_disk_and_store_the_same(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("dicom_node.web.stow._MEMORY_BUDGET", 0)
    answer = site.post(multipart([f.read_bytes() for f in site.files]))
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["00081199"]["Value"]) == len(site.files)
    assert not list(site.rt.paths.tmp.glob("*")), "no temporary file left behind"


def test_too_many_parts_are_refused_whole(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("dicom_node.web.stow.MAX_PARTS", 2)
    before = site.instances()
    answer = site.post(multipart([f.read_bytes() for f in site.files[:3]]))
    assert answer.status_code == 413 and "more than 2 parts" in answer.json()["detail"]
    assert site.instances() == before and not list(site.rt.paths.tmp.glob("*"))


def test_an_instance_of_another_study_than_the_urls_fails(site: Site) -> None:
    other = generate_uid()
    answer = site.post(multipart([site.files[0].read_bytes()]), path=f"/dicomweb/studies/{other}")
    assert answer.status_code == 409, answer.text
    (failed,) = answer.json()["00081198"]["Value"]
    assert failed["00081197"]["Value"] == [0xA900]
    assert failed["00000902"]["Value"] == ["its Study Instance UID is not the URL's"]
    assert (
        site.post(
            multipart([site.files[0].read_bytes()]), path=f"/dicomweb/studies/{site.study_uid}"
        ).status_code
        == 200
    )


@pytest.mark.parametrize(
    ("body", "content_type", "status", "says"),
    [
        (multipart([b"x" * 64], close=False), None, 400, "closing boundary"),
        (
            b"--" + BOUNDARY.encode() + b"\r\nContent-Type: application/dicom\r\n",
            None,
            400,
            "closing boundary",
        ),
        (multipart([]), None, 400, "no part"),
        (multipart([b"{}"], content_type="application/json"), None, 415, "part 1 is 'application/json'"),
        (multipart([b"x"]), "application/dicom", 415, "multipart/related"),
        (
            multipart([b"x"]),
            f'multipart/related; type="application/dicom+json"; boundary={BOUNDARY}',
            415,
            "only application/dicom",
        ),
        (multipart([b"x"]), 'multipart/related; type="application/dicom"', 400, "no boundary"),
        (multipart([b"x" * (3 * 2**20)]), None, 413, "stow_max_mb (2 MB)"),
    ],
)
def test_a_malformed_request_is_refused_whole_with_its_reason_and_nothing_kept(
    site: Site, body: bytes, content_type: str | None, status: int, says: str
) -> None:
    """The first part of a truncated body is a whole DICOM file: it must not be stored."""
    good = site.files[1].read_bytes()
    if says == "closing boundary" and body.startswith(b"--"):
        body = multipart([good, b"x" * 64], close=False)
    before, held = site.instances(), site.quarantined()
    extra = {"Content-Type": content_type} if content_type else {}
    answer = site.post(body, **extra)
    assert answer.status_code == status, answer.text
    assert says in answer.json()["detail"]
    assert site.instances() == before and site.quarantined() == held
    assert not list(site.rt.paths.tmp.glob("*")), "no spooled part left behind"
    refused = site.audit("stow-received")[-1]
    assert refused["result"] == "refused" and refused["http_status"] == status


def test_only_a_senders_token_may_store(site: Site) -> None:
    body = multipart([site.files[0].read_bytes()])
    assert site.post(body, who=None).status_code == 401
    wrong = site.post(body, who="operator")
    assert wrong.status_code == 403 and "sender role" in wrong.json()["detail"]
    bad = httpx.post(site.base + "/dicomweb/studies", content=body, headers={"Authorization": "Bearer dnt_x"})
    assert bad.status_code == 401
    with pytest.raises(UserError, match="at most 16"):
        UserStore(site.rt.db).add("a-very-long-sender-name", "sender", PASSWORD)


# -- out: a dicomweb destination ------------------------------------------------------------


def _delivery(site: Site, destination: str) -> tuple[Outbox, int]:
    """A delivering job whose one series (the stored slices) goes to ``destination``."""
    config = NodeConfig.model_validate(
        {
            "destinations": {
                "web": {
                    "protocol": "dicomweb",
                    "dicomweb_url": f"{site.base}/dicomweb",
                    "token_file": "sender.token",
                },
                "web-bad-token": {
                    "protocol": "dicomweb",
                    "dicomweb_url": f"{site.base}/dicomweb",
                    "token_file": "bad.token",
                },
                "web-down": {
                    "protocol": "dicomweb",
                    "dicomweb_url": f"http://127.0.0.1:{free_port()}/dicomweb",
                    "timeout_seconds": 5,
                },
            },
            "outbox": {"backoff_initial_seconds": 0.1, "max_attempts": 3},
        }
    )
    (site.home / "sender.token").write_text(site.tokens["sender"] + "\n")
    (site.home / "bad.token").write_text("dnt_not-a-token\n")
    with site.rt.db.write() as conn:
        rows = conn.execute(
            select(t.instances, t.series.c.series_uid).join(
                t.series, t.series.c.id == t.instances.c.series_fk
            )
        ).all()
        study_fk = rows[0].study_fk
        outputs = tuple(
            OutputInstance(
                r.sop_uid, r.series_uid, r.sop_class_uid, r.transfer_syntax_uid, site.rt.paths.data / r.path
            )
            for r in rows
        )
        job_id = create_job(
            conn,
            study_fk=study_fk,
            study_version=1,
            pipeline="forward",
            destinations=[destination],
            instance_ids=[r.id for r in rows],
        )
        transition(conn, job_id, JobState.RUNNING, expect=JobState.QUEUED)
        transition(conn, job_id, JobState.SUCCEEDED, expect=JobState.RUNNING, destination_problems=[])
        create_deliveries(conn, job_id, outputs, [destination])
        transition(conn, job_id, JobState.DELIVERING, expect=JobState.SUCCEEDED)
        delivery = conn.execute(select(t.deliveries.c.id).where(t.deliveries.c.job_fk == job_id)).scalar_one()
    return Outbox(config, site.rt.db, site.rt.audit, "test", tls=ClientTls(config.tls, site.home)), delivery


def _state(site: Site, delivery: int) -> tuple[str, str | None, int]:
    with site.rt.db.read() as conn:
        row = conn.execute(select(t.deliveries).where(t.deliveries.c.id == delivery)).one()
    return row.state, row.last_error, row.attempts


def _run_due(outbox: Outbox, site: Site, delivery: int) -> None:
    with site.rt.db.write() as conn:
        conn.execute(
            update(t.deliveries).where(t.deliveries.c.id == delivery).values(next_attempt_at=time.time() - 1)
        )
    task = outbox.claim_due()
    assert task is not None and task.delivery_id == delivery
    outbox.send(task)


def test_the_outbox_delivers_by_stow_rs_and_is_confirmed_by_the_answer(site: Site) -> None:
    outbox, delivery = _delivery(site, "web")
    before = len(site.audit("stow-received"))
    _run_due(outbox, site, delivery)
    state, error, attempts = _state(site, delivery)
    assert (state, error, attempts) == ("delivered", None, 1)
    received = site.audit("stow-received")[before:]
    assert len(received) == 1 and received[0]["result"] == "stored" and received[0]["stored"] >= 4
    sent = [r for r in site.audit("instances-transferred") if r.get("direction") == "sent"][-1]
    assert len(sent["sop_uids"]) == received[0]["stored"]


def test_a_refused_token_is_a_dead_letter_with_the_reason_and_a_down_peer_is_retried(site: Site) -> None:
    outbox, delivery = _delivery(site, "web-bad-token")
    _run_due(outbox, site, delivery)
    state, error, _ = _state(site, delivery)
    assert state == "dead" and error is not None and "HTTP 401" in error and "revoked or expired" in error
    outbox, down = _delivery(site, "web-down")
    _run_due(outbox, site, down)
    state, error, attempts = _state(site, down)
    assert state == "pending" and attempts == 1 and error is not None and "cannot be reached" in error
