"""Multi-contrast brain MR for contrast synthesis (models.sim.synthesis), its DICOM study
(dicom_node.lab.simulate_synthesis) and ``dicom-node simulate synthesis``."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from typer.testing import CliRunner

from models.sim.mrct import HeadTissue
from models.sim.synthesis import (
    FLAIR,
    LESION_DIAMETER_MM,
    MAX_LESIONS,
    PROTOCOLS,
    SimulatedMultiContrast,
    SynthLabel,
    _lesion_count,
    make_study,
    relaxation_at,
)
from pipelines.volume import load_series

DCIODVFY = Path("/usr/bin/dciodvfy")
STALE = "(0x0008,0x001c)"  # Synthetic Data, unknown to old dicom3tools (dicom_node/delivery/tps.py)
#: Small but anatomical: 80 x 80 at 3 mm, 14 slices of 3 mm, lesions forced in, no motion.
SMALL = {"size": 80, "slices": 14, "n_lesions": 14, "motion": False, "tumour": False}


@pytest.fixture(scope="module")
def at_15() -> SimulatedMultiContrast:
    return make_study(4, field_strength_t=1.5, **SMALL)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def at_3() -> SimulatedMultiContrast:
    return make_study(4, field_strength_t=3.0, **SMALL)  # type: ignore[arg-type]


def _median(image: np.ndarray, mask: np.ndarray) -> float:
    assert mask.sum() >= 5
    return float(np.median(image[mask]))


def _pure(sim: SimulatedMultiContrast) -> dict[str, np.ndarray]:
    f = sim.fractions
    return {
        "wm": (f["wm"] >= 0.9) & sim.brain,
        "gm": (f["gm"] >= 0.85) & sim.brain,
        "csf": (f["csf"] >= 0.9) & sim.brain,
        "lesion": f["lesion"] >= 0.8,
    }


@pytest.mark.parametrize("which", ["at_15", "at_3"])
def test_contrasts_lesions_bright_on_flair_and_t2w_csf_dark_on_flair(
    which: str, request: pytest.FixtureRequest
) -> None:
    sim: SimulatedMultiContrast = request.getfixturevalue(which)
    masks = _pure(sim)
    m = {(name, t): _median(sim.images[name], masks[t]) for name in sim.images for t in masks}
    assert m[("flair", "lesion")] > 1.3 * m[("flair", "wm")]
    assert m[("t2w", "lesion")] > 1.5 * m[("t2w", "wm")]
    assert m[("t1w", "wm")] > 1.1 * m[("t1w", "gm")] > 1.1 * m[("t1w", "csf")]
    assert m[("flair", "csf")] < 0.3 * m[("flair", "wm")]
    assert m[("t2w", "csf")] > 2.0 * m[("t2w", "wm")]
    assert m[("t2w", "gm")] > m[("t2w", "wm")]
    # Lesions are faint on T1w unless they are black holes; never brighter than WM there.
    for les in sim.lesions:
        assert les.contrast["flair"] > 0.25 and les.contrast["t2w"] > 0.4
        assert les.contrast["t1w"] < 0.0
        assert les.t1_visible == (les.contrast["t1w"] <= -0.2)
    assert sim.field_strength_t == (1.5 if which == "at_15" else 3.0)
    assert FLAIR.ti_ms == pytest.approx(1705, abs=5)  # nulls the CSF T1 of 2569 ms at TR 9000


def test_3t_lengthens_t1_and_changes_t1w_contrast(
    at_15: SimulatedMultiContrast, at_3: SimulatedMultiContrast
) -> None:
    r15, r3 = relaxation_at(1.5), relaxation_at(3.0)
    assert r3[HeadTissue.WHITE].t1_ms / r15[HeadTissue.WHITE].t1_ms == pytest.approx(2**0.38, rel=1e-6)
    assert r3[HeadTissue.GREY].t1_ms / r15[HeadTissue.GREY].t1_ms == pytest.approx(2**0.38, rel=1e-6)
    assert r3[HeadTissue.CSF].t1_ms == r15[HeadTissue.CSF].t1_ms
    assert all(r3[t].t2_ms == r15[t].t2_ms for t in HeadTissue)
    # Same seed, same anatomy and lesions: only the field differs.
    np.testing.assert_array_equal(at_15.tissue, at_3.tissue)
    assert [les.centre_mm for les in at_15.lesions] == [les.centre_mm for les in at_3.lesions]
    ratio = {}
    for sim in (at_15, at_3):
        masks = _pure(sim)
        t1w = sim.images["t1w"]
        ratio[sim.field_strength_t] = (
            _median(t1w, masks["csf"]) / _median(t1w, masks["wm"]),
            _median(t1w, masks["wm"]) / _median(t1w, masks["gm"]),
        )
    # Longer WM/GM T1 at 3 T with the same TR: WM loses more signal than CSF (whose T1 does not
    # change), so CSF/WM rises (~0.36 -> ~0.43 noise-free); WM/GM rises slightly (~1.25 -> ~1.30).
    assert ratio[3.0][0] > ratio[1.5][0] + 0.03
    assert ratio[3.0][1] > ratio[1.5][1]
    # Higher SNR at 3 T: noise relative to WM halves.
    assert at_3.noise_sigma["t1w"] < at_15.noise_sigma["t1w"] * 1.5


def test_same_seed_same_study_other_seed_other(at_15: SimulatedMultiContrast) -> None:
    again = make_study(4, field_strength_t=1.5, **SMALL)  # type: ignore[arg-type]
    for name in ("t1w", "t2w", "flair", "pd"):
        np.testing.assert_array_equal(again.images[name], at_15.images[name])
    np.testing.assert_array_equal(again.lesion_labels, at_15.lesion_labels)
    other = make_study(5, field_strength_t=1.5, **SMALL)  # type: ignore[arg-type]
    assert not np.array_equal(other.images["t1w"], at_15.images["t1w"])


def test_forcing_the_lesion_count_changes_only_the_lesions(at_15: SimulatedMultiContrast) -> None:
    # The same study with its lesions erased (for hallucination maps): same anatomy, bias and noise.
    erased = make_study(4, field_strength_t=1.5, **{**SMALL, "n_lesions": 0})  # type: ignore[arg-type]
    fewer = make_study(4, field_strength_t=1.5, **{**SMALL, "n_lesions": 3})  # type: ignore[arg-type]
    assert erased.lesions == () and not erased.lesion_labels.any()
    assert [les.centre_mm for les in fewer.lesions] == [les.centre_mm for les in at_15.lesions[:3]]
    clear = at_15.fractions["lesion"] == 0
    changed = at_15.fractions["lesion"] > 0.05
    for name in ("t1w", "t2w", "flair", "pd"):
        np.testing.assert_array_equal(erased.images[name][clear], at_15.images[name][clear])
        if name in ("t2w", "flair"):
            assert float(np.mean(at_15.images[name][changed] - erased.images[name][changed])) > 0


def test_every_contrast_on_one_grid_and_truth_consistent(at_15: SimulatedMultiContrast) -> None:
    sim = at_15
    shape = sim.shape
    assert shape == (14, 80, 80) and sim.spacing_mm == (3.0, 3.0, 3.0)
    assert set(sim.images) == {"t1w", "t2w", "flair", "pd"}
    for image in sim.images.values():
        assert image.shape == shape and image.dtype == np.float32
    assert set(sim.protocols) == set(PROTOCOLS)
    total = np.sum(np.stack(list(sim.fractions.values())), axis=0)
    assert float(np.abs(total[sim.brain] - 1.0).max()) < 0.5  # intracranial fraction >= 0.5 in the mask
    assert not np.any(sim.tissue[~sim.brain])
    labelled = sim.lesion_labels > 0
    assert np.all(sim.tissue[labelled & sim.brain] == SynthLabel.LESION)
    assert {les.id for les in sim.lesions} == set(np.unique(sim.lesion_labels[labelled]).tolist())
    for les in sim.lesions:
        k, r, c = (int(round(v)) for v in les.centre_voxel)
        k, r, c = min(max(k, 0), shape[0] - 1), min(max(r, 0), shape[1] - 1), min(max(c, 0), shape[2] - 1)
        # placed in white matter: the centre's parenchyma is mostly white matter or the lesion itself
        assert sim.fractions["wm"][k, r, c] + sim.fractions["lesion"][k, r, c] > 0.5
        assert les.n_voxels == int((sim.lesion_labels == les.id).sum()) >= 1
    assert sim.tumour is None
    assert np.all(sim.poses["t1w"].matrix == np.eye(4))


def test_lesion_counts_sizes_tumour_and_motion_over_seeds() -> None:
    rng = np.random.default_rng(0)
    counts = [_lesion_count(rng) for _ in range(2000)]
    assert min(counts) == 0 and max(counts) == MAX_LESIONS
    assert 0.1 < counts.count(0) / len(counts) < 0.2
    diameters, n_lesions, t1_visible = [], [], []
    tumours = 0
    for seed in range(3):
        sim = make_study(seed, size=48, slices=12)
        n_lesions.append(len(sim.lesions))
        diameters += [les.diameter_mm for les in sim.lesions]
        t1_visible += [les.t1_visible for les in sim.lesions]
        assert all(les.location in ("periventricular", "deep") for les in sim.lesions)
        for name, pose in sim.poses.items():
            if name != "t1w":
                assert 0.0 < pose.rotation_deg <= 1.0 and 0.0 < math.hypot(*pose.shift_mm) <= 1.0 + 1e-9
        assert sim.poses["pd"] is sim.poses["t2w"]  # dual echo
        if sim.tumour is not None:
            tumours += 1
            assert sim.tumour.core.any() and sim.tumour.oedema.any()
    assert all(0 <= n <= MAX_LESIONS for n in n_lesions) and sum(n_lesions) > 0
    lo, hi = LESION_DIAMETER_MM
    assert all(lo * 0.99 <= d <= hi * 1.01 for d in diameters)
    # Forced: a tumour with oedema, hyperintense on FLAIR; lesions keep clear of it.
    sim = make_study(1, size=64, slices=16, tumour=True, n_lesions=6, motion=False)
    assert sim.tumour is not None
    flair, wm = sim.images["flair"], (sim.fractions["wm"] >= 0.9) & sim.brain
    assert _median(flair, sim.tumour.oedema) > 1.2 * _median(flair, wm)
    assert not np.any((sim.lesion_labels > 0) & sim.tumour.core)


# -- DICOM and the CLI ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dicom_node.cli import app

    out = tmp_path_factory.mktemp("synthesis") / "study"
    args = ["simulate", "synthesis", "--out", str(out), "--seed", "2", "--size", "48", "--slices", "6"]
    result = CliRunner().invoke(app, [*args, "--field", "3", "--pd", "--patient-id", "SIM-SYN-TEST"])
    assert result.exit_code == 0, result.output
    assert "SIMULATED" in result.output and "kept aside" in result.output
    return out


def test_cli_writes_acquired_series_and_the_reference_on_one_frame(written: Path) -> None:
    out = written
    assert not (out / "flair").exists() and (out / "reference" / "flair").is_dir()
    frames, studies, positions = set(), set(), {}
    for series in ("t1w", "t2w", "pd", "reference/flair"):
        files = sorted((out / series).glob("MR*.dcm"))
        assert len(files) == 6, series
        datasets = [pydicom.dcmread(f) for f in files]
        volume = load_series(datasets)
        assert volume.array.shape == (6, 48, 48) and volume.modality == "MR"
        frames.add(volume.frame_of_reference_uid)
        studies.add(volume.study_uid)
        ds = datasets[0]
        assert "SIMULATED" in ds.StudyDescription and "SIMULATED" in ds.SeriesDescription
        assert ds.BodyPartExamined == "BRAIN" and ds.PatientID == "SIM-SYN-TEST"
        assert float(ds.MagneticFieldStrength) == 3.0 and "SIMULATED" in ds.ImageComments
        # a scanner's stand-in, not an AI output (the node would ignore Synthetic Data YES)
        assert "SyntheticData" not in ds
        name = series.split("/")[-1]
        protocol = PROTOCOLS[name]
        assert float(ds.RepetitionTime) == protocol.tr_ms and float(ds.EchoTime) == protocol.te_ms
        if name == "flair":
            assert "IR" in ds.ScanningSequence and float(ds.InversionTime) == FLAIR.ti_ms
            assert "REFERENCE" in ds.SeriesDescription
        else:
            assert ds.ScanningSequence == "SE" and "InversionTime" not in ds
        positions[series] = [tuple(float(v) for v in d.ImagePositionPatient) for d in datasets]
    assert len(frames) == 1 and len(studies) == 1
    assert len({tuple(p) for p in positions.values()}) == 1  # same slice geometry everywhere
    truth = json.loads((out / "truth.json").read_text())
    assert truth["missing"] == ["flair"] and truth["field_strength_t"] == 3.0 and truth["seed"] == 2
    assert truth["frame_of_reference_uid"] in frames and truth["simulated"] is True
    assert set(truth["acquired"]) == {"t1w", "t2w", "pd"}
    for les in truth["lesions"]:
        assert {"id", "centre_patient_mm", "diameter_mm", "t1_visible"} <= set(les)
    arrays = np.load(out / "truth.npz")
    assert arrays["lesion_labels"].shape == arrays["tissue"].shape == (6, 48, 48)


def test_dciodvfy_finds_no_errors(written: Path) -> None:
    if not DCIODVFY.exists():
        pytest.skip("dciodvfy (dicom3tools) not installed")
    for series in ("t1w", "t2w", "pd", "reference/flair"):
        run = subprocess.run(
            [str(DCIODVFY), str(written / series / "MR0003.dcm")], capture_output=True, text=True, check=False
        )
        lines = (run.stdout + run.stderr).splitlines()
        errors = [line for line in lines if line.startswith("Error") and STALE not in line]
        assert errors == [], series


def test_cli_missing_t2w_and_clear_errors(tmp_path: Path) -> None:
    from dicom_node.cli import app

    runner = CliRunner()
    out = tmp_path / "t2"
    args = ["simulate", "synthesis", "--out", str(out), "--size", "32", "--slices", "4", "--missing", "t2w"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (out / "reference" / "t2w").is_dir() and (out / "flair").is_dir() and not (out / "pd").exists()
    assert json.loads((out / "truth.json").read_text())["missing"] == ["t2w"]
    again = runner.invoke(app, args)  # the directory is no longer empty
    assert again.exit_code != 0 and "not an empty directory" in again.output
    bad = runner.invoke(app, ["simulate", "synthesis", "--out", str(tmp_path / "x"), "--missing", "pd"])
    assert bad.exit_code != 0 and not (tmp_path / "x").exists()
    bad = runner.invoke(app, ["simulate", "synthesis", "--out", str(tmp_path / "y"), "--field", "7"])
    assert bad.exit_code != 0 and not (tmp_path / "y").exists()
    with pytest.raises(ValueError, match="choose 1.5 or 3"):
        make_study(0, size=32, slices=4, field_strength_t=2.0)
