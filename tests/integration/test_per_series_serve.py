"""One restoration job per reconstruction, end to end, with the shipped policy.

A SIMULATED low-dose chest CT, as a scanner sends it — a topogram, the axial acquisition
reconstructed twice (a soft-tissue kernel and a lung kernel: two Series Instance UIDs, one
CTDIvol below the rule's 5 mGy) and a Radiation Dose SR — goes by ``/usr/bin/storescu`` to a
real ``dicom-node serve`` routing by ``policies/default.yaml``. Its rule
``low-dose-ct-restoration`` takes each series (``select: {each: true}``): two restoration
jobs, one per reconstruction, both delivered (gate ``auto``) to an Orthanc as ``pacs``,
every output derived from its own job's series and none from the topogram, no output
series delivered twice, and the audit chain verifies.

The two reconstructions come from one simulated acquisition (:func:`models.sim.ldct.make_case`,
same seed and levels, so the same anatomy and quantum noise), filtered back-projected with a
smoother (Shepp-Logan) and a sharp (ramp) filter, written as CT headers by
:func:`dicom_node.lab.simulate.ct_slice`: 5 slices of 160², 2.5 mm pixels, inside
``ldct-restoration``'s input domain, with input noise (about 9-10 and 13-14 HU) inside its
calibrated range (4.4-20.9 HU), so the learned model runs on both and not the classical
baseline (a Hann-filtered series, about 2.5 HU, would get the baseline).
"""

from __future__ import annotations

import datetime as dt
import io
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicom_node.lab.simulate import SeriesHeader, ct_slice
from models.sim.ldct import make_case
from pipelines.provenance import provenance_of
from pipelines.writers import kind_of
from tests.conftest import db_rows, node_config, require
from tests.peers import STORESCU, NodeProcess, Orthanc, free_port, storescu
from tests.test_real_studies import dose_report_of

pytestmark = pytest.mark.integration

DEFAULT_POLICY = Path(__file__).resolve().parents[2] / "policies" / "default.yaml"
RULE = "low-dose-ct-restoration"
SCANNER = "CT_SCANNER"
PATIENT_ID = "SIM-EACH-SERVE-0001"
CTDI_VOL = 1.8  # mGy: the shipped rule restores CT under 5
SLICES, SIZE, SEED = 5, 160, 41
#: 512²'s chest pixels (0.78 mm), which the restoration model admits: a targeted reconstruction.
FOV_MM = 400.0 * SIZE / 512


@dataclass
class SentStudy:
    """The study as written to disk: series name → its files and UIDs."""

    study_uid: str
    frame_uid: str
    files: dict[str, list[Path]] = field(default_factory=dict)
    series_uid: dict[str, str] = field(default_factory=dict)
    sop_uids: dict[str, set[str]] = field(default_factory=dict)

    def record(self, name: str, out: Path, datasets: list[Dataset]) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.files[name] = []
        for n, ds in enumerate(datasets, 1):
            path = out / f"{name}-{n:03d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            self.files[name].append(path)
        self.series_uid[name] = str(datasets[0].SeriesInstanceUID)
        self.sop_uids[name] = {str(ds.SOPInstanceUID) for ds in datasets}

    def all_files(self) -> list[Path]:
        return [p for files in self.files.values() for p in files]


def _header(study_uid: str, frame_uid: str, **kw: Any) -> SeriesHeader:
    fields: dict[str, Any] = {
        "patient_id": PATIENT_ID,
        "study_description": "SIMULATED LDCT THORAX",
        "body_part": "CHEST",
        "ctdi_vol_mgy": CTDI_VOL,
        **kw,
    }
    return SeriesHeader(study_uid=study_uid, series_uid=generate_uid(), frame_uid=frame_uid, **fields)


def _dose_report(first: Dataset) -> Dataset:
    """An X-Ray Radiation Dose SR (Modality SR, a bare container), as scanners send it
    (:func:`tests.test_real_studies.dose_report_of`), with its file meta."""
    ds = dose_report_of(first)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    return ds


