"""Studies as real scanners send them: several series in one study, of which one is the
acquisition a pipeline should process.

Each study is built from the node's simulators, with the other series a scanner sends beside
the acquisition made by editing headers: a localizer (Image Type ...\\LOCALIZER, another
orientation), a second reconstruction, a Radiation Dose SR, a dose screen (Secondary
Capture), a sagittal series, a T2w, a post-contrast T1, a reformat (DERIVED\\SECONDARY\\MPR),
DWI, ADC and SWI. The study is received by an in-process node and routed by the shipped
``policies/default.yaml`` (what ``dicom-node policy explain`` shows), or given to a
pipeline's first stage as ``dicom-node run`` gives it (no series chosen by a policy).

Every study is SIMULATED and small (at most 16 slices of 128²).
"""

from __future__ import annotations

import datetime as dt
import io
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomFileLike
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlalchemy import select

from dicom_node.db import schema as t
from dicom_node.ingest.indexer import Indexer
from dicom_node.ingest.instance import check_instance
from dicom_node.ingest.origin import OriginRules, job_output_lookup
from dicom_node.ingest.store import InstanceStore
from dicom_node.jobs.routing import JobPlan, PolicyRouter
from dicom_node.lab.simulate import LdctSpec, SeriesHeader, mr_slice, write_ldct_study
from dicom_node.runtime import Runtime
from pipelines.base import RunEnvironment, StudyInput
from pipelines.domain import domain_of_card
from pipelines.stages import Context
from pipelines.steps import CT_CLASSES, MR_CLASSES, SelectSeries
from policies.engine import Decision
from policies.loader import load_policy
from tests.conftest import instances

DEFAULT_POLICY = Path(__file__).resolve().parents[1] / "policies" / "default.yaml"
NODE_AE = "DICOMNODE"
SR_DOSE = "1.2.840.10008.5.1.4.1.1.88.67"  # X-Ray Radiation Dose SR Storage
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
AXIAL = ["1", "0", "0", "0", "1", "0"]
CORONAL = ["1", "0", "0", "0", "0", "-1"]
SAGITTAL = ["0", "1", "0", "0", "0", "-1"]
_STUDY_KEYS = (
    "StudyInstanceUID", "PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyDate",
    "StudyTime", "AccessionNumber", "StudyDescription", "ReferringPhysicianName", "StudyID",
)  # fmt: skip


