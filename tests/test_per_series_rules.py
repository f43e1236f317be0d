"""Rules that make one job per series (``select: {each: true}``): a low-dose chest CT sent
with two reconstructions of one acquisition (a soft-tissue and a lung kernel), or with the
acquisition split into two series, is restored series by series, not only its largest.

Studies are received by an in-process node (no network), built from the simulator's CT
headers (:func:`dicom_node.lab.simulate.ct_slice`), 4 slices of 64² each, beside the series
a scanner sends with them: a topogram and a Radiation Dose SR. The engine's own cases (a
localizer or an AI output that would otherwise qualify) use the engine's plain views.
Every study is SIMULATED.
"""

from __future__ import annotations

import datetime as dt
import io
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomFileLike
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlalchemy import select
from typer.testing import CliRunner

from audit import AuditEvent
from dicom_node.cli import app
from dicom_node.config import NodeConfig
from dicom_node.db import queries
from dicom_node.db import schema as t
from dicom_node.delivery.profiles import DestinationProfiles
from dicom_node.ingest.indexer import Indexer
from dicom_node.ingest.instance import check_instance
from dicom_node.ingest.origin import OriginRules, job_output_lookup
from dicom_node.ingest.store import InstanceStore
from dicom_node.jobs.intake import JobIntake
from dicom_node.jobs.routing import JobPlan, PolicyRouter
from dicom_node.jobs.runner import JobRunner
from dicom_node.jobs.state import newer_job
from dicom_node.lab.simulate import SeriesHeader, ct_slice
from dicom_node.runtime import Runtime
from pipelines.base import EACH_SERIES_OPTION, InputInstance, InputRefused, RunEnvironment, StudyInput
from pipelines.stages import Context
from pipelines.steps import CT_CLASSES, SelectSeries
from pipelines.uids import UidFactory, job_key
from policies.engine import SeriesView, StudyView, decide
from policies.loader import PolicyError, load_policy, parse_policy
from tests.test_real_studies import dose_report_of

DEFAULT_POLICY = Path(__file__).resolve().parents[1] / "policies" / "default.yaml"
NODE_AE = "DICOMNODE"
SCANNER = "CT_SCANNER"
RULE = "low-dose-ct-restoration"


def per_study_policy() -> str:
    """The shipped policy with its low-dose rule's ``each: true`` taken out (one job per
    study, as before the option existed)."""
    text = DEFAULT_POLICY.read_text()
    line = "    select:\n      modality: CT\n      each: true\n"
    assert text.count(line) == 1
    return text.replace(line, "    select:\n      modality: CT\n")