def write_two_kernel_study(out: Path) -> SentStudy:
    """Topogram, soft-tissue (B30f) and lung (B70f) reconstructions of one low-dose
    acquisition, and a dose SR — SIMULATED."""
    study_uid, frame_uid = generate_uid(), generate_uid()
    when = dt.datetime(2026, 12, 9, 10, 0)
    study = SentStudy(study_uid, frame_uid)
    levels = [0.3 + 0.4 * (k + 0.5) / SLICES for k in range(SLICES)]

    scout_hu = make_case("chest", SEED, size=SIZE, dose=0.25, level=0.5).low_dose_hu
    scout = ct_slice(
        scout_hu,
        0,
        _header(study_uid, frame_uid, series_number=1, series_description="Topogram 0.6 T20s",
                ctdi_vol_mgy=0.13, kernel="T20s", pixel_spacing_mm=2.5),
        when,
    )  # fmt: skip
    scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    study.record("scout", out / "scout", [scout])

    for name, number, description, kernel, fbp_filter in (
        ("soft", 2, "LDCT Thorax 2.5 B30f", "B30f", "shepp-logan"),
        ("lung", 3, "LDCT Thorax 1.0 B70f", "B70f", "ramp"),
    ):
        cases = [
            make_case("chest", SEED, size=SIZE, dose=0.25, level=level, filter_name=fbp_filter, fov_mm=FOV_MM)
            for level in levels
        ]
        header = _header(
            study_uid,
            frame_uid,
            series_number=number,
            series_description=description,
            kernel=kernel,
            pixel_spacing_mm=float(cases[0].pixel_mm),
        )
        study.record(
            name, out / name, [ct_slice(c.low_dose_hu, k, header, when) for k, c in enumerate(cases)]
        )

    first = pydicom.dcmread(study.files["soft"][0], stop_before_pixels=True)
    study.record("sr", out / "sr", [_dose_report(first)])
    return study


def _jobs_settled(node: NodeProcess) -> list[tuple[Any, ...]]:
    rows = db_rows(node, "select id, state from jobs order by id")
    final = {"delivered", "failed", "refused", "held", "superseded"}
    return rows if rows and all(state in final for _, state in rows) else []  # made together


