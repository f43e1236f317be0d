"""Every output object of a job files under its source's patient and study: it carries
every Patient, Clinical Trial Subject, General Study, Patient Study and Clinical Trial
Study attribute its source has, with the source's value, never a prior study's, and
states its own dates and times in the zone the source's Timezone Offset From UTC names.

Found by running a study whose headers carry what hospital and trial sources send (issuer
qualifiers, other patient IDs, accession issuer, consulting physician, medical alerts,
admission ID, the trial's subject issuer, Ethnic Group, an offset from UTC, ...) through
every writer: the derived images and the Spatial Registration object copied 55 of the
103 attributes of those modules, while the Parametric Maps, SEG, overlay and report of the
same job carry all (so the outputs of one job disagreed on the patient: the issuer of
the trial subject ID, consulting physician, medical alerts, admission ID, ...), every
output dropped Ethnic Group, and
none carried the Timezone Offset From UTC, so a PACS read the copied Study Date and Time
in its own zone while each output stamped its creation in the node's.
"""

from __future__ import annotations

import datetime as dt
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from highdicom._standard_utils import get_module_attribute_map
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.valuerep import DA, DT, TM

from dicom_node.lab.simulate import write_ct_series
from models.sim.phantom import PhantomSpec
from pipelines.base import GateOutcome
from pipelines.registration import Registration, RegistrationQuality, RegistrationSettings
from pipelines.uids import UidFactory
from pipelines.volume import Volume, load_series
from pipelines.writers import (
    KIND_REPORT,
    DerivedImageWriter,
    ProbabilityMapWriter,
    SpatialRegistrationWriter,
    TumourExtentWriter,
    kind_of,
    save,
)
from pipelines.writers.report import restate_verdict
from tests.test_writers import PROVENANCE, write_case

#: The modules whose attributes file an object under a patient and a study.
MODULES = ("patient", "clinical-trial-subject", "general-study", "patient-study", "clinical-trial-study")
#: Their top-level attributes, as highdicom's tables of the standard list them, and Ethnic
#: Group, which those tables no longer list but sources send.
MODULE_KEYWORDS = (
    *dict.fromkeys(a["keyword"] for m in MODULES for a in get_module_attribute_map()[m] if not a["path"]),
    "EthnicGroup",
    "LongitudinalTemporalInformationModified",  # SOP Common: were the copied dates shifted?
)
#: The one Error line that dicom3tools builds older than Synthetic Data (0008,001C) give.
STALE_SYNTHETIC_DATA = "Error - </(0008,001c)>"


def _item(**values: object) -> Dataset:
    ds = Dataset()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


@dataclass(frozen=True)
class Visit:
    """What differs between two studies of one patient."""

    description: str
    accession: str
    study_id: str
    date: str
    age: str
    weight: str


CURRENT = Visit("CT Thorax nativ", "ACC-2024-0311", "S77", "20240311", "054Y", "81.5")
PRIOR = Visit("CT Thorax KM", "ACC-2023-0902", "S41", "20230902", "053Y", "84")


def _real_world(
    ds: Dataset, visit: Visit, charset: str | list[str], name: str, offset: str | None
) -> Dataset:
    """``ds`` with the Patient and Study attributes hospital and trial sources send."""
    ds.SpecificCharacterSet = charset
    ds.PatientName = name
    ds.PatientID = "PID-4711"
    ds.IssuerOfPatientID = "HOSPITAL-A"
    ds.IssuerOfPatientIDQualifiersSequence = [
        _item(UniversalEntityID="1.2.276.0.7230010.3", UniversalEntityIDType="ISO", IdentifierTypeCode="MR")
    ]
    ds.OtherPatientIDsSequence = [
        _item(PatientID="OTHER-7", IssuerOfPatientID="HOSPITAL-B", TypeOfPatientID="TEXT")
    ]
    ds.PatientBirthDate, ds.PatientSex = "19700101", "M"
    ds.PatientAge, ds.PatientSize, ds.PatientWeight = visit.age, "1.78", visit.weight
    ds.PatientComments = "Allergic to iodinated contrast"
    ds.EthnicGroup = "EURO"
    ds.LongitudinalTemporalInformationModified = "MODIFIED"
    ds.PatientIdentityRemoved = "NO"
    ds.AccessionNumber = visit.accession
    ds.IssuerOfAccessionNumberSequence = [
        _item(
            LocalNamespaceEntityID="RIS-A",
            UniversalEntityID="1.2.276.0.7230010.9",
            UniversalEntityIDType="ISO",
        )
    ]
    ds.StudyID = visit.study_id
    ds.StudyDescription = visit.description
    ds.StudyDate, ds.StudyTime = visit.date, "101500"
    ds.ReferringPhysicianName = "Schmidt^Anna^^Dr."
    ds.ConsultingPhysicianName = "Weber^Paul"
    ds.PhysiciansOfRecord = "Koch^Eva"
    ds.MedicalAlerts = "Pacemaker"
    ds.Allergies = "Iodine"
    ds.AdmissionID = "ADM-5"
    ds.IssuerOfAdmissionIDSequence = [_item(LocalNamespaceEntityID="ADT-A")]
    ds.ReasonForVisit = "Follow-up"
    ds.PatientState = "stable"
    ds.ClinicalTrialSponsorName = "Sponsor X"
    ds.ClinicalTrialProtocolID = "PROT-1"
    ds.ClinicalTrialProtocolName = "Protocol one"
    ds.ClinicalTrialSiteID = "SITE-3"
    ds.ClinicalTrialSiteName = "Site three"
    ds.ClinicalTrialSubjectID = "SUBJ-9"
    ds.IssuerOfClinicalTrialSubjectID = "SPONSOR-X"
    ds.ClinicalTrialTimePointID = "TP-2"
    ds.RequestAttributesSequence = [
        _item(RequestedProcedureID="RP-1", ScheduledProcedureStepID="SPS-1", AccessionNumber=visit.accession)
    ]
    if offset is not None:
        ds.TimezoneOffsetFromUTC = offset
    return ds