# -- building the studies -----------------------------------------------------------------------
def _encoded(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    fp = DicomFileLike(buffer)
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return buffer.getvalue()


@dataclass(frozen=True)
class CtStudy:
    """One simulated study: its UIDs, and its series (by name) as data sets, in sending order."""

    study_uid: str
    frame_uid: str
    series: dict[str, list[Dataset]]

    def uid(self, name: str) -> str:
        return str(self.series[name][0].SeriesInstanceUID)

    def add(
        self,
        name: str,
        *,
        ctdi: float,
        description: str,
        number: int,
        slices: int = 4,
        first_slice: int = 0,
        kernel: str = "B30f",
        image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    ) -> None:
        """A CT series of ``slices`` slices (64², 2.5 mm), from slice ``first_slice`` of the
        acquisition on (the second half of a split series continues the first)."""
        header = SeriesHeader(
            study_uid=self.study_uid,
            series_uid=generate_uid(),
            frame_uid=self.frame_uid,
            series_number=number,
            patient_id="SIM-EACH-0001",
            series_description=description,
            ctdi_vol_mgy=ctdi,
            kernel=kernel,
            pixel_spacing_mm=5.0,
        )
        when = dt.datetime(2026, 12, 9, 10, 0)
        hu = np.full((64, 64), -1000.0)
        hu[12:52, 8:56] = 40.0
        datasets = []
        for k in range(first_slice, first_slice + slices):
            ds = ct_slice(hu, k, header, when)
            ds.ImageType = list(image_type)
            ds.InstanceNumber = k - first_slice + 1
            datasets.append(ds)
        self.series[name] = datasets

    def add_topogram(self, name: str = "scout", description: str = "Topogram 0.6 T20s") -> None:
        self.add(
            name,
            ctdi=0.13,
            description=description,
            number=1,
            slices=1,
            image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
        )

    def add_dose_report(self, name: str = "sr") -> None:
        """An X-Ray Radiation Dose SR (Modality SR, a bare container), as scanners send it."""
        self.series[name] = [dose_report_of(next(iter(self.series.values()))[0])]


def new_study() -> CtStudy:
    return CtStudy(generate_uid(), generate_uid(), {})


def two_kernels() -> CtStudy:
    """A low-dose chest CT: topogram, the axial acquisition reconstructed twice (soft-tissue
    kernel, lung kernel: two Series Instance UIDs, one CTDIvol), a Radiation Dose SR."""
    study = new_study()
    study.add_topogram()
    study.add("soft", ctdi=1.8, description="LDCT Thorax 2.5 B30f", number=2, kernel="B30f")
    study.add("lung", ctdi=1.8, description="LDCT Thorax 2.5 B70f lung", number=3, kernel="B70f")
    study.add_dose_report()
    return study


# -- an in-process node -------------------------------------------------------------------------
@dataclass
class Node:
    home: Path
    rt: Runtime
    store: InstanceStore

    def send(self, datasets: list[Dataset], calling_ae: str = SCANNER) -> None:
        for ds in datasets:
            data = _encoded(ds)
            sop = check_instance(data, ExplicitVRLittleEndian)[0]
            assert sop is not None
            self.store.put(
                data,
                ExplicitVRLittleEndian,
                claimed_sop_uid=sop.sop_instance_uid,
                calling_ae=calling_ae,
                peer_host="::1",
            )

    def send_study(self, study: CtStudy, *names: str) -> None:
        for name in names or tuple(study.series):
            self.send(study.series[name])

    def router(self, policy_text: str | None = None) -> PolicyRouter:
        path = self.home / "policy.yaml"
        if policy_text is not None:
            path.write_text(policy_text)
        loaded = load_policy(path, {"pacs", "tps"}, {"pacs"})
        return PolicyRouter(loaded, self.rt.paths.data, {"pacs": "PACS", "tps": "TPS"})

    def plan(self, study: CtStudy, policy_text: str | None = None) -> list[JobPlan]:
        with self.rt.db.read() as conn:
            study_id = conn.execute(
                select(t.studies.c.id).where(t.studies.c.study_uid == study.study_uid)
            ).scalar_one()
            _view, _decision, plans = self.router(policy_text).plan(conn, study_id)
        return plans

    def jobs(self) -> list[dict[str, Any]]:
        with self.rt.db.read() as conn:
            return [dict(r) for r in conn.execute(select(t.jobs).order_by(t.jobs.c.id)).mappings()]

    def inputs(self, job_id: int) -> set[str]:
        with self.rt.db.read() as conn:
            return set(
                conn.execute(
                    select(t.instances.c.sop_uid)
                    .join(t.job_inputs, t.job_inputs.c.instance_fk == t.instances.c.id)
                    .where(t.job_inputs.c.job_fk == job_id)
                ).scalars()
            )


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    home = tmp_path / "node"
    home.mkdir()
    (home / "dicom-node.toml").write_text(
        '[policy]\nfile = "policy.yaml"\n'
        + "".join(
            f'[{kind}.{name}]\nae_title = "{name.upper()}"\nhost = "127.0.0.1"\nport = 11112\n'
            for kind, name in (("destinations", "pacs"), ("destinations", "tps"), ("archives", "pacs"))
        )
    )
    (home / "policy.yaml").write_text(DEFAULT_POLICY.read_text())
    rt = Runtime.open(None, home)
    origin = OriginRules(NODE_AE, "1.2.826.0.1.3680043.10.999.", job_output_lookup(rt.db))
    store = InstanceStore(rt.paths, rt.db, Indexer(rt.db, rt.audit, gather_seconds=0.01), origin=origin)
    try:
        yield Node(home, rt, store)
    finally:
        store.close()
        rt.close()


def _same_plan_but_the_series(plans: list[JobPlan]) -> None:
    """Every field of the plans but ``series_uid`` is the rule's, the same for each."""
    first = {k: v for k, v in vars(plans[0]).items() if k != "series_uid"}
    for plan in plans[1:]:
        assert {k: v for k, v in vars(plan).items() if k != "series_uid"} == first


# -- routing by the shipped policy ----------------------------------------------------------------
def test_two_reconstructions_of_one_low_dose_acquisition_make_two_plans(node: Node) -> None:
    """The shipped rule made one job, on the larger reconstruction, and nothing said the
    other existed; now each reconstruction gets its own plan — never the topogram or the
    dose SR — with the rule's destinations, gate, QC limits, options and fallback."""
    study = two_kernels()
    node.send_study(study)
    plans = node.plan(study)
    assert [(p.rule, p.pipeline, p.series_uid) for p in plans] == [
        (RULE, "restoration", study.uid("soft")),
        (RULE, "restoration", study.uid("lung")),
    ]
    _same_plan_but_the_series(plans)
    assert (plans[0].destinations, plans[0].gate) == (["pacs"], "auto")
    assert plans[0].qc_policy["max_suspect_region_ml"] == 0.03


def test_an_acquisition_split_into_two_series_makes_two_plans(node: Node) -> None:
    """A scanner split one long low-dose acquisition into two Series Instance UIDs (slices
    0-3 and 4-7): the second half was never processed; both halves are now."""
    study = new_study()
    study.add_topogram()
    study.add("first", ctdi=2.4, description="LDCT Thorax-Abdomen 2.5", number=2)
    study.add("second", ctdi=2.4, description="LDCT Thorax-Abdomen 2.5", number=3, first_slice=4)
    node.send_study(study)
    plans = node.plan(study)
    assert [p.series_uid for p in plans] == [study.uid("first"), study.uid("second")]
    _same_plan_but_the_series(plans)


def test_a_full_dose_series_beside_a_low_dose_one_is_not_restored(node: Node) -> None:
    """Only the series that meets the rule's match conditions is taken: the larger
    full-dose series beside it (which the rule's select, the largest CT, used to pick)
    is not restored."""
    study = new_study()
    study.add_topogram()
    study.add("low", ctdi=1.5, description="Thorax 2.5 B30f", number=2, slices=4)
    study.add("full", ctdi=11.0, description="Thorax 2.5 B30f", number=3, slices=6)
    node.send_study(study)
    assert [p.series_uid for p in node.plan(study)] == [study.uid("low")]
    # a rule without each too: its select chooses among the series its match conditions met
    assert [p.series_uid for p in node.plan(study, per_study_policy())] == [study.uid("low")]


def test_without_each_a_rule_makes_one_plan_per_study_as_before(node: Node) -> None:
    """The same study, the shipped rule without ``each``: one plan, on the largest CT series
    (the lung kernel here), as before the option existed; with it, one per reconstruction."""
    study = new_study()
    study.add_topogram()
    study.add("soft", ctdi=1.8, description="LDCT Thorax 5.0 B30f", number=2, slices=3)
    study.add("lung", ctdi=1.8, description="LDCT Thorax 1.0 B70f", number=3, slices=5)
    study.add_dose_report()
    node.send_study(study)
    per_study = node.plan(study, per_study_policy())
    assert [(p.rule, p.series_uid) for p in per_study] == [(RULE, study.uid("lung"))]
    per_series = node.plan(study, DEFAULT_POLICY.read_text())
    assert [p.series_uid for p in per_series] == [study.uid("soft"), study.uid("lung")]
    assert per_series[0].options == {**per_study[0].options, EACH_SERIES_OPTION: True}
    assert {k: v for k, v in vars(per_study[0]).items() if k not in ("series_uid", "options")} == {
        k: v for k, v in vars(per_series[0]).items() if k not in ("series_uid", "options")
    }


def test_other_shipped_rules_stay_one_job_per_study() -> None:
    """sct makes one synthetic CT of a planning study; synthesis and prognosis read several
    series of the study together: only the low-dose rule takes each series."""
    rules = load_policy(DEFAULT_POLICY, {"pacs", "tps"}, {"pacs"}).policy.rules
    assert {r.name: r.per_series for r in rules} == {
        RULE: True,
        "mr-planning-sct": False,
        "brain-tumour-prognosis": False,
        "brain-mr-missing-flair": False,
    }


# -- the engine's choice of series ------------------------------------------------------------------
def _series(
    uid: str,
    description: str,
    attrs: Mapping[str, Any],
    *,
    modality: str = "CT",
    made_by_ai: bool = False,
) -> SeriesView:
    values = dict(attrs)
    return SeriesView(uid, modality, description, "CHEST", 4, values.get, made_by_ai=made_by_ai)


AXIAL = {"ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"]}
EACH_BY_DESCRIPTION = """\
mode: first-match
rules:
  - name: thorax-each
    priority: 10
    match: {modality: CT, series_description: "(?i)thorax"}
    select: {each: true}
    pipeline: forward
    destinations: [pacs]
  - name: every-ct
    match: {modality: CT}
    pipeline: forward
    destinations: [pacs]
"""


