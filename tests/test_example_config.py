"""deploy/dicom-node.example.toml documents every key, with the real defaults."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from dicom_node.config import ArchiveSection, Caller, Destination, NodeConfig, load_config

EXAMPLE = Path(__file__).resolve().parents[1] / "deploy" / "dicom-node.example.toml"


def _uncommented(text: str) -> str:
    """The example with its commented-out sample tables switched on."""
    return re.sub(r"^# (\[|[a-z0-9_]+ = )", r"\1", text, flags=re.M)


def test_example_loads_and_matches_defaults() -> None:
    loaded = load_config(EXAMPLE)
    assert loaded.config == NodeConfig()


def test_every_key_of_every_section_is_documented() -> None:
    data = tomllib.loads(_uncommented(EXAMPLE.read_text()))
    for name, field in NodeConfig.model_fields.items():
        assert name in data, f"section [{name}] missing from the example"
        model = field.annotation
        section = data[name]
        if name == "callers":
            model, section = Caller, section[0]
        elif name == "destinations":
            model, section = Destination, next(iter(section.values()))
        elif name == "archives":
            model, section = ArchiveSection, next(iter(section.values()))
        assert isinstance(model, type) and issubclass(model, BaseModel)
        missing = set(model.model_fields) - set(section)
        assert not missing, f"[{name}] does not document {sorted(missing)}"


def test_sample_tables_validate() -> None:
    data: dict[str, Any] = tomllib.loads(_uncommented(EXAMPLE.read_text()))
    config = NodeConfig.model_validate(data)
    assert config.policy.file == "policy.yaml"
    assert config.caller("CT_SCANNER_1") is not None
    assert config.archives["pacs"].method == "c-move"
    assert config.archive_of("ORTHANC") == "pacs"


def test_the_scale_out_example_loads(tmp_path: Path) -> None:
    """deploy/scale-out/dicom-node.toml: PostgreSQL, the Celery engine, time limits."""
    loaded = load_config(EXAMPLE.parent / "scale-out" / "dicom-node.toml", tmp_path)
    workers = loaded.config.workers
    assert workers.engine == "celery" and workers.time_limit("restoration") == 1800.0
    assert str(loaded.config.storage.database_url).startswith("postgresql+psycopg://")
