"""The zoo's model cards: one reader and writer, and re-writing a shipped card keeps its bytes."""

from __future__ import annotations

from pathlib import Path

import pytest

from models import zoo
from models.restoration import RestorationCard
from models.sct import SctCard
from models.zoo import CARD_FILE, ZOO, read_card, version_dir, write_card


@pytest.mark.parametrize(
    ("name", "version", "card_class"),
    [
        ("ldct-restoration", "1.2", RestorationCard),
        ("ldct-restoration", "1.3", RestorationCard),
        ("sct-head", "1.0", SctCard),
    ],
)
def test_a_shipped_card_written_again_is_byte_identical(
    tmp_path: Path, name: str, version: str, card_class: type[RestorationCard] | type[SctCard]
) -> None:
    shipped = version_dir(name, version)
    card = card_class.read_from(shipped)
    assert card.write_to(tmp_path) == tmp_path / CARD_FILE
    assert (tmp_path / CARD_FILE).read_bytes() == (shipped / CARD_FILE).read_bytes()
    assert card_class.read_from(tmp_path) == card


@pytest.mark.parametrize("version", ["1.0", "1.1"])
def test_an_older_restoration_card_gains_only_the_later_fields_defaults(tmp_path: Path, version: str) -> None:
    shipped = version_dir("ldct-restoration", version)
    RestorationCard.read_from(shipped).write_to(tmp_path)
    old, new = read_card(shipped), read_card(tmp_path)
    assert {k: new[k] for k in old} == old
    assert set(new) - set(old) <= {
        "lowpass_noise_factor",
        "model_error_correlation",
        "putback_noise_hu",
        "residual_lowpass_mm",
        "sigma_scale_by_group",
    }


def test_the_sim_encoder_card_keeps_its_key_order(tmp_path: Path) -> None:
    shipped = ZOO / "sim-encoder" / "1.0"
    write_card(tmp_path, read_card(shipped), indent=2, sort_keys=False)
    assert (tmp_path / CARD_FILE).read_bytes() == (shipped / CARD_FILE).read_bytes()


def test_a_directory_without_a_card_says_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=f"no model card at {tmp_path / CARD_FILE}"):
        read_card(tmp_path)
    with pytest.raises(FileNotFoundError, match="no model card"):
        RestorationCard.read_from(tmp_path)


def test_versions_are_ordered_by_number_not_by_text(tmp_path: Path) -> None:
    for version in ("1.2", "1.10", "1.9", "2.0-site"):
        (tmp_path / "m" / version).mkdir(parents=True)
        (tmp_path / "m" / version / "card.json").write_text('{"name": "m"}')
    assert zoo.versions("m", tmp_path) == ["1.2", "1.9", "1.10", "2.0-site"]
    assert zoo.resolve("m", "1.10", [tmp_path]) == tmp_path / "m" / "1.10"
    with pytest.raises(
        zoo.ModelNotFound, match=r"no version '3.0' of m in .* \(there: 1.2, 1.9, 1.10, 2.0-site\)"
    ):
        zoo.resolve("m", "3.0", [tmp_path])