RULE_HEAD = "name: r, pipeline: forward, destinations: [pacs]"


def _parse(text: str) -> Any:
    return parse_policy(text, Path("p.yaml"), known_destinations={"pacs"})


def test_a_localizer_or_an_ai_output_is_never_taken_even_when_it_meets_the_conditions() -> None:
    """A rule matching by description alone would meet a topogram described "Thorax" (the
    engine refuses localizers only for attribute conditions) and another AI node's output:
    neither is taken; the two acquired reconstructions are, in the study's order."""
    view = StudyView(
        "1.2.3",
        SCANNER,
        NODE_AE,
        (
            _series("scout", "Thorax Topogram", {"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]}),
            _series("soft", "Thorax 2.5 B30f", AXIAL),
            _series("ai", "Thorax denoised (AI)", AXIAL, made_by_ai=True),
            _series("lung", "Thorax 1.0 B70f", AXIAL),
        ),
    )
    (verdict,) = decide(_parse(EACH_BY_DESCRIPTION), view).chosen
    assert verdict.rule.name == "thorax-each"
    assert verdict.each_series == ("soft", "lung")
    assert verdict.series_uid == "soft"


def test_a_rule_that_takes_each_series_but_finds_none_does_not_match() -> None:
    """Only a localizer meets the rule: it takes nothing, so it does not match (the next
    rule of a first-match policy decides), and the condition that failed says why."""
    view = StudyView(
        "1.2.3",
        SCANNER,
        NODE_AE,
        (
            _series("scout", "Thorax Topogram", {"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]}),
            _series("head", "Head 5.0", AXIAL),
        ),
    )
    decision = decide(_parse(EACH_BY_DESCRIPTION), view)
    assert [v.rule.name for v in decision.chosen] == ["every-ct"]
    each = decision.verdicts[0]
    assert not each.matched and each.each_series == ()
    assert each.deciding is not None
    assert each.deciding.condition.startswith("select.each:")
    assert each.deciding.seen == "scout: a localizer"


# -- validation --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("rule", "problem"),
    [
        pytest.param(
            "{select: {each: true}}",
            "p.yaml:3: rules[0]: select.each: one job per series needs conditions that say which series",
            id="each-without-any-series-condition",
        ),
        pytest.param(
            "{match: {calling_ae: CT1}, select: {each: true}}",
            "p.yaml:3: rules[0]: select.each: one job per series needs conditions that say which series",
            id="each-with-study-conditions-only",
        ),
        pytest.param(
            "{match: {modality: CT}, select: {each: sometimes}}",
            "p.yaml:3: rules[0].select.each: Input should be a valid boolean",
            id="each-not-true-or-false",
        ),
    ],
)
def test_a_rule_taking_each_series_must_say_which(rule: str, problem: str) -> None:
    with pytest.raises(PolicyError) as caught:
        _parse(f"mode: first-match\nrules:\n  - {{{RULE_HEAD}, {rule[1:]}\n")
    (line,) = caught.value.problems
    assert line.startswith(problem), line


@pytest.mark.parametrize(
    "rule",
    [
        "{name: r, pipeline: forward, destinations: [pacs], match: {modality: CT}, select: {each: true}}",
        "{name: r, pipeline: forward, destinations: [pacs], select: {modality: CT, each: true}}",
        "{name: r, pipeline: forward, destinations: [pacs], select: {series_description: x, each: false}}",
    ],
)
def test_each_with_series_conditions_in_match_or_select_loads(rule: str) -> None:
    (loaded,) = _parse(f"mode: first-match\nrules:\n  - {rule}\n").rules
    assert loaded.per_series == ("each: true" in rule)


# -- intake: job rows, versions, supersession, audit --------------------------------------------------
def test_intake_makes_one_job_per_series_of_one_study_version_and_audits_which(node: Node) -> None:
    """Two job rows for one study version, on the two reconstructions, each with the whole
    snapshot as input (as any job); distinct output UIDs (they derive from the job id and
    its inputs); the study-ready record names the series each job took."""
    study = two_kernels()
    node.send_study(study)
    intake = JobIntake(node.rt.db, node.rt.audit, node.router())
    job_ids = intake.study_ready(study.study_uid)
    jobs = node.jobs()
    assert [j["id"] for j in jobs] == job_ids and len(job_ids) == 2
    assert [(j["study_version"], j["rule"], j["series_uid"]) for j in jobs] == [
        (1, RULE, study.uid("soft")),
        (1, RULE, study.uid("lung")),
    ]
    same = ("pipeline", "destinations", "gate", "qc_policy", "options", "priors", "state")
    assert {k: jobs[0][k] for k in same} == {k: jobs[1][k] for k in same}
    assert node.inputs(job_ids[0]) == node.inputs(job_ids[1])
    outputs = {
        UidFactory("2.25.", job_key(job_id, node.inputs(job_id))).series("restored") for job_id in job_ids
    }
    assert len(outputs) == 2

    (ready,) = node.rt.audit.events(AuditEvent.STUDY_READY)
    assert ready.facts["jobs"] == job_ids
    assert ready.facts["job_series"] == [
        {"job_id": job_ids[0], "rule": RULE, "series_uid": study.uid("soft"), "urgency": "normal"},
        {"job_id": job_ids[1], "rule": RULE, "series_uid": study.uid("lung"), "urgency": "normal"},
    ]
    routed = [e for e in node.rt.audit.events(AuditEvent.GATE_DECISION) if e.facts.get("stage") == "routing"]
    assert [(e.facts["job_id"], e.facts["series_uid"]) for e in routed] == [
        (job_ids[0], study.uid("soft")),
        (job_ids[1], study.uid("lung")),
    ]


def test_a_resend_opens_new_version_jobs_for_every_series_and_supersedes_the_old(node: Node) -> None:
    """An instance arriving after the study was routed opens version 2: both series get a
    version-2 job, and a worker settles both version-1 jobs unrun (superseded), as it does a
    single job, then runs the version-2 jobs."""
    study = two_kernels()
    node.send_study(study)
    router = node.router()
    first = JobIntake(node.rt.db, node.rt.audit, router).study_ready(study.study_uid)
    study.add("late", ctdi=1.8, description="LDCT Thorax 2.5 B30f", number=2, slices=1, first_slice=4)
    late = study.series.pop("late")[0]
    late.SeriesInstanceUID = study.uid("soft")  # the soft-tissue series' missing fifth slice
    node.send([late])
    second = JobIntake(node.rt.db, node.rt.audit, router).study_ready(study.study_uid)
    assert len(first) == len(second) == 2
    by_id = {j["id"]: j for j in node.jobs()}
    assert [(by_id[i]["study_version"], by_id[i]["series_uid"]) for i in second] == [
        (2, study.uid("soft")),
        (2, study.uid("lung")),
    ]
    assert late.SOPInstanceUID in node.inputs(second[0]) and late.SOPInstanceUID not in node.inputs(first[0])

    config = NodeConfig()
    rt = node.rt
    runner = JobRunner(config, rt.paths, rt.db, rt.audit, "test-worker", DestinationProfiles(config))
    claimed = []
    while (job := runner.claim()) is not None:
        claimed.append((job.job_id, job.series_uid))
    assert claimed == [(second[0], study.uid("soft")), (second[1], study.uid("lung"))]
    states = {j["id"]: (j["state"], j["runs"]) for j in node.jobs()}
    assert [states[i] for i in first] == [("superseded", 0), ("superseded", 0)]
    # each version-1 job names the version-2 job of its own series (a reviewer of a held
    # one is sent to the job that replaces it, not to the other kernel's)
    with node.rt.db.read() as conn:
        for old, new in zip(first, second, strict=True):
            row = conn.execute(select(t.jobs).where(t.jobs.c.id == old)).one()
            assert newer_job(conn, row).id == new


def test_job_listings_say_which_series_each_job_takes(node: Node) -> None:
    study = two_kernels()
    node.send_study(study)
    made = JobIntake(node.rt.db, node.rt.audit, node.router()).study_ready(study.study_uid)
    listed = {j["id"]: j["series_uid"] for j in queries.list_jobs(node.rt.db)}
    assert [listed[i] for i in made] == [study.uid("soft"), study.uid("lung")]
    numbered = {j["id"]: (j["series_number"], j["series_description"]) for j in queries.list_jobs(node.rt.db)}
    assert [numbered[i] for i in made] == [(2, "LDCT Thorax 2.5 B30f"), (3, "LDCT Thorax 2.5 B70f lung")]
    node.store.close()
    node.rt.close()

    # the text table names each job's series as a person finds it on the scanner
    result = CliRunner().invoke(app, ["jobs", "--home", str(node.home)], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    rows = {line.split("│")[1].strip(): line for line in result.output.splitlines() if line.count("│") > 5}
    assert "#2 'LDCT Thorax 2.5 B30f'" in rows[str(made[0])]
    assert "#3 'LDCT Thorax 2.5 B70f lung'" in rows[str(made[1])]


def test_a_per_series_job_never_takes_another_series_than_its_own(tmp_path: Path) -> None:
    """A per-series job whose series holds nothing its pipeline processes (e.g. a screen
    capture the rule's description matched) is refused; choosing another series, as a
    one-per-study job may, would restore a series that already has its own job."""

    def instance(name: str, series: str, sop_class: str) -> InputInstance:
        ds = Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID, ds.SeriesInstanceUID = sop_class, generate_uid(), series
        path = tmp_path / f"{name}.dcm"
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.save_as(path, enforce_file_format=True)
        return InputInstance(ds.SOPInstanceUID, series, sop_class, ExplicitVRLittleEndian, path, "")

    ct_uid, sc_uid = generate_uid(), generate_uid()
    ct = [instance(f"ct{k}", ct_uid, "1.2.840.10008.5.1.4.1.1.2") for k in range(2)]
    screen = instance("sc", sc_uid, "1.2.840.10008.5.1.4.1.1.7")
    study = StudyInput(1, "1.2.3", 1, (*ct, screen), series_uid=sc_uid, options={EACH_SERIES_OPTION: True})
    ctx = Context(study=study, env=RunEnvironment(workdir=tmp_path))
    with pytest.raises(InputRefused, match="made this job for this series .* holds no CT image"):
        SelectSeries(CT_CLASSES, what="CT").run(ctx)
    one_per_study = StudyInput(1, "1.2.3", 1, (*ct, screen), series_uid=sc_uid)
    chosen = SelectSeries(CT_CLASSES, what="CT").run(
        Context(study=one_per_study, env=RunEnvironment(workdir=tmp_path))
    )
    assert {i.series_uid for i in chosen.series} == {ct_uid}  # a one-per-study job still chooses


def test_a_study_sent_by_the_destination_is_skipped_once_per_rule_not_once_per_series(node: Node) -> None:
    """The PACS sent the study: no job, and the skipped destination is audited once for the
    rule (its two series would make two plans)."""
    study = two_kernels()
    for name in study.series:
        node.send(study.series[name], calling_ae="PACS")
    plans = node.plan(study)
    assert [(p.series_uid, p.destinations, p.skipped_destinations) for p in plans] == [
        (study.uid("soft"), [], (("pacs", "PACS"),)),
        (study.uid("lung"), [], (("pacs", "PACS"),)),
    ]
    assert JobIntake(node.rt.db, node.rt.audit, node.router()).study_ready(study.study_uid) == []
    assert node.jobs() == []
    (skipped,) = node.rt.audit.events(AuditEvent.RETURN_TO_SENDER_SKIPPED)
    assert (skipped.facts["rule"], skipped.facts["destination"]) == (RULE, "pacs")
    (not_routed,) = node.rt.audit.events(AuditEvent.STUDY_NOT_ROUTED)
    assert not_routed.facts["reason"] == "every matching rule's destinations are the AE that sent the study"


# -- dicom-node policy explain ------------------------------------------------------------------------
def test_policy_explain_shows_each_series_the_rule_takes_and_the_jobs_made(node: Node) -> None:
    study = two_kernels()
    node.send_study(study)
    JobIntake(node.rt.db, node.rt.audit, node.router()).study_ready(study.study_uid)
    node.store.close()
    node.rt.close()
    home = str(node.home)

    result = CliRunner().invoke(app, ["policy", "explain", study.study_uid, "--home", home])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    soft, lung = study.uid("soft"), study.uid("lung")
    assert "takes each of 2 series (select.each), one job per series:" in text
    assert (
        f"rule {RULE}: run restoration on each of 2 series, one job each: "
        f"{soft} (CT 'LDCT Thorax 2.5 B30f'); {lung} (CT 'LDCT Thorax 2.5 B70f lung'), then pacs"
    ) in text
    assert f"(v1) restoration on series {soft}: queued" in text
    assert f"(v1) restoration on series {lung}: queued" in text

    as_json = CliRunner().invoke(app, ["policy", "explain", study.study_uid, "--home", home, "--json"])
    assert as_json.exit_code == 0, as_json.output
    data = json.loads(as_json.output)
    (rule,) = [r for r in data["rules"] if r["rule"] == RULE]
    assert rule["each_series"] == [soft, lung]
    assert [p["series_uid"] for p in data["plans"]] == [soft, lung]
    assert sorted(j["series_uid"] for j in data["jobs"]) == sorted([soft, lung])

    checked = CliRunner().invoke(app, ["policy", "check", str(DEFAULT_POLICY), "--home", home])
    assert checked.exit_code == 0, checked.output
    assert f"{RULE}: restoration (one job per series, select.each) → pacs" in checked.output
