"""Every output object of a study carries its patient's names and identity as the source
does, whatever character set the scanner wrote.

Found by running studies with real-world Specific Character Sets through the writers: a
Japanese study (``\\ISO 2022 IR 87``: empty first value, as Japanese modalities write it)
failed at its first Parametric Map (highdicom refuses the empty value), and so did a Korean
one; and the overlay (Secondary Capture) left out the Issuer of Patient ID and the rest of
the Patient and Study modules that every other output carries.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from pipelines.volume import Volume, load_series
from pipelines.writers.common import UTF8, output_character_set
from tests.test_writers import simulated_ct, write_case


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        (None, None),
        ("", None),
        ("ISO_IR 100", "ISO_IR 100"),
        ("ISO_IR 192", "ISO_IR 192"),
        ("GB18030", "GB18030"),
        (["", "ISO 2022 IR 87"], ["ISO 2022 IR 6", "ISO 2022 IR 87"]),
        (["ISO 2022 IR 6", "ISO 2022 IR 87"], ["ISO 2022 IR 6", "ISO 2022 IR 87"]),
        (["ISO 2022 IR 13", "ISO 2022 IR 87"], ["ISO 2022 IR 13", "ISO 2022 IR 87"]),
        (["", "ISO 2022 IR 149"], UTF8),  # Korean: highdicom has no term for it
        (["ISO 2022 IR 87", "ISO 2022 IR 6"], UTF8),  # a multi-byte set may not come first
        (["ISO_IR 100", "ISO_IR 144"], UTF8),  # several sets without code extensions
        ("ISO 2022 IR 100", UTF8),  # a lone code-extension term
        ("ISO_IR 999", UTF8),  # not a defined term at all
    ],
)
def test_output_character_set(source: str | list[str] | None, expected: str | list[str] | None) -> None:
    ds = Dataset()
    if source is not None:
        ds.SpecificCharacterSet = source
    assert output_character_set(ds) == expected


CHARACTER_SETS: dict[str, tuple[str | list[str], str, str]] = {
    "latin-1": ("ISO_IR 100", "Müller^Jürgen", "Schädel nativ"),
    "utf-8": ("ISO_IR 192", "Wang^XiaoDong=王^小東", "頭部 CT"),
    "japanese": (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎=やまだ^たろう", "頭部"),
    "korean": (["", "ISO 2022 IR 149"], "Hong^Gildong=洪^吉洞=홍^길동", "뇌 CT"),
    "cyrillic": ("ISO_IR 144", "Иванов^Иван", "Голова"),
}


def _relabelled(
    volume: Volume, charset: str | list[str], name: str, description: str, folder: Path
) -> Volume:
    """The same series with the patient's name, the study description and the issuer in
    ``charset``: written and read back, so the values are what pydicom decodes from bytes."""
    folder.mkdir(parents=True)
    paths = []
    for k, original in enumerate(volume.datasets):
        ds = copy.deepcopy(original)
        ds.SpecificCharacterSet = charset
        ds.PatientName = name
        ds.StudyDescription = description
        ds.IssuerOfPatientID = "HOSPITAL-A"
        other = Dataset()
        other.PatientID = "OTHER-7"
        other.IssuerOfPatientID = "HOSPITAL-B"
        other.TypeOfPatientID = "TEXT"
        ds.OtherPatientIDsSequence = [other]
        paths.append(folder / f"{k}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    return load_series([pydicom.dcmread(p) for p in paths])


@pytest.fixture(scope="module")
def source_volume(tmp_path_factory: pytest.TempPathFactory) -> Volume:
    return simulated_ct(tmp_path_factory.mktemp("charset-source"))


@pytest.mark.parametrize("which", sorted(CHARACTER_SETS))
def test_every_output_keeps_the_patient_identity(which: str, source_volume: Volume, tmp_path: Path) -> None:
    charset, name, description = CHARACTER_SETS[which]
    volume = _relabelled(source_volume, charset, name, description, tmp_path / "in")
    case = write_case(which, volume, tmp_path / "out")
    kinds = set()
    for path in case.paths:
        out = pydicom.dcmread(path)  # from bytes: what a PACS decodes
        kinds.add(str(out.SOPClassUID.name))
        where = f"{out.SOPClassUID.name} ({path.name})"
        assert str(out.PatientName) == name, where
        assert out.StudyDescription == description, where
        assert out.IssuerOfPatientID == "HOSPITAL-A", where
        assert out.OtherPatientIDsSequence[0].IssuerOfPatientID == "HOSPITAL-B", where
        assert out.PatientID == volume.datasets[0].PatientID, where
    assert {
        "Parametric Map Storage",
        "Segmentation Storage",
        "Secondary Capture Image Storage",
        "Comprehensive SR Storage",
    } <= kinds


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools not installed")
def test_japanese_outputs_pass_dciodvfy(source_volume: Volume, tmp_path: Path) -> None:
    charset, name, description = CHARACTER_SETS["japanese"]
    case = write_case(
        "japanese", _relabelled(source_volume, charset, name, description, tmp_path / "in"), tmp_path / "o"
    )
    for path in case.paths:
        if pydicom.dcmread(path, stop_before_pixels=True).Modality == "CT":
            continue  # the derived CT series is checked in test_writers
        run = subprocess.run(["dciodvfy", "-new", str(path)], capture_output=True, text=True, check=False)
        errors = [
            line
            for line in (run.stdout + run.stderr).splitlines()
            if line.startswith("Error") and "Synthetic" not in line
        ]
        assert errors == [], f"{path.name}: {errors}"
