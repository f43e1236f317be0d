"""The model zoo on disk: ``models/zoo/<name>/<version>/`` with ``card.json`` and weights.

Shared by every learned model: which version is the newest, and refusing weights whose
sha256 is not the one their model card states. No torch here (the CLI and the demo read
the zoo without loading a network).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

ZOO = Path(__file__).parent / "zoo"


class WeightsMismatch(RuntimeError):
    pass


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def versions(name: str) -> list[str]:
    """Versions of ``name`` that have a card, oldest first (the last is the one pipelines use)."""
    base = ZOO / name
    if not base.exists():
        return []
    return sorted(p.name for p in base.iterdir() if (p / "card.json").exists())


def model_names() -> list[str]:
    """Every model with at least one version in the zoo."""
    return sorted(p.name for p in ZOO.iterdir() if p.is_dir() and versions(p.name)) if ZOO.exists() else []


def version_dir(name: str, version: str | None = None) -> Path:
    """``models/zoo/<name>/<version>``; without a version, the newest one that has a card."""
    base = ZOO / name
    if version is None:
        found = versions(name)
        if not found:
            raise FileNotFoundError(f"no shipped versions of {name} under {base}")
        version = found[-1]
    return base / version


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
