"""Priors in policies (issue 16 item 3): the rule's ``priors`` model, its validation on
load, and the selection of prior studies (window, interval, regex, count, local first)."""

from __future__ import annotations

import time
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlalchemy import func, select

from audit import AuditEvent
from dicom_node.db import schema as t
from dicom_node.ingest.archives import ArchiveError, RetrieveResult, SeriesMatch, StudyMatch, StudyQuery
from dicom_node.ingest.indexer import Indexer
from dicom_node.ingest.origin import OriginRules, job_output_lookup
from dicom_node.ingest.store import InstanceStore
from dicom_node.jobs import priors as p
from dicom_node.jobs.intake import JobIntake
from dicom_node.jobs.prior_fetch import PriorFetcher
from dicom_node.jobs.routing import PolicyRouter
from dicom_node.jobs.state import JobState
from dicom_node.runtime import Runtime
from policies.loader import PolicyError, load_policy, parse_policy
from policies.model import Priors, Rule
from tests.test_archives import NODE_AE, mr_instance, wire_bytes

CURRENT = p.CurrentStudy("1.2.3.100", "P1", date(2024, 6, 1), modality="MR", body_part="HEAD")


def _series(
    uid: str, description: str = "T1 post", modality: str = "MR", body: str = "HEAD", local: bool = False
) -> p.PriorSeries:
    return p.PriorSeries(uid, modality, description, body, 10, local=local)


def _study(uid: str, day: date | None, *series: p.PriorSeries, patient: str = "P1") -> p.PriorStudy:
    return p.PriorStudy(uid, patient, day, tuple(series) or (_series(uid + ".1"),))


# -- the model -----------------------------------------------------------------------------


def test_priors_defaults_and_patient_id_is_always_compared() -> None:
    priors = Priors(archive="pacs", same=["BodyPartExamined"])
    assert priors.same == ("PatientID", "BodyPartExamined")
    assert (priors.count, priors.on_missing, priors.registration, priors.min_interval_days) == (
        1,
        "run",
        "none",
        0,
    )
    assert Priors(archive="pacs", same="PatientID").same == ("PatientID",)
    rule = Rule.model_validate(
        {
            "name": "mr-with-priors",
            "pipeline": "forward",
            "destinations": ["pacs"],
            "priors": {"archive": "pacs", "count": 2, "modality": "MR", "series": "T1.*post|T1C"},
        }
    )
    assert rule.priors is not None and rule.priors.count == 2
    assert "2 prior(s) MR series /T1.*post|T1C/ from pacs" in rule.priors.describe()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"count": 0}, "greater than or equal to 1"),
        ({"same": ["StudyDate"]}, "priors.same compares PatientID, BodyPartExamined, Modality"),
        ({"series": "T1(("}, "not a valid regular expression"),
        ({"within_days": 20, "min_interval_days": 30}, "no study could qualify"),
        ({"modality": "mr head"}, "one DICOM modality"),
        ({"on_missing": "wait"}, "'run' or 'refuse'"),
        ({"registration": "deformable"}, "'none', 'rigid' or 'affine'"),
        ({"timeout_seconds": 0}, "greater than 0"),
        ({"archive": "  "}, "name a configured archive"),
        ({"regsitration": "rigid"}, "Extra inputs are not permitted"),
    ],
)
def test_priors_refuses_what_cannot_work(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace("|", r"\|")):
        Priors.model_validate({"archive": "pacs", **fields})


POLICY = """\
mode: first-match
rules:
  - name: mr-priors
    pipeline: forward
    destinations: [pacs]
    priors:
      archive: {archive}
      count: 2
"""


def test_the_archive_a_rule_names_is_checked_on_load(tmp_path: Path) -> None:
    source = tmp_path / "policy.yaml"
    policy = parse_policy(POLICY.format(archive="pacs"), source, {"pacs"}, {"pacs"})
    assert policy.rules[0].priors is not None
    with pytest.raises(PolicyError) as caught:
        parse_policy(POLICY.format(archive="vna"), source, {"pacs"}, {"pacs"})
    assert caught.value.problems == [
        f"{source}:7: rules[0].priors.archive: unknown archive 'vna' (configured: pacs)"
    ]
    with pytest.raises(PolicyError, match="no \\[archives\\] are configured"):
        parse_policy(POLICY.format(archive="vna"), source, {"pacs"}, set())
    # Archives not known (no config at hand): not checked.
    assert parse_policy(POLICY.format(archive="vna"), source, {"pacs"}).rules[0].priors is not None


