"""Routes match on calling AE and, optionally, on modality, CTDIvol and Series Description."""

from __future__ import annotations

import pytest

from dicom_node.config import NodeConfig
from dicom_node.routing import SeriesFacts, routes_for

CONFIG = NodeConfig.model_validate(
    {
        "destinations": {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": 104}},
        "routes": [
            {
                "calling_ae": "*",
                "pipeline": "denoise-classical",
                "destinations": ["pacs"],
                "modality": "CT",
                "max_ctdivol": 5.0,
                "series_description": "low.?dose|ldct",
            },
            {"calling_ae": "CT1", "pipeline": "forward", "destinations": ["pacs"]},
        ],
    }
)

LOW = SeriesFacts("CT", "Chest routine", 2.5)
ROUTINE = SeriesFacts("CT", "Chest routine", 10.0)
NAMED_LOW = SeriesFacts("CT", "CHEST LOW DOSE 25%", 10.0)
NO_DOSE = SeriesFacts("CT", "axial", None)
MR = SeriesFacts("MR", "T1 low dose", 1.0)


@pytest.mark.parametrize(
    ("ae", "series", "expected"),
    [
        ("CT1", [LOW], ["denoise-classical", "forward"]),
        ("CT2", [LOW], ["denoise-classical"]),
        ("CT2", [ROUTINE], []),
        ("CT2", [NAMED_LOW], ["denoise-classical"]),
        ("CT2", [NO_DOSE], []),
        ("CT2", [MR], []),
        ("CT2", [ROUTINE, LOW], ["denoise-classical"]),
        ("CT1", [], ["forward"]),
        (None, [SeriesFacts("CT", "ldct", None)], ["denoise-classical"]),
    ],
)
def test_route_table(ae: str | None, series: list[SeriesFacts], expected: list[str]) -> None:
    assert [r.pipeline for r in routes_for(CONFIG, ae, series)] == expected


def test_bad_regex_is_refused_naming_the_key() -> None:
    with pytest.raises(Exception, match="series_description"):
        NodeConfig.model_validate({"routes": [{"series_description": "(unclosed"}]})