# -- building the studies -----------------------------------------------------------------------
def _save(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.save_as(path, enforce_file_format=True)
    return path


Edit = Callable[[Dataset, int], None]


def derive(files: Iterable[Path], out: Path, edit: Edit, **attributes: Any) -> list[Path]:
    """A new series (new Series and SOP Instance UIDs) of ``files`` with ``attributes`` set
    and ``edit(ds, index)`` applied to each instance."""
    series_uid, written = generate_uid(), []
    for i, f in enumerate(files):
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.InstanceNumber = series_uid, generate_uid(), i + 1
        for keyword, value in attributes.items():
            setattr(ds, keyword, value)
        edit(ds, i)
        written.append(_save(ds, out / f"{i + 1:04d}.dcm"))
    return written


def no_edit(ds: Dataset, i: int) -> None:
    return None


def planes(orientation: list[str], thickness: float, count: int) -> Edit:
    """Place instance ``i`` of ``count`` as slice ``i`` of a stack in ``orientation``."""
    row, column = np.asarray(orientation, float)[:3], np.asarray(orientation, float)[3:]
    normal = np.cross(row, column)

    def edit(ds: Dataset, i: int) -> None:
        position = -60.0 * (row + column) + (i - count / 2) * thickness * normal
        ds.ImageOrientationPatient = orientation
        ds.ImagePositionPatient = [f"{v:.3f}" for v in position]
        ds.SliceLocation = f"{(i - count / 2) * thickness:.3f}"
        ds.SliceThickness = f"{thickness:g}"

    return edit


def localizer(first: Path, out: Path, count: int, description: str, **attributes: Any) -> list[Path]:
    """A localizer of ``count`` images (coronal, sagittal, axial in turn) from one slice."""
    orientations = (CORONAL, SAGITTAL, AXIAL)

    def edit(ds: Dataset, i: int) -> None:
        planes(orientations[i % 3], 1.0, 1)(ds, 0)

    return derive(
        [first] * count,
        out,
        edit,
        ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"],
        SeriesDescription=description,
        SeriesNumber=1,
        **attributes,
    )


def _study_level(study: Dataset, sop_class: str, modality: str, description: str, number: int) -> Dataset:
    ds = Dataset()
    for keyword in _STUDY_KEYS:
        if keyword in study:
            setattr(ds, keyword, study.get(keyword))
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = sop_class, generate_uid(), modality
    ds.SeriesInstanceUID, ds.SeriesNumber, ds.InstanceNumber = generate_uid(), number, 1
    ds.SeriesDescription, ds.Manufacturer = description, "SIMULATED"
    return ds


def dose_report(source: Path, out: Path) -> Path:
    """An X-Ray Radiation Dose SR (Modality SR) of the study of ``source``, saved in ``out``."""
    return _save(dose_report_of(pydicom.dcmread(source, stop_before_pixels=True)), out / "0001.dcm")


def dose_report_of(study: Dataset) -> Dataset:
    """An X-Ray Radiation Dose SR (Modality SR) of the study ``study`` is an instance of (a
    bare container, as scanners send it beside the images)."""
    ds = _study_level(study, SR_DOSE, "SR", "Dose Report", 999)
    concept = Dataset()
    concept.CodeValue, concept.CodingSchemeDesignator = "113701", "DCM"
    concept.CodeMeaning = "X-Ray Radiation Dose Report"
    ds.ValueType, ds.ConceptNameCodeSequence, ds.ContinuityOfContent = "CONTAINER", [concept], "SEPARATE"
    ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "UNVERIFIED"
    ds.ContentDate, ds.ContentTime, ds.ContentSequence = ds.StudyDate, ds.StudyTime, []
    return ds


def dose_screen(source: Path, out: Path) -> Path:
    """The dose screen a CT sends: Secondary Capture, Modality CT, DERIVED\\SECONDARY\\SCREEN SAVE."""
    ds = _study_level(
        pydicom.dcmread(source, stop_before_pixels=True), SECONDARY_CAPTURE, "CT", "Patient Protocol", 501
    )
    ds.ConversionType, ds.ImageType = "WSD", ["DERIVED", "SECONDARY", "SCREEN SAVE"]
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.Rows, ds.Columns = 1, "MONOCHROME2", 64, 64
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = (np.arange(64 * 64) % 256).astype(np.uint8).tobytes()
    return _save(ds, out / "0001.dcm")


@dataclass(frozen=True)
class Study:
    """Series directory by name, in the order the scanner sends them."""

    series: dict[str, Path]

    def files(self, *names: str) -> list[Path]:
        chosen = names or tuple(self.series)
        return [f for n in chosen for f in sorted(self.series[n].glob("*.dcm"))]

    def uid(self, name: str) -> str:
        return str(pydicom.dcmread(self.files(name)[0], stop_before_pixels=True).SeriesInstanceUID)


@pytest.fixture(scope="module")
def chest(tmp_path_factory: pytest.TempPathFactory) -> Study:
    """A low-dose chest CT: topogram, the axial series reconstructed twice (soft-tissue
    kernel 5 mm, lung kernel 1 mm: two Series Instance UIDs, one Frame of Reference), a
    Radiation Dose SR and a dose screen."""
    root = tmp_path_factory.mktemp("chest")
    thin, _ = write_ldct_study(root / "sim", LdctSpec(slices=8, size=128, slice_thickness_mm=1.0), workers=1)
    out = root / "study"
    lung = derive(
        thin.files, out / "lung", no_edit, SeriesNumber=3, ConvolutionKernel="B70f",
        SeriesDescription="LDCT Thorax 1.0 B70f lung",
    )  # fmt: skip
    soft = derive(
        thin.files[::2], out / "soft", planes(AXIAL, 5.0, 4), SeriesNumber=2, ConvolutionKernel="B30f",
        SeriesDescription="LDCT Thorax 5.0 B30f",
    )  # fmt: skip
    localizer(lung[0], out / "scout", 1, "Topogram 0.6 T20s", CTDIvol=0.13, SliceThickness="0.6")
    dose_report(lung[0], out / "sr")
    dose_screen(lung[0], out / "sc")
    order = ("scout", "soft", "lung", "sr", "sc")
    assert len(soft) == 4
    return Study({name: out / name for name in order})


def _head(size: int = 128) -> np.ndarray:
    """A head-sized oval: bright scalp, dark skull, grey brain (headers are what counts here)."""
    yy, xx = np.mgrid[0:size, 0:size]
    r = np.hypot((yy - size / 2) / (0.42 * size), (xx - size / 2) / (0.36 * size))
    return np.select([r < 0.85, r < 0.93, r < 1.0], [900.0, 80.0, 1200.0], 0.0)


def mr_series(out: Path, header: SeriesHeader, tr_ms: float, te_ms: float, count: int) -> list[Path]:
    """An axial 2-D spin-echo MR series of ``count`` slices (1.5 T) with the simulator's headers."""
    from models.sim.mrct import SpinEcho

    protocol = SpinEcho("t1w" if tr_ms < 1000 else "t2w", tr_ms, te_ms)
    when, files = dt.datetime(2026, 11, 2, 9, 0), []
    for k in range(count):
        ds = mr_slice(_head(), k, header, protocol, 1.5, (600.0, 1200.0), when)
        files.append(_save(ds, out / f"{k + 1:04d}.dcm"))
    return files


def _native_header(series_number: int, description: str, base: SeriesHeader) -> SeriesHeader:
    return replace(
        base, series_uid=generate_uid(), series_number=series_number, series_description=description
    )


@pytest.fixture(scope="module")
def planning(tmp_path_factory: pytest.TempPathFactory) -> Study:
    """An MR planning study from the radiotherapy MR: 3-plane localizer, sagittal T1w,
    axial T1w, T2w, post-contrast T1 and a coronal MPR reformat of the T1w."""
    out = tmp_path_factory.mktemp("planning") / "study"
    base = SeriesHeader(
        study_uid=generate_uid(), series_uid="", frame_uid=generate_uid(), patient_id="SIM-RT-0001",
        study_description="SIMULATED MR HEAD RT PLANNING", body_part="HEAD", station_name="SIMULATED MR",
        pixel_spacing_mm=0.95, slice_thickness_mm=2.5,
    )  # fmt: skip
    t1 = mr_series(out / "t1", _native_header(3, "T1 SE AX", base), 500, 12, 12)
    mr_series(out / "t2", _native_header(4, "T2 SE AX", base), 4000, 100, 12)
    localizer(
        t1[6], out / "loc", 3, "localizer", ScanningSequence="GR", RepetitionTime="8.6", EchoTime="4",
    )  # fmt: skip
    derive(t1[:8], out / "sag", planes(SAGITTAL, 4.0, 8), SeriesNumber=2, SeriesDescription="T1 SE SAG")
    derive(t1, out / "t1c", no_edit, SeriesNumber=5, SeriesDescription="T1 SE AX +C", ContrastBolusAgent="Gd")
    derive(
        t1, out / "mpr", planes(CORONAL, 2.5, 12), SeriesNumber=6, SeriesDescription="T1 SE COR MPR",
        ImageType=["DERIVED", "SECONDARY", "MPR"],
    )  # fmt: skip
    order = ("loc", "sag", "t1", "t2", "t1c", "mpr")
    return Study({name: out / name for name in order})


# -- receiving and routing them -----------------------------------------------------------------
def _encoded(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    fp = DicomFileLike(buffer)
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return buffer.getvalue()


def route(home: Path, files: Iterable[Path], calling_ae: str) -> tuple[Decision, list[JobPlan]]:
    """Receive ``files`` (in order) from ``calling_ae`` into a node at ``home`` and plan the
    study's jobs by the shipped policy, as the node does when the study is ready."""
    rt = Runtime.open(None, home)
    origin = OriginRules(NODE_AE, "1.2.826.0.1.3680043.10.999.", job_output_lookup(rt.db))
    store = InstanceStore(rt.paths, rt.db, Indexer(rt.db, rt.audit, gather_seconds=0.01), origin=origin)
    try:
        study_uid = ""
        for f in files:
            ds = pydicom.dcmread(f)
            study_uid = str(ds.StudyInstanceUID)
            data, syntax = _encoded(ds), str(ds.file_meta.TransferSyntaxUID)
            sop = check_instance(data, syntax)[0]
            assert sop is not None
            store.put(
                data, syntax, claimed_sop_uid=sop.sop_instance_uid, calling_ae=calling_ae, peer_host="::1"
            )
        loaded = load_policy(DEFAULT_POLICY, {"pacs", "tps"}, {"pacs"})
        router = PolicyRouter(loaded, rt.paths.data, {"pacs": "PACS", "tps": "TPS"})
        with rt.db.read() as conn:
            study_id = conn.execute(
                select(t.studies.c.id).where(t.studies.c.study_uid == study_uid)
            ).scalar_one()
            _view, decision, plans = router.plan(conn, study_id)
        assert decision is not None
        return decision, plans
    finally:
        store.close()
        rt.close()


def first_stage(stage: SelectSeries, files: list[Path], tmp_path: Path) -> Context:
    """The select stage as ``dicom-node run`` gives it a study: no series chosen by a policy."""
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    study = StudyInput(1, str(first.StudyInstanceUID), 1, instances(files))
    return stage.run(Context(study=study, env=RunEnvironment(workdir=tmp_path)))


def chosen_series(ctx: Context) -> str:
    (uid,) = {i.series_uid for i in ctx.series}
    return uid


# -- the low-dose chest CT ------------------------------------------------------------------------
def test_low_dose_chest_restores_each_axial_reconstruction_once_whatever_else_the_study_holds(
    chest: Study, tmp_path: Path
) -> None:
    """The shipped rule restores each low-dose axial reconstruction (soft-tissue kernel and
    lung kernel: one job each, ``select: {each: true}``), never the topogram, the dose screen
    or the dose SR, and the dose SR and the screen in the job's snapshot break nothing.
    (Until 2026-12-07 it restored only the larger reconstruction and nothing said the
    other existed.)"""
    from pipelines.restoration import restoration

    decision, plans = route(tmp_path / "node", chest.files(), "CT_SCANNER")
    assert [(p.rule, p.pipeline) for p in plans] == [("low-dose-ct-restoration", "restoration")] * 2
    assert [p.series_uid for p in plans] == [chest.uid("soft"), chest.uid("lung")]
    plan = plans[1]
    out = tmp_path / "out"
    out.mkdir()
    assert [v.rule.name for v in decision.chosen] == ["low-dose-ct-restoration"]
    files = chest.files()
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    study = StudyInput(1, study_uid, 1, instances(files), series_uid=plan.series_uid)
    ctx = restoration().execute(study, RunEnvironment(workdir=out))
    assert chosen_series(ctx) == chest.uid("lung")
    restored = [pydicom.dcmread(o.path) for o in ctx.outputs if o.sop_class_uid in CT_CLASSES]
    assert len(restored) == 8 and len({str(ds.SeriesInstanceUID) for ds in restored}) == 1
    sources = {str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID) for ds in restored}
    assert sources == {str(pydicom.dcmread(f).SOPInstanceUID) for f in chest.files("lung")}


def test_run_restoration_takes_the_axial_series_not_a_larger_coronal_reformat(
    chest: Study, tmp_path: Path
) -> None:
    """A chest CT whose scanner also sent a coronal MPR reformat with more images than the
    axial series: ``dicom-node run restoration`` restored nothing (it took the reformat, which
    the input domain refuses); it takes the axial acquisition."""
    mpr = derive(
        chest.files("lung") * 2, tmp_path / "mpr", planes(CORONAL, 3.0, 16), SeriesNumber=4,
        SeriesDescription="LDCT Thorax COR 3.0 MPR", ImageType=["DERIVED", "SECONDARY", "MPR"],
    )  # fmt: skip
    files = chest.files("scout", "soft") + mpr + chest.files("lung", "sr", "sc")
    ctx = first_stage(SelectSeries(CT_CLASSES, what="CT"), files, tmp_path)
    assert chosen_series(ctx) == chest.uid("lung")


def test_run_restoration_skips_a_localizer_larger_than_the_axial_series(chest: Study, tmp_path: Path) -> None:
    """A topogram series holding more images than a short axial series (e.g. repeated scouts):
    the pipeline takes the axial acquisition."""
    scouts = localizer(chest.files("lung")[0], tmp_path / "scouts", 6, "Topogram 0.6 T20s")
    files = scouts + chest.files("soft", "sr", "sc")
    ctx = first_stage(SelectSeries(CT_CLASSES, what="CT"), files, tmp_path)
    assert chosen_series(ctx) == chest.uid("soft")


def test_a_full_dose_ct_is_not_restored_because_its_topogram_has_a_low_ctdivol(
    chest: Study, tmp_path: Path
) -> None:
    full = derive(
        chest.files("lung"), tmp_path / "full", no_edit, CTDIvol=10.0, SeriesDescription="Thorax 1.0 B70f"
    )
    _decision, plans = route(tmp_path / "node", chest.files("scout") + full, "CT_SCANNER")
    assert plans == []


# -- the MR planning study (sct) ----------------------------------------------------------------
def test_a_planning_study_with_a_t2w_goes_to_sct_not_to_flair_synthesis(
    planning: Study, tmp_path: Path
) -> None:
    """From the planning MR, a head study with a T1w and a T2w and no FLAIR was routed to
    brain-mr-missing-flair (priority 20, above mr-planning-sct's 10): a synthetic FLAIR to
    the PACS, and no sCT for the TPS."""
    decision, plans = route(tmp_path / "node", planning.files(), "RT_MR_PLANNING")
    assert [v.rule.name for v in decision.chosen] == ["mr-planning-sct"]
    assert [(p.pipeline, p.destinations) for p in plans] == [("sct", ["tps"])]


def test_a_planning_study_with_a_t1c_and_a_flair_goes_to_sct_not_to_prognosis(
    planning: Study, tmp_path: Path
) -> None:
    """A brain-tumour planning study (T1w, T1 post-contrast, FLAIR) was routed to
    brain-tumour-prognosis (priority 15)."""
    flair = derive(planning.files("t2"), tmp_path / "flair", no_edit, SeriesDescription="T2 FLAIR AX")
    files = planning.files("loc", "t1", "t1c") + flair
    decision, plans = route(tmp_path / "node", files, "RT_MR_PLANNING")
    assert [v.rule.name for v in decision.chosen] == ["mr-planning-sct"]
    assert [p.pipeline for p in plans] == ["sct"]


def test_sct_is_planned_on_the_axial_t1w_not_on_the_localizer_sent_first(
    planning: Study, tmp_path: Path
) -> None:
    """The shipped sct rule had no select: its job ran on the first MR series the study
    received, the localizer, and was refused. It takes the native T1w."""
    _decision, plans = route(tmp_path / "node", planning.files(), "RT_MR_PLANNING")
    (plan,) = plans
    assert plan.series_uid == planning.uid("t1")


def test_run_sct_does_not_take_a_larger_sagittal_t1w_localizer_or_reformat(
    planning: Study, tmp_path: Path
) -> None:
    """``dicom-node run sct`` took the largest MR series: here a sagittal T1w, refused as
    not axial although the study holds an axial T1w. It takes an axial acquisition."""
    sag3d = derive(
        planning.files("t1") * 2, tmp_path / "sag3d", planes(SAGITTAL, 1.0, 24), SeriesNumber=7,
        SeriesDescription="T1 SE SAG 1mm",
    )  # fmt: skip
    files = planning.files("loc") + sag3d + planning.files("mpr", "t1")
    ctx = first_stage(SelectSeries(MR_CLASSES, what="MR"), files, tmp_path)
    assert chosen_series(ctx) == planning.uid("t1")


def test_select_with_the_models_domain_takes_the_t1w_of_a_planning_study(
    planning: Study, tmp_path: Path
) -> None:
    """With sct-head's input domain (``SelectSeries(..., domain=...)``), the pipeline's own
    choice is the native axial T1w, whichever series the study lists first."""
    from models.sct import SctModel

    domain, _ = domain_of_card(vars(SctModel.shipped().meta), "MR")
    files = planning.files("t2", "loc", "sag", "mpr", "t1")
    ctx = first_stage(SelectSeries(MR_CLASSES, what="MR", domain=domain), files, tmp_path)
    assert chosen_series(ctx) == planning.uid("t1")
    without = first_stage(SelectSeries(MR_CLASSES, what="MR"), files, tmp_path)
    assert chosen_series(without) == planning.uid("t2")  # an axial acquisition, the first of equals


# -- the brain MR without FLAIR (synthesis reads its own series) --------------------------------
def _brain_extras(planning: Study, out: Path) -> dict[str, list[Path]]:
    t1, t2 = planning.files("t1"), planning.files("t2")

    def diffusion(ds: Dataset, i: int) -> None:
        ds.ScanningSequence, ds.RepetitionTime, ds.EchoTime = "EP", "5000", "90"

    return {
        "dwi": derive(
            t2 + t2, out / "dwi", diffusion, SeriesDescription="ep2d_diff_tra",
            ImageType=["ORIGINAL", "PRIMARY", "DIFFUSION", "NONE"],
        ),
        "swi": derive(
            t1 + t1[:4], out / "swi", planes(AXIAL, 2.0, 16), SeriesDescription="SWI_Images",
            ScanningSequence="GR", RepetitionTime="28", EchoTime="20",
            ImageType=["ORIGINAL", "PRIMARY", "M", "SWI"],
        ),
    }  # fmt: skip


@pytest.mark.parametrize("extra", ["dwi", "swi"])
def test_synthesis_reads_the_protocols_t1w_and_t2w_not_a_larger_swi_or_dwi(
    planning: Study, tmp_path: Path, extra: str
) -> None:
    from pipelines.synthesis import protocol_of, read_contrasts

    rule = next(
        r
        for r in load_policy(DEFAULT_POLICY, {"pacs", "tps"}, {"pacs"}).policy.rules
        if r.pipeline == "synthesis"
    )
    files = planning.files("loc", "t1", "t2") + _brain_extras(planning, tmp_path)[extra]
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    study = StudyInput(1, str(first.StudyInstanceUID), 1, instances(files), options=dict(rule.options))
    found = read_contrasts(
        Context(study=study, env=RunEnvironment(workdir=tmp_path)), protocol_of(study.options)
    )
    read_as = {c: s[0].series_uid for c, s in found.series.items()}
    assert (read_as["t1w"], read_as["t2w"]) == (planning.uid("t1"), planning.uid("t2"))