# -- the window and the query --------------------------------------------------------------


def test_the_window_and_the_query_the_archive_is_sent() -> None:
    priors = Priors(archive="pacs", modality="MR", within_days=1100, min_interval_days=30)
    assert p.window(priors, date(2024, 6, 1)) == (date(2021, 5, 28), date(2024, 5, 2))
    assert p.window(Priors(archive="pacs"), date(2024, 6, 1)) == (None, date(2024, 6, 1))
    assert p.window(priors, None) == (None, None)
    query = p.query(priors, CURRENT)
    assert query == StudyQuery(
        patient_id="P1", modality="MR", since=date(2021, 5, 28), until=date(2024, 5, 2)
    )
    assert query.keys() == {
        "PatientID": "P1",
        "ModalitiesInStudy": "MR",
        "StudyDate": "20210528-20240502",
    }
    assert p.describe_query(priors, CURRENT) == (
        "C-FIND STUDY to pacs: PatientID=P1, ModalitiesInStudy=MR, StudyDate=20210528-20240502"
    )


# -- the choice ------------------------------------------------------------------------------


def test_the_newest_qualifying_studies_are_chosen() -> None:
    priors = Priors(archive="pacs", count=2, modality="MR", within_days=1100, min_interval_days=30)
    candidates = [
        _study("1.2.3.1", date(2024, 5, 20)),  # 12 days: inside the minimum interval
        _study("1.2.3.2", date(2024, 4, 1)),
        _study("1.2.3.3", date(2023, 1, 1)),
        _study("1.2.3.4", date(2022, 1, 1)),
        _study("1.2.3.5", date(2020, 1, 1)),  # beyond within_days
        _study("1.2.3.6", None),  # no date: the window cannot be judged
        _study("1.2.3.100", date(2023, 6, 1)),  # the current study itself
        _study("1.2.3.7", date(2024, 3, 1), patient="P2"),  # another patient
        _study("1.2.3.8", date(2024, 3, 2), _series("1.2.3.8.1", modality="CT")),
    ]
    selection = p.choose(priors, CURRENT, candidates)
    assert [s.study_uid for s in selection.chosen] == ["1.2.3.2", "1.2.3.3"]
    assert selection.shortfall is None
    assert selection.to_fetch == {"1.2.3.2": ("1.2.3.2.1",), "1.2.3.3": ("1.2.3.3.1",)}
    # Without the interval, the study of 12 days ago is the newest.
    loose = Priors(archive="pacs", count=2, modality="MR")
    assert [s.study_uid for s in p.choose(loose, CURRENT, candidates).chosen] == ["1.2.3.1", "1.2.3.2"]


def test_series_regex_and_same_body_part_pick_the_series() -> None:
    priors = Priors(archive="pacs", count=3, series="(?i)T1.*post|T1C", same=["BodyPartExamined"])
    candidates = [
        _study("1.2.3.1", date(2024, 1, 1), _series("a", "T1 post"), _series("b", "T2 FLAIR")),
        _study("1.2.3.2", date(2023, 1, 1), _series("c", "T2 FLAIR")),  # no wanted series
        _study("1.2.3.3", date(2022, 1, 1), _series("d", "t1c"), _series("e", "T1C", body="PELVIS")),
    ]
    selection = p.choose(priors, CURRENT, candidates)
    assert [(s.study_uid, [x.series_uid for x in s.series]) for s in selection.chosen] == [
        ("1.2.3.1", ["a"]),
        ("1.2.3.3", ["d"]),
    ]
    assert selection.shortfall == (
        "2 of 3 prior(s) found (any modality, dated any time..2024-06-01, series '(?i)T1.*post|T1C')"
    )
    no_date = p.choose(priors, p.CurrentStudy("1.2.3.100", "P1", None), candidates)
    assert no_date.chosen == ()
    assert no_date.shortfall is not None and "the current study has no Study Date" in no_date.shortfall


