"""The model zoo on disk: ``models/zoo/<name>/<version>/`` with ``card.json`` and weights.

Shared by every learned model: which version is the newest, reading and writing the model
card (``card.json``, the one place that knows the file's name and layout), and refusing
weights whose sha256 is not the one their model card states. No torch here (the CLI and
the demo read the zoo without loading a network).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Self

from models.base import ModelCard

ZOO = Path(__file__).parent / "zoo"
#: The model card's file name inside a model directory.
CARD_FILE = "card.json"


class WeightsMismatch(RuntimeError):
    pass


def sha256_of(path: Path | str) -> str:
    """Lower-case hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_card(directory: Path | str) -> dict[str, Any]:
    """The ``card.json`` of a model directory, parsed.

    Raises
    ------
    FileNotFoundError
        The directory has no card (the message names the path).
    """
    path = Path(directory) / CARD_FILE
    if not path.exists():
        raise FileNotFoundError(f"no model card at {path}")
    try:
        card = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"model card {path} is not valid JSON: {exc}") from None
    if not isinstance(card, dict):
        raise ValueError(f"model card {path} is not a JSON object")
    return card


def write_card(
    directory: Path | str, card: Mapping[str, Any], *, indent: int, sort_keys: bool = True
) -> Path:
    """Write ``card.json`` into a model directory; returns its path.

    ``indent`` and ``sort_keys`` are the card kind's layout: the shipped cards were written with
    them, and the same card written again must give the same bytes (and so the same diff).
    """
    path = Path(directory) / CARD_FILE
    path.write_text(json.dumps(card, indent=indent, sort_keys=sort_keys) + "\n")
    return path


@dataclass(kw_only=True)
class StoredCard:
    """The fields every learned model's ``card.json`` has, and reading and writing it.

    A model's card class adds its own fields and sets :attr:`JSON_INDENT` to the layout its
    shipped cards have (keys are always sorted).
    """

    JSON_INDENT: ClassVar[int] = 2

    name: str
    version: str
    weights_file: str
    weights_sha256: str
    architecture: dict[str, Any]
    intended_use: str
    training_data: str
    calibration: str
    metrics: dict[str, str] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    #: The series the model may be given (modality, Image Type, units, geometry, anatomy,
    #: sequence, image check; for restoration the calibrated input noise range). Checked by
    #: ``pipelines.domain`` before the model runs; empty: the default for its modality.
    input_domain: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def read_from(cls, directory: Path | str) -> Self:
        """The card of a model directory (``FileNotFoundError`` when it has none;
        ``ValueError`` when it is not this kind of card)."""
        card = read_card(directory)
        try:
            return cls(**card)
        except TypeError as exc:  # fields of another kind of model, or some missing
            what = str(exc).partition("__init__() ")[2] or str(exc)
            raise ValueError(
                f"{Path(directory) / CARD_FILE} is not a card of this kind of model "
                f"(it is {card.get('name')!r}): {what}"
            ) from None

    def write_to(self, directory: Path | str) -> Path:
        """Write this card as ``card.json`` into ``directory``; returns its path."""
        return write_card(directory, asdict(self), indent=self.JSON_INDENT)

    def verified_weights(self, directory: Path | str) -> Path:
        """The weights file this card names in ``directory``, after checking its sha256."""
        return verified_weights(Path(directory), self.weights_file, self.weights_sha256)

    def model_card(self) -> ModelCard:
        """The plain facts a pipeline reports about the model."""
        return ModelCard(
            name=self.name,
            version=self.version,
            weights_sha256=self.weights_sha256,
            intended_use=self.intended_use,
            training_data=self.training_data,
            metrics=dict(self.metrics),
            calibration=self.calibration,
        )


class ModelNotFound(ValueError):
    """A model version or directory that is not there (the message says what was looked for)."""


def versions(name: str, zoo: Path | None = None) -> list[str]:
    """Versions of ``name`` in ``zoo`` (default: the shipped one) that have a card, oldest first."""
    base = (zoo or ZOO) / name
    if not base.is_dir():
        return []
    return sorted((p.name for p in base.iterdir() if (p / CARD_FILE).exists()), key=_version_order)


def _version_order(version: str) -> tuple[tuple[int, int | str], ...]:
    """Numeric parts compare as numbers ("1.10" after "1.2"), the rest as text."""
    return tuple((0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"[.\-_]", version))


def model_names(zoo: Path | None = None) -> list[str]:
    """Every model with at least one version in ``zoo`` (default: the shipped one)."""
    root = zoo or ZOO
    return (
        sorted(p.name for p in root.iterdir() if p.is_dir() and versions(p.name, root))
        if root.is_dir()
        else []
    )


def version_dir(name: str, version: str | None = None) -> Path:
    """``models/zoo/<name>/<version>``; without a version, the newest one that has a card."""
    base = ZOO / name
    if version is None:
        found = versions(name)
        if not found:
            raise FileNotFoundError(f"no shipped versions of {name} under {base}")
        version = found[-1]
    return base / version


def resolve(name: str, pin: str | None = None, zoos: Sequence[Path] = ()) -> Path:
    """The directory of the version of model ``name`` that is to run.

    Parameters
    ----------
    name
        The model (e.g. ``ldct-restoration``).
    pin
        None: the newest version shipped with dicom-node (a site's own zoo never runs
        unpinned). A version (``"1.2"``): ``<zoo>/<name>/<pin>`` in ``zoos``, in order, then
        in the shipped zoo. A path (it contains ``/``): that model directory.
    zoos
        A site's zoo directories.

    Raises
    ------
    ModelNotFound
        One line: what was looked for, where, and what is there.
    """
    if pin is None:
        try:
            return version_dir(name)
        except FileNotFoundError as exc:
            raise ModelNotFound(str(exc)) from None
    if "/" in pin:
        directory = Path(pin)
        if not (directory / CARD_FILE).is_file():
            raise ModelNotFound(f"{directory} is not a model directory (no {CARD_FILE} in it)")
        return _of_model(directory, name)
    for zoo in (*zoos, ZOO):
        if (zoo / name / pin / CARD_FILE).is_file():
            return _of_model(zoo / name / pin, name)
    have = sorted({v for zoo in (*zoos, ZOO) for v in versions(name, zoo)}, key=_version_order)
    where = ", ".join(str(z) for z in (*zoos, ZOO))
    raise ModelNotFound(f"no version {pin!r} of {name} in {where} (there: {', '.join(have) or 'none'})")


def _of_model(directory: Path, name: str) -> Path:
    """``directory``, after checking that its card is a card of model ``name``: a pipeline
    given another model's directory would load it as its own (or run another task)."""
    try:
        card_name = read_card(directory).get("name")
    except ValueError as exc:
        raise ModelNotFound(str(exc)) from None
    if card_name != name:
        raise ModelNotFound(f"{directory} holds model {card_name!r}, not {name!r}")
    return directory


def verified_weights(directory: Path, weights_file: str, expected_sha256: str) -> Path:
    """The weights file of a model directory, after checking it is the one the card describes."""
    weights = Path(directory) / weights_file
    actual = sha256_of(weights)
    if actual != expected_sha256:
        raise WeightsMismatch(
            f"{weights}: sha256 {actual} does not match the model card ({expected_sha256}); "
            "refusing to run weights that are not the ones described"
        )
    return weights