def test_two_reconstructions_get_a_restoration_job_each_delivered_to_orthanc(
    tmp_path: Path, orthanc: Orthanc
) -> None:
    require(STORESCU)
    study = write_two_kernel_study(tmp_path / "study")
    assert DEFAULT_POLICY.read_text().count("      each: true\n") == 1  # the shipped rule takes each series
    config = (
        node_config(orthanc, stable_seconds=1.0)
        + f"""
[destinations.tps]
ae_title = "NO_TPS"
host = "127.0.0.1"
port = {free_port()}
profile = "tps"

[archives.pacs]
ae_title = "{orthanc.aet}"
host = "127.0.0.1"
port = {orthanc.dicom_port}
"""
    )
    node = NodeProcess(tmp_path / "node", config, policy=DEFAULT_POLICY.read_text()).start()
    try:
        sent = storescu(study.all_files(), node.port, node.ae_title, calling=SCANNER)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        node.wait_for(lambda: _jobs_settled(node), timeout=240, what="both jobs settled")
        time.sleep(1.5)  # a third job, were one wrongly made, would have appeared by now

        # -- the jobs: one per reconstruction, of one study version, both delivered
        jobs = node.cli_json("jobs", "--study", study.study_uid)
        assert len(jobs) == 2, jobs
        assert node.cli_json("jobs") == jobs  # no job of any other study or rule
        assert {j["rule"] for j in jobs} == {RULE}
        assert {j["pipeline"] for j in jobs} == {"restoration"}
        assert {j["state"] for j in jobs} == {"delivered"}, [(j["id"], j["state"], j["reason"]) for j in jobs]
        assert len({j["study_version"] for j in jobs}) == 1
        assert sorted(j["series_uid"] for j in jobs) == sorted(
            [study.series_uid["soft"], study.series_uid["lung"]]
        )
        assert all(j["destinations"] == ["pacs"] and j["gate"] == "auto" for j in jobs)
        name_of = {study.series_uid[n]: n for n in study.series_uid}
        job_series = {j["id"]: name_of[j["series_uid"]] for j in jobs}  # job id → "soft" / "lung"
        every_sop = set().union(*study.sop_uids.values())
        for job_id in job_series:  # a job's inputs are the study version's snapshot, the same for both
            inputs = db_rows(
                node,
                "select i.sop_uid from job_inputs ji join instances i on i.id = ji.instance_fk"
                " where ji.job_fk = ?",
                (job_id,),
            )
            assert {r[0] for r in inputs} == every_sop, job_id

        # -- the outputs: per job, its own series; one delivery each, sent once
        outputs = db_rows(node, "select job_fk, series_uid, sop_uid from job_outputs")
        output_series: dict[str, int] = {}
        for job_id, series_uid, _ in outputs:
            assert output_series.setdefault(series_uid, job_id) == job_id, "an output series of two jobs"
        assert set(output_series.values()) == set(job_series)
        sops_per_series = Counter(series_uid for _, series_uid, _ in outputs)
        job_output_sops: dict[int, set[str]] = {job_id: set() for job_id in job_series}
        for job_id, _, sop_uid in outputs:
            job_output_sops[job_id].add(sop_uid)
        deliveries = db_rows(node, "select id, job_fk, series_uid, destination, state from deliveries")
        assert sorted((job, s) for _, job, s, _, _ in deliveries) == sorted(
            (job, s) for s, job in output_series.items()
        )  # one delivery per output series, to pacs alone
        assert {(d, st) for _, _, _, d, st in deliveries} == {("pacs", "delivered")}
        for delivery_id, _, series_uid, _, _ in deliveries:
            attempts = db_rows(
                node,
                "select outcome, instances_sent from delivery_attempts where delivery_fk = ?",
                (delivery_id,),
            )
            assert sum(sent for _, sent in attempts) == sops_per_series[series_uid], (series_uid, attempts)

        # -- Orthanc: under the study, exactly the outputs of the two jobs (no original, no
        # series twice), each derived from its own job's reconstruction, none from the topogram
        in_pacs = orthanc.series_of_study(study.study_uid)
        uids_in_pacs = [s["MainDicomTags"]["SeriesInstanceUID"] for s in in_pacs]
        assert len(uids_in_pacs) == len(set(uids_in_pacs)) == len(output_series)
        assert set(uids_in_pacs) == set(output_series)
        assert not set(uids_in_pacs) & set(study.series_uid.values())
        assert orthanc.statistics()["CountInstances"] == len(outputs)

        restored_from: dict[str, str] = {}  # reconstruction name → its restored CT series
        cited_by_restored: dict[str, set[str]] = {"soft": set(), "lung": set()}
        modalities_per_job: dict[int, Counter[str]] = {job_id: Counter() for job_id in job_series}
        for series in in_pacs:
            series_uid = series["MainDicomTags"]["SeriesInstanceUID"]
            job_id = output_series[series_uid]
            name = job_series[job_id]  # the reconstruction this job took
            own_series = {uid for uid, job in output_series.items() if job == job_id}
            modalities_per_job[job_id][series["MainDicomTags"].get("Modality", "")] += 1
            assert len(series["Instances"]) == sops_per_series[series_uid]
            for orthanc_id in series["Instances"]:
                ds = pydicom.dcmread(io.BytesIO(orthanc.instance_file(orthanc_id)))
                facts = provenance_of(ds)
                what = (kind_of(ds), name)
                assert facts["pipeline"] == "restoration", what
                assert facts["model_name"] == "ldct-restoration", what  # the model, not the baseline
                assert facts["study_instance_uid"] == study.study_uid, what
                # the sources: slices of this job's reconstruction (and, for an overlay or the
                # report, this job's own outputs) — never the other one's, never the topogram
                sources = set(facts["source_sop_instance_uids"])
                acquired = sources - job_output_sops[job_id]
                assert acquired and acquired <= study.sop_uids[name], (*what, sources)
                assert not sources & study.sop_uids["scout"], what
                assert set(facts["source_series_instance_uids"]) - own_series <= {study.series_uid[name]}, (
                    what
                )
                if kind_of(ds) == "derived":
                    assert ds.Modality == "CT" and ds.ImageType[0] == "DERIVED", what
                    assert ds.FrameOfReferenceUID == study.frame_uid, what
                    referenced = {str(i.ReferencedSOPInstanceUID) for i in ds.SourceImageSequence}
                    assert referenced and referenced <= study.sop_uids[name], what
                    cited_by_restored[name] |= referenced
                    assert restored_from.setdefault(name, series_uid) == series_uid, what
        assert set(restored_from) == {"soft", "lung"}
        assert restored_from["soft"] != restored_from["lung"]
        for name, series_uid in restored_from.items():  # one restored slice per acquired slice
            assert sops_per_series[series_uid] == len(study.files[name]), name
            assert cited_by_restored[name] == study.sop_uids[name], name
        first, second = modalities_per_job.values()
        assert first == second, modalities_per_job  # the same outputs for each reconstruction
        assert (first["CT"], first["SEG"], first["SR"]) == (1, 1, 1), first

        # -- the audit chain
        verified = node.cli("audit", "verify")
        assert verified.returncode == 0, verified.stdout + verified.stderr
    finally:
        node.stop()