def test_priors_held_locally_are_not_fetched_again() -> None:
    priors = Priors(archive="pacs", count=2, modality="MR")
    local = [
        _study("1.2.3.1", date(2024, 1, 1), _series("a", local=True)),
        _study("1.2.3.2", date(2023, 1, 1), _series("b", local=True)),
    ]
    remote = [
        _study("1.2.3.1", date(2024, 1, 1), _series("a"), _series("a2", "T1 post")),
        _study("1.2.3.2", date(2023, 1, 1), _series("b")),
        _study("1.2.3.3", date(2022, 1, 1), _series("c")),
    ]
    selection = p.choose(priors, CURRENT, p.merge(local, remote))
    assert [s.study_uid for s in selection.chosen] == ["1.2.3.1", "1.2.3.2"]
    # Only the series the archive has and this node lacks is fetched.
    assert selection.to_fetch == {"1.2.3.1": ("a2",)}
    assert [s.study_uid for s in selection.held] == ["1.2.3.2"]
    # Everything held: nothing to fetch.
    assert p.choose(priors, CURRENT, local).to_fetch == {}


class FakeArchive:
    """Answers like an archive and counts the series queries."""

    def __init__(self, studies: dict[str, tuple[str, list[str]]]) -> None:
        self.studies = studies  # uid -> (date, series descriptions)
        self.series_asked: list[str] = []
        self.queries: list[StudyQuery] = []

    def find_studies(self, query: StudyQuery, deadline: float | None = None) -> list[StudyMatch]:
        self.queries.append(query)
        return [
            StudyMatch(uid, "P1", "SIM", day, None, ("MR",), None, len(desc), None)
            for uid, (day, desc) in self.studies.items()
        ]

    def find_series(
        self, study_uid: str, modality: str | None = None, deadline: float | None = None
    ) -> list[SeriesMatch]:
        self.series_asked.append(study_uid)
        _, descriptions = self.studies[study_uid]
        return [
            SeriesMatch(study_uid, f"{study_uid}.{i}", "MR", i, d, "HEAD", 5)
            for i, d in enumerate(descriptions, 1)
        ]


def test_the_archive_is_asked_for_series_only_until_enough_qualify() -> None:
    priors = Priors(archive="pacs", count=2, modality="MR", series="T1", min_interval_days=30)
    archive = FakeArchive(
        {
            "1.2.3.1": ("20240525", ["T1"]),  # inside the interval: not asked (the archive
            # ignored the date range; the answer is checked again)
            "1.2.3.2": ("20240101", ["T2"]),
            "1.2.3.3": ("20230101", ["T1"]),
            "1.2.3.4": ("20220101", ["T1", "T2"]),
            "1.2.3.5": ("20210101", ["T1"]),
        }
    )
    found = p.archive_priors(archive, priors, CURRENT)  # type: ignore[arg-type]
    assert archive.queries == [p.query(priors, CURRENT)]
    assert archive.series_asked == ["1.2.3.2", "1.2.3.3", "1.2.3.4"]
    selection = p.choose(priors, CURRENT, found)
    assert [s.study_uid for s in selection.chosen] == ["1.2.3.3", "1.2.3.4"]
    assert selection.to_fetch == {"1.2.3.3": ("1.2.3.3.1",), "1.2.3.4": ("1.2.3.4.1",)}


# -- from the index ------------------------------------------------------------------------


def _put(
    store: InstanceStore, patient: str, study: str, series: str, day: str, prior: bool, number: int = 1
) -> None:
    ds = mr_instance(patient, study, series, number, day)
    store.put(
        wire_bytes(ds), ExplicitVRLittleEndian, claimed_sop_uid=ds.SOPInstanceUID,
        calling_ae="PACS" if prior else "SCANNER", retrieved_from="pacs" if prior else None,
    )  # fmt: skip


def test_local_priors_come_from_the_index(store_node: tuple[Runtime, InstanceStore]) -> None:
    rt, store = store_node
    current, acquired, retrieved, other = (generate_uid() for _ in range(4))
    _put(store, "P1", current, generate_uid(), "20240601", prior=False)
    acquired_series = generate_uid()
    _put(store, "P1", acquired, acquired_series, "20240101", prior=False)
    retrieved_series = generate_uid()
    _put(store, "P1", retrieved, retrieved_series, "20230101", prior=True)
    _put(store, "P2", other, generate_uid(), "20230601", prior=False)
    with rt.db.read() as conn:
        study_id = conn.execute(select(t.studies.c.id).where(t.studies.c.study_uid == current)).scalar_one()
        now = p.current_study(conn, study_id, None)
        assert (now.study_uid, now.patient_id, now.study_date) == (current, "P1", date(2024, 6, 1))
        # No input series named: the study's largest acquired series gives Modality / Body Part.
        assert (now.modality, now.body_part) == ("MR", None)
        local = p.local_priors(conn, now)
    assert {(s.study_uid, s.study_date, s.local) for s in local} == {
        (acquired, date(2024, 1, 1), True),
        (retrieved, date(2023, 1, 1), True),
    }
    priors = Priors(archive="pacs", count=2, modality="MR", series="SIMULATED T1")
    selection = p.choose(priors, now, local)
    assert [s.study_uid for s in selection.chosen] == [acquired, retrieved]
    assert selection.to_fetch == {}
    assert [x.series_uid for s in selection.chosen for x in s.series] == [acquired_series, retrieved_series]


