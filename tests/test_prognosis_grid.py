"""Prognosis visits with pixels finer than the card's own range: a card's ``resample`` has
them segmented on cells of about the training's pixel size (models.brain_tumour_seg.
segment_on_grid) and the masks brought back onto the pixels; the checked pixel range is the
card's own widened down to the resample range. SIMULATED patients (models.sim.prognosis).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from dicom_node.lab.simulate_prognosis import PrognosisSpec, write_prognosis_patient
from models.brain_tumour_seg import segment, segment_on_grid
from models.evaluation.brain_tumour_seg import dice, simulated_truth
from models.inplane_grid import InPlaneGrid
from models.prognosis import PrognosisModel
from models.sim.prognosis import make_patient
from models.zoo import version_dir
from pipelines.base import InputRefused, RunEnvironment
from pipelines.prognosis import PrognosisPipeline
from tests.conftest import study_of


@pytest.fixture(scope="module")
def resampling_model(tmp_path_factory: pytest.TempPathFactory) -> PrognosisModel:
    target = tmp_path_factory.mktemp("card") / "model"
    shutil.copytree(version_dir("prognosis-growth", "1.2"), target)
    card = json.loads((target / "card.json").read_text())
    card["input_domain"]["pixel_spacing_mm"] = [1.5, 2.5]
    card["resample"] = {"pixel_spacing_mm": [0.4, 1.5], "to_mm": 1.875}
    (target / "card.json").write_text(json.dumps(card))
    return PrognosisModel(target)


def test_a_fine_visit_is_segmented_on_the_cells_and_comes_back_on_its_pixels() -> None:
    patient = make_patient(2001, visits=2, size=256)
    visit = patient.visits[1]
    t1c, flair = visit.images["t1c"], visit.images["flair"]
    grid = InPlaneGrid(t1c.shape, patient.spacing_mm, 1.875)
    found = segment_on_grid(t1c, flair, grid)
    assert found.ok
    for mask in (found.brain, found.core, found.whole, found.white, found.grey):
        assert mask.shape == t1c.shape
    assert not (found.core & ~found.whole).any()
    assert 0.0 <= float(found.white.min()) and float(found.white.max()) <= 1.0
    truth = simulated_truth(patient, visit)
    assert dice(found.brain, truth.brain) > 0.96
    assert dice(found.whole, truth.whole) > 0.85
    # the cells' own volumes are the QC figures (ml do not depend on the grid)
    cells = segment(grid.down(t1c), grid.down(flair), grid.cell_spacing)
    timeless = {k: v for k, v in found.qc.items() if k != "seconds"}
    assert timeless == {k: v for k, v in cells.qc.items() if k != "seconds"}


def test_the_pipeline_segments_on_the_grid_only_where_the_card_resamples(
    resampling_model: PrognosisModel,
) -> None:
    pipeline = PrognosisPipeline(resampling_model)
    fine = make_patient(2002, visits=2, size=256)
    t1c, flair = fine.visits[0].images["t1c"], fine.visits[0].images["flair"]
    on_grid = pipeline.segment_visit(t1c, flair, fine.spacing_mm)
    expected = segment_on_grid(t1c, flair, InPlaneGrid(t1c.shape, fine.spacing_mm, 1.875))
    np.testing.assert_array_equal(on_grid.whole, expected.whole)
    np.testing.assert_array_equal(on_grid.brain, expected.brain)
    coarse = make_patient(2002, visits=2, size=128)  # 1.875 mm: the card's own range
    c1, c2 = coarse.visits[0].images["t1c"], coarse.visits[0].images["flair"]
    np.testing.assert_array_equal(
        pipeline.segment_visit(c1, c2, coarse.spacing_mm).whole, segment(c1, c2, coarse.spacing_mm).whole
    )


def test_the_checked_range_runs_down_to_the_resample_range(
    resampling_model: PrognosisModel, tmp_path: Path
) -> None:
    _, visits = write_prognosis_patient(tmp_path / "p", PrognosisSpec(visits=2, seed=3, size=64, slices=16))
    current = visits[-1]
    study = study_of([f for key in ("t1c", "flair") for f in current.series[key].files])
    with pytest.raises(InputRefused) as refused:
        PrognosisPipeline(resampling_model).run(study, RunEnvironment(workdir=tmp_path / "out"))
    assert any("3.75 x 3.75 mm is outside 0.4-2.5 mm" in r for r in refused.value.reasons)


def test_the_shipped_cards_say_where_prognosis_was_measured() -> None:
    for version in ("1.0", "1.1", "1.2"):
        card = json.loads((version_dir("prognosis-growth", version) / "card.json").read_text())
        assert card["input_domain"]["pixel_spacing_mm"] == [0.9, 2.5]
        # only the version run at 512² on the grid takes finer pixels that way
        assert bool(card.get("resample")) == (version == "1.2")
    shipped = PrognosisModel.shipped()
    assert shipped.meta.version == "1.2" and shipped.resampling is not None
    assert shipped.resampling.applies((3.0, 0.47, 0.47))
    assert not shipped.resampling.applies((3.0, 0.94, 0.94))