def _study(folder: Path, visit: Visit, charset: str | list[str], name: str, offset: str | None) -> Volume:
    """A small simulated CT series of its own study, with real-world headers, written and
    read back (the values are what pydicom decodes from the bytes)."""
    study = write_ct_series(folder / "sim", PhantomSpec(rows=64, columns=64, slices=6, seed=3))
    paths = []
    for k, path in enumerate(study.files):
        ds = _real_world(pydicom.dcmread(path), visit, charset, name, offset)
        paths.append(folder / f"{k}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    return load_series([pydicom.dcmread(p) for p in paths])


def _registration(current: Volume, prior: Volume) -> Registration:
    """A registration of ``prior`` to ``current`` (a 4 mm shift), as the writer reads one."""
    matrix = np.eye(4)
    matrix[:3, 3] = (4.0, 0.0, 0.0)
    return Registration(
        mode="rigid",
        matrix=matrix,
        current_series_uid=current.series_uid,
        current_frame_of_reference_uid=current.frame_of_reference_uid,
        prior_series_uid=prior.series_uid,
        prior_frame_of_reference_uid=prior.frame_of_reference_uid,
        resampled=np.zeros(current.array.shape, np.float32),
        resampled_fov=np.ones(current.array.shape, bool),
        mutual_information=0.8,
        dice=0.95,
        overlap=1.0,
        quality_ok=True,
        quality_reason="",
        quality=RegistrationQuality(),
        settings=RegistrationSettings(),
    )


def _every_output(current: Volume, prior: Volume, out: Path) -> list[Path]:
    """Every kind of object the pipelines write for ``current`` (with ``prior`` registered
    to it): derived images, Parametric Maps, SEGs, overlay, report, Spatial Registration,
    and the node's restatement of the report."""
    case = write_case("identity", current, out)
    uids = UidFactory("2.25.", "identity")
    p = np.clip(case.score / (np.abs(case.score).max() + 1.0) + 0.5, 0.0, 1.0).astype(np.float32)
    more = [
        ProbabilityMapWriter(provenance=PROVENANCE, uids=uids, series_number=930, what="tumour").write(
            current, p
        ),
        TumourExtentWriter(provenance=PROVENANCE, uids=uids, series_number=931, description="extent").write(
            current, [("predicted extent", p >= 0.5), ("current extent", case.mask)]
        ),
        SpatialRegistrationWriter(provenance=PROVENANCE, uids=uids, series_number=990).write(
            _registration(current, prior), current, prior
        ),
    ]
    report = next(
        pydicom.dcmread(path) for path in case.paths if kind_of(pydicom.dcmread(path)) == KIND_REPORT
    )
    restated = restate_verdict(report, GateOutcome("release", ("within limits",), final=True))
    return [*case.paths, *save(more, out), *save([restated], out / "restated")]


#: A value of each VR, for a source that carries every attribute of the modules.
_VALUES = {
    "PN": "Doe^Jane", "DA": "20200101", "TM": "101010", "DT": "20200101101010", "DS": "1.5",
    "IS": "1", "AS": "050Y", "US": 1, "UL": 1, "SL": 1, "SS": 1, "FL": 1.0, "FD": 1.0, "CS": "YES",
    "UI": "1.2.3.4", "UR": "http://example.org",
}  # fmt: skip


def _carrying_every_attribute(volume: Volume) -> Volume:
    """``volume`` with every attribute of :data:`MODULE_KEYWORDS` set on every header."""
    datasets = []
    for original in volume.datasets:
        ds = original.copy()
        for keyword in MODULE_KEYWORDS:
            if keyword in ds:
                continue
            vr = dictionary_VR(keyword)
            ds[keyword] = DataElement(
                keyword, vr, [_item(CodeMeaning="x")] if vr == "SQ" else _VALUES.get(vr, "text")
            )
        datasets.append(ds)
    return load_series(datasets)


def test_the_pydicom_built_outputs_copy_every_attribute_of_the_modules(tmp_path: Path) -> None:
    """highdicom copies every attribute its tables list into the objects it builds; the
    derived images and the Spatial Registration object must copy no fewer."""
    current = _carrying_every_attribute(_study(tmp_path / "current", CURRENT, "ISO_IR 192", "Doe^Jane", None))
    prior = _study(tmp_path / "prior", PRIOR, "ISO_IR 192", "Doe^Jane", None)
    uids = UidFactory("2.25.", "every-attribute")
    derived = DerivedImageWriter(
        provenance=PROVENANCE, uids=uids, series_number=901, series_description="denoised CT"
    ).write(current, current.array)
    registration = SpatialRegistrationWriter(provenance=PROVENANCE, uids=uids, series_number=990).write(
        _registration(current, prior), current, prior
    )
    for out in (derived[0], registration):
        assert [k for k in MODULE_KEYWORDS if k not in out] == [], out.Modality
        assert all(out[k].value == current.datasets[0][k].value for k in MODULE_KEYWORDS), out.Modality


CHARACTER_SETS = {
    "latin-1": ("ISO_IR 100", "Müller^Jürgen"),
    "japanese": (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎=やまだ^たろう"),
}


@pytest.mark.parametrize("which", sorted(CHARACTER_SETS))
def test_every_output_carries_the_current_studys_patient_and_study(which: str, tmp_path: Path) -> None:
    charset, name = CHARACTER_SETS[which]
    current = _study(tmp_path / "current", CURRENT, charset, name, "+0100")
    prior = _study(tmp_path / "prior", PRIOR, charset, name, "+0100")
    source = current.datasets[0]
    missing: dict[str, list[str]] = {}
    paths = _every_output(current, prior, tmp_path / "out")
    for path in paths:
        out = pydicom.dcmread(path, stop_before_pixels=True)  # from bytes: what a PACS decodes
        assert out.StudyInstanceUID == current.study_uid, path.name
        for keyword in MODULE_KEYWORDS:
            if keyword not in source:
                continue
            if keyword not in out:
                missing.setdefault(path.name, []).append(keyword)
            else:  # the current study's value, never the prior's
                assert out[keyword].value == source[keyword].value, (path.name, keyword)
    assert missing == {}
    # and each kind of object is as valid as its source
    if shutil.which("dciodvfy") is not None:
        kinds = {pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID.name: p for p in paths}
        assert len(kinds) == 6
        assert {p.name: _new_dciodvfy_errors(p, source) for p in kinds.values()} == {
            p.name: [] for p in kinds.values()
        }


def _dciodvfy_errors(path: Path) -> set[str]:
    run = subprocess.run(["dciodvfy", "-new", str(path)], capture_output=True, text=True, check=False)
    return {line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")}


def _new_dciodvfy_errors(path: Path, source: Dataset) -> list[str]:
    """dciodvfy's Error lines for ``path`` that it does not give for ``source`` (what this
    dicom3tools build does not know, e.g. Issuer of Clinical Trial Subject ID, newer than
    its dictionary, it reports for the source too), less the stale Synthetic Data line."""
    stale = _dciodvfy_errors(Path(source.filename))
    return sorted(e for e in _dciodvfy_errors(path) - stale if not e.startswith(STALE_SYNTHETIC_DATA))


def test_outputs_of_one_job_agree_on_the_patient_and_study(tmp_path: Path) -> None:
    current = _study(tmp_path / "current", CURRENT, "ISO_IR 100", "Müller^Jürgen", None)
    prior = _study(tmp_path / "prior", PRIOR, "ISO_IR 100", "Müller^Jürgen", None)
    told: dict[str, dict[str, list[str]]] = {}  # keyword -> value -> the objects that say it
    for path in _every_output(current, prior, tmp_path / "out"):
        out = pydicom.dcmread(path, stop_before_pixels=True)
        for keyword in MODULE_KEYWORDS:
            value = out.get(keyword)
            said = "" if value is None else str(value)  # absent and empty both say "unknown"
            told.setdefault(keyword, {}).setdefault(said, []).append(path.name)
    disagree = {keyword: sorted(values) for keyword, values in told.items() if len(values) > 1}
    assert disagree == {}


def _far_offset() -> tuple[str, dt.timezone]:
    """An offset from UTC 9½ hours from this machine's, so local and source times differ."""
    local = dt.datetime.now().astimezone().utcoffset() or dt.timedelta(0)
    minutes = int((local + dt.timedelta(hours=9, minutes=30)).total_seconds() // 60)
    if minutes > 14 * 60:
        minutes -= 24 * 60
    sign = "-" if minutes < 0 else "+"
    text = f"{sign}{abs(minutes) // 60:02d}{abs(minutes) % 60:02d}"
    return text, dt.timezone(dt.timedelta(minutes=minutes))


def _moments(ds: Dataset, zone: dt.timezone) -> dict[str, dt.datetime]:
    """The moments ``ds`` says it was made (its own dates and times), read in ``zone``."""
    found = {}
    for date_keyword, time_keyword in (
        ("InstanceCreationDate", "InstanceCreationTime"),
        ("ContentDate", "ContentTime"),
        ("SeriesDate", "SeriesTime"),
    ):
        if ds.get(date_keyword) and ds.get(time_keyword):
            moment = dt.datetime.combine(DA(ds[date_keyword].value), TM(ds[time_keyword].value))
            found[date_keyword] = moment.replace(tzinfo=zone)
    for n, item in enumerate(ds.get("ContributingEquipmentSequence", [])):
        purpose = item.PurposeOfReferenceCodeSequence[0].CodeValue
        if item.get("ContributionDateTime") and purpose != "109101":  # not the scanner's acquisition
            when = DT(item.ContributionDateTime)
            found[f"ContributionDateTime[{n}]"] = when if when.tzinfo else when.replace(tzinfo=zone)
    return found


def test_outputs_state_their_moments_in_the_sources_time_zone(tmp_path: Path) -> None:
    offset, zone = _far_offset()
    current = _study(tmp_path / "current", CURRENT, "ISO_IR 100", "Müller^Jürgen", offset)
    prior = _study(tmp_path / "prior", PRIOR, "ISO_IR 100", "Müller^Jürgen", offset)
    before = dt.datetime.now(dt.UTC).replace(microsecond=0)
    paths = _every_output(current, prior, tmp_path / "out")
    after = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1)
    wrong = {}
    for path in paths:
        out = pydicom.dcmread(path, stop_before_pixels=True)
        assert out.get("TimezoneOffsetFromUTC") == offset, path.name
        assert (out.StudyDate, out.StudyTime) == (CURRENT.date, "101500"), path.name
        moments = _moments(out, zone)
        assert "ContentDate" in moments, path.name
        wrong |= {f"{path.name} {k}": str(v) for k, v in moments.items() if not before <= v <= after}
    assert wrong == {}, f"made between {before} and {after} UTC"

    # a source that states no offset: none is invented, the node's stamps stay local
    plain = _study(tmp_path / "plain", CURRENT, "ISO_IR 100", "Müller^Jürgen", None)
    plain_prior = _study(tmp_path / "plain-prior", PRIOR, "ISO_IR 100", "Müller^Jürgen", None)
    for path in _every_output(plain, plain_prior, tmp_path / "plain-out"):
        assert "TimezoneOffsetFromUTC" not in pydicom.dcmread(path, stop_before_pixels=True), path.name


def test_every_image_output_answers_its_source_s_request(tmp_path: Path) -> None:
    """The source series' Request Attributes Sequence (the order: Requested Procedure ID,
    Scheduled Procedure Step ID, Accession Number) is in every image object made from it,
    the current study's, never the prior's; a source without one gives outputs without one."""
    current = _study(tmp_path / "current", CURRENT, "ISO_IR 100", "Müller^Jürgen", None)
    prior = _study(tmp_path / "prior", PRIOR, "ISO_IR 100", "Müller^Jürgen", None)
    images = 0
    for path in _every_output(current, prior, tmp_path / "out"):
        out = pydicom.dcmread(path, stop_before_pixels=True)
        if out.Modality == "SR":  # an SR has no General Series module; its study names the order
            assert "RequestAttributesSequence" not in out, path.name
            continue
        (item,) = out.RequestAttributesSequence
        assert (item.RequestedProcedureID, item.ScheduledProcedureStepID, item.AccessionNumber) == (
            "RP-1",
            "SPS-1",
            CURRENT.accession,
        ), path.name
        images += 1
    assert images >= 6  # derived series, both maps, SEG, overlay, registration, probability map, extent

    _study(tmp_path / "plain", CURRENT, "ISO_IR 100", "Müller^Jürgen", None)
    unordered = []
    for path in sorted((tmp_path / "plain").glob("*.dcm")):
        ds = pydicom.dcmread(path)
        del ds.RequestAttributesSequence
        unordered.append(ds)
    plain = load_series(unordered)
    for path in _every_output(plain, prior, tmp_path / "plain-out"):
        assert "RequestAttributesSequence" not in pydicom.dcmread(path, stop_before_pixels=True), path.name