# -- policy explain --------------------------------------------------------------------------


def test_policy_explain_shows_the_query_and_the_priors_held(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from dicom_node.cli import app
    from tests.peers import free_port

    home = tmp_path / "node"
    home.mkdir()
    port = free_port()  # nothing listens there: the archive is down
    (home / "dicom-node.toml").write_text(
        f'[policy]\nfile = "policy.yaml"\n'
        f'[destinations.pacs]\nae_title = "PACS"\nhost = "127.0.0.1"\nport = {port}\n'
        f'[archives.pacs]\nae_title = "PACS"\nhost = "127.0.0.1"\nport = {port}\n'
        "timeout_seconds = 2\n"
    )
    (home / "policy.yaml").write_text(
        POLICY.format(archive="pacs")
        + "      modality: MR\n      min_interval_days: 30\n      on_missing: refuse\n"
    )
    rt = Runtime.open(None, home)
    origin = OriginRules(NODE_AE, "1.2.826.0.1.3680043.10.999.", job_output_lookup(rt.db))
    store = InstanceStore(rt.paths, rt.db, Indexer(rt.db, rt.audit, gather_seconds=0.01), origin=origin)
    current, held, too_recent = generate_uid(), generate_uid(), generate_uid()
    try:
        _put(store, "P1", current, generate_uid(), "20240601", prior=False)
        _put(store, "P1", held, generate_uid(), "20240101", prior=True)
        _put(store, "P1", too_recent, generate_uid(), "20240520", prior=False)
    finally:
        store.close()
        rt.close()
    result = CliRunner().invoke(app, ["policy", "explain", current, "--home", str(home)])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "C-FIND STUDY to pacs: PatientID=P1, ModalitiesInStudy=MR, StudyDate=-20240502" in text
    assert f"held here: 1 qualifying study {held} (2024-01-01)" in text
    assert f"would use: {held}" in text
    assert too_recent not in text
    assert "short: 1 of 2 prior(s) found (MR, dated any time..2024-05-02)" in text
    assert "archive answered" not in text  # not asked without --query-archive

    asked = CliRunner().invoke(
        app, ["policy", "explain", current, "--home", str(home), "--query-archive", "--json"]
    )
    assert asked.exit_code == 0, asked.output
    import json

    entry = json.loads(asked.output)["priors"][0]
    assert entry["query"] == {
        "archive": "pacs",
        "PatientID": "P1",
        "ModalitiesInStudy": "MR",
        "StudyDate": "-20240502",
    }
    assert "archive_answer" not in entry and entry["archive_error"]
    assert [s["study_uid"] for s in entry["held_locally"]] == [held]
    assert entry["to_fetch"] == {}


# -- the job waits in fetching-priors ----------------------------------------------------------


class StoringArchive(FakeArchive):
    """A fake archive whose retrieve stores the asked series here as priors (as a C-MOVE
    through the receiver would), or fails as told."""

    def __init__(self, store: InstanceStore, studies: dict[str, tuple[str, list[str]]]) -> None:
        super().__init__(studies)
        self.store = store
        self.retrieved: list[tuple[str, tuple[str, ...]]] = []
        self.fail: str | None = None

    def retrieve(
        self,
        study_uid: str,
        series_uids: Any = None,
        timeout: float | None = None,
        patient: tuple[str, str] | None = None,
    ) -> RetrieveResult:
        assert timeout is not None and timeout > 0
        assert patient == ("P1", ""), "a job's retrieval names the patient the prior must belong to"
        self.retrieved.append((study_uid, tuple(series_uids or ())))
        if self.fail:
            return RetrieveResult("pacs", "c-move", study_uid, tuple(series_uids), error=self.fail)
        day = self.studies[study_uid][0]
        for series in series_uids:
            for number in (1, 2):
                _put(self.store, "P1", study_uid, series, day, prior=True, number=number)
        return RetrieveResult("pacs", "c-move", study_uid, tuple(series_uids), completed=2 * len(series_uids))


class OneArchive:
    def __init__(self, archive: Any) -> None:
        self.archive = archive

    def get(self, name: str) -> Any:
        if self.archive is None:
            raise ArchiveError(f"archive {name} (127.0.0.1:1) does not answer: connection refused")
        assert name == "pacs"
        return self.archive


JOB_POLICY = """\
mode: first-match
rules:
  - name: mr-priors
    match: {{modality: MR}}
    pipeline: forward
    destinations: [pacs]
    priors:
      archive: pacs
      count: 2
      modality: MR
      min_interval_days: 30
      timeout_seconds: 5
      on_missing: {on_missing}
"""


def _job_for_current_study(rt: Runtime, store: InstanceStore, on_missing: str = "run") -> tuple[int, str]:
    current = generate_uid()
    _put(store, "P1", current, generate_uid(), "20240601", prior=False)
    path = rt.paths.home / "policy.yaml"
    path.write_text(JOB_POLICY.format(on_missing=on_missing))
    router = PolicyRouter(load_policy(path, {"pacs"}, {"pacs"}), rt.paths.data, {"pacs": "PACS"})
    (job_id,) = JobIntake(rt.db, rt.audit, router).study_ready(current)
    with rt.db.read() as conn:
        state = conn.execute(select(t.jobs.c.state).where(t.jobs.c.id == job_id)).scalar_one()
    assert state == JobState.FETCHING_PRIORS.value
    return job_id, current


def _job(rt: Runtime, job_id: int) -> tuple[str, str | None, list[tuple[str, str, str | None]]]:
    with rt.db.read() as conn:
        row = conn.execute(select(t.jobs.c.state, t.jobs.c.reason).where(t.jobs.c.id == job_id)).one()
        moves = [
            (r.from_state, r.to_state, r.reason)
            for r in conn.execute(
                select(t.job_transitions)
                .where(t.job_transitions.c.job_fk == job_id)
                .order_by(t.job_transitions.c.id)
            )
        ]
    return row.state, row.reason, moves


ARCHIVE = {
    "1.2.3.1": ("20240520", ["SIMULATED T1"]),  # inside min_interval_days
    "1.2.3.2": ("20240101", ["SIMULATED T1"]),
    "1.2.3.3": ("20230101", ["SIMULATED T1"]),
    "1.2.3.4": ("20220101", ["SIMULATED T1"]),
}


def test_a_job_fetches_the_two_newest_priors_and_runs(store_node: tuple[Runtime, InstanceStore]) -> None:
    rt, store = store_node
    job_id, _ = _job_for_current_study(rt, store)
    archive = StoringArchive(store, dict(ARCHIVE))
    fetcher = PriorFetcher(rt.db, rt.audit, OneArchive(archive))
    assert fetcher.pending() == [job_id]
    assert fetcher.fetch(job_id) == JobState.QUEUED
    assert archive.retrieved == [("1.2.3.2", ("1.2.3.2.1",)), ("1.2.3.3", ("1.2.3.3.1",))]
    state, reason, moves = _job(rt, job_id)
    assert (state, reason) == ("queued", "priors: 2 at hand")
    assert moves == [(None, "fetching-priors", None), ("fetching-priors", "queued", "priors: 2 at hand")]
    with rt.db.read() as conn:
        rows = conn.execute(select(t.job_priors).order_by(t.job_priors.c.id)).all()
        # The retrieved priors opened no job of their own.
        assert conn.execute(select(func.count(t.jobs.c.id))).scalar_one() == 1
    assert [(r.study_uid, r.series_uid, r.study_date, r.archive, r.sop_count) for r in rows] == [
        ("1.2.3.2", "1.2.3.2.1", "20240101", "pacs", 2),
        ("1.2.3.3", "1.2.3.3.1", "20230101", "pacs", 2),
    ]
    assert all(r.retrieved_at is not None for r in rows)
    transition = rt.audit.events(AuditEvent.JOB_TRANSITION)[-1]
    assert (transition.facts["from_state"], transition.facts["to_state"]) == ("fetching-priors", "queued")
    assert fetcher.fetch(job_id) is None  # settled: nothing more to do

    # A second job of the same patient finds both priors held here: nothing fetched again.
    again, _ = _job_for_current_study(rt, store)
    archive.retrieved.clear()
    assert fetcher.fetch(again) == JobState.QUEUED
    assert archive.retrieved == []
    with rt.db.read() as conn:
        held = conn.execute(
            select(t.job_priors.c.study_uid, t.job_priors.c.retrieved_at).where(
                t.job_priors.c.job_fk == again
            )
        ).all()
    assert [(uid, at) for uid, at in held] == [("1.2.3.2", None), ("1.2.3.3", None)]


@pytest.mark.parametrize("on_missing", ["refuse", "run"])
def test_archive_down_refuses_or_runs_as_the_rule_says(
    store_node: tuple[Runtime, InstanceStore], on_missing: str
) -> None:
    rt, store = store_node
    job_id, _ = _job_for_current_study(rt, store, on_missing)
    started = time.monotonic()
    state = PriorFetcher(rt.db, rt.audit, OneArchive(None)).fetch(job_id)
    assert time.monotonic() - started < 5
    want = JobState.REFUSED if on_missing == "refuse" else JobState.QUEUED
    assert state == want
    _, reason, _ = _job(rt, job_id)
    lead = "priors: " if on_missing == "refuse" else "priors: running with "
    assert reason == (
        f"{lead}0 of 2 prior(s) at hand; 0 of 2 prior(s) found (MR, dated any time..2024-05-02); "
        "archive pacs: archive pacs (127.0.0.1:1) does not answer: connection refused"
    )
    transition = rt.audit.events(AuditEvent.JOB_TRANSITION)[-1]
    assert transition.facts["reason"] == reason
    with rt.db.read() as conn:
        assert conn.execute(select(t.job_priors)).all() == []


def test_a_failed_retrieval_is_named_and_the_job_refused(store_node: tuple[Runtime, InstanceStore]) -> None:
    rt, store = store_node
    job_id, _ = _job_for_current_study(rt, store, "refuse")
    archive = StoringArchive(store, dict(ARCHIVE))
    archive.fail = "C-MOVE: 0 completed, 1 failed (0xA801 move destination unknown)"
    assert PriorFetcher(rt.db, rt.audit, OneArchive(archive)).fetch(job_id) == JobState.REFUSED
    _, reason, _ = _job(rt, job_id)
    assert reason == (
        "priors: 0 of 2 prior(s) at hand; "
        "1.2.3.2: C-MOVE: 0 completed, 1 failed (0xA801 move destination unknown); "
        "1.2.3.3: C-MOVE: 0 completed, 1 failed (0xA801 move destination unknown)"
    )


def test_the_fetcher_thread_settles_waiting_jobs(store_node: tuple[Runtime, InstanceStore]) -> None:
    rt, store = store_node
    job_id, _ = _job_for_current_study(rt, store)
    fetcher = PriorFetcher(rt.db, rt.audit, OneArchive(StoringArchive(store, dict(ARCHIVE))), every=0.05)
    fetcher.start()
    try:
        deadline = time.monotonic() + 10
        while _job(rt, job_id)[0] == "fetching-priors" and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        fetcher.stop()
    assert _job(rt, job_id)[:2] == ("queued", "priors: 2 at hand")


def test_the_provenance_of_a_job_lists_its_priors(store_node: tuple[Runtime, InstanceStore]) -> None:
    from dicom_node.config import NodeConfig
    from dicom_node.delivery.profiles import DestinationProfiles
    from dicom_node.jobs.runner import JobRunner

    rt, store = store_node
    job_id, current = _job_for_current_study(rt, store)
    assert PriorFetcher(rt.db, rt.audit, OneArchive(StoringArchive(store, dict(ARCHIVE)))).fetch(job_id)
    config = NodeConfig.model_validate(
        {"destinations": {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": 11112}}}
    )
    runner = JobRunner(config, rt.paths, rt.db, rt.audit, "test-worker", DestinationProfiles(config))
    claimed = runner.claim()
    assert claimed is not None and claimed.job_id == job_id
    runner.run(claimed)
    records = rt.audit.events(AuditEvent.PROVENANCE)
    assert records, "the job wrote no provenance record"
    with rt.db.read() as conn:
        held = {
            series: sorted(
                (sop, sha)
                for sop, sha in conn.execute(
                    select(t.instances.c.sop_uid, t.instances.c.sha256)
                    .join(t.series, t.series.c.id == t.instances.c.series_fk)
                    .where(t.series.c.series_uid == series)
                )
            )
            for series in ("1.2.3.2.1", "1.2.3.3.1")
        }
    for record in records:
        assert record.facts["job_id"] == job_id and record.study_uid == current
        listed = record.facts["priors"]
        assert [(x["study_uid"], x["series_uid"], x["archive"]) for x in listed] == [
            ("1.2.3.2", "1.2.3.2.1", "pacs"),
            ("1.2.3.3", "1.2.3.3.1", "pacs"),
        ]
        for x in listed:
            assert x["retrieved_at"] is not None
            assert sorted((i["sop_uid"], i["sha256"]) for i in x["instances"]) == held[x["series_uid"]]
            assert len(x["instances"]) == 2


class BrokenArchive(FakeArchive):
    def find_studies(self, query: StudyQuery, deadline: float | None = None) -> list[StudyMatch]:
        raise RuntimeError("unexpected")


@pytest.mark.parametrize("on_missing", ["refuse", "run"])
def test_a_broken_fetch_never_leaves_the_job_waiting(
    store_node: tuple[Runtime, InstanceStore], on_missing: str
) -> None:
    rt, store = store_node
    job_id, _ = _job_for_current_study(rt, store, on_missing)
    fetcher = PriorFetcher(rt.db, rt.audit, OneArchive(BrokenArchive({})), every=0.05)
    fetcher.start()
    try:
        deadline = time.monotonic() + 10
        while _job(rt, job_id)[0] == "fetching-priors" and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        fetcher.stop()
    state, reason, _ = _job(rt, job_id)
    assert state == ("refused" if on_missing == "refuse" else "queued")
    assert reason is not None and reason.startswith("priors: ") and "internal error: RuntimeError" in reason


def test_the_runner_registers_the_job_priors_and_a_refusal_ends_the_job_refused(
    store_node: tuple[Runtime, InstanceStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wiring: with ``registration: rigid`` frozen on the job, the runner hands the
    registration step the job's prior series files (the registration itself is
    tests/test_prior_registration.py's) before the pipeline runs; a prior it refuses ends the
    job ``refused`` with the reason."""
    from dicom_node.config import NodeConfig
    from dicom_node.delivery.profiles import DestinationProfiles
    from dicom_node.jobs import runner as runner_module
    from pipelines.base import InputRefused

    rt, store = store_node
    job_id, _ = _job_for_current_study(rt, store, "refuse")
    assert PriorFetcher(rt.db, rt.audit, OneArchive(StoringArchive(store, dict(ARCHIVE)))).fetch(job_id)
    with rt.db.write() as conn:
        frozen = conn.execute(select(t.jobs.c.priors).where(t.jobs.c.id == job_id)).scalar_one()
        conn.execute(
            t.jobs.update().where(t.jobs.c.id == job_id).values(priors={**frozen, "registration": "rigid"})
        )
    seen: dict[str, Any] = {}

    def refuse(study: Any, priors: Priors, files: Any) -> Any:
        seen.update(mode=priors.registration, on_missing=priors.on_missing, files=files)
        raise InputRefused("prior-registration", "1.2.3.2.1", ["body-mask Dice 0.609 below 0.850"])

    monkeypatch.setattr(runner_module, "compute_registrations", refuse)
    config = NodeConfig.model_validate(
        {"destinations": {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": 11112}}}
    )
    runner = runner_module.JobRunner(
        config, rt.paths, rt.db, rt.audit, "test-worker", DestinationProfiles(config)
    )
    claimed = runner.claim()
    assert claimed is not None and claimed.job_id == job_id
    assert runner.run(claimed) == JobState.REFUSED
    assert (seen["mode"], seen["on_missing"]) == ("rigid", "refuse")
    assert sorted(seen["files"]) == ["1.2.3.2.1", "1.2.3.3.1"]
    assert all(len(paths) == 2 and all(p.is_file() for p in paths) for paths in seen["files"].values())
    state, reason, _ = _job(rt, job_id)
    assert state == "refused"
    assert reason is not None and "series 1.2.3.2.1" in reason and "Dice 0.609 below 0.850" in reason
