"""Which pipeline a ready study goes to, and where its results are delivered.

A placeholder until the policy engine lands: ``[[routes]]`` in the config map the calling
AE title that sent the study (``"*"`` for any) and, optionally, what the study holds
(modality, CTDIvol below a value, Series Description matching a pattern) to a pipeline
and destinations. Every matching route yields its own job.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dicom_node.config import NodeConfig, Route


@dataclass(frozen=True)
class SeriesFacts:
    """What routing looks at in each series of a ready study."""

    modality: str | None
    description: str | None
    #: Lowest CTDIvol (mGy) of the series' instances, if they carry one.
    ctdivol: float | None


def _series_matches(route: Route, s: SeriesFacts) -> bool:
    if route.modality is not None and (s.modality or "").upper() != route.modality.upper():
        return False
    dose_ok = route.max_ctdivol is not None and s.ctdivol is not None and s.ctdivol < route.max_ctdivol
    text_ok = route.series_description is not None and bool(
        re.search(route.series_description, s.description or "", re.IGNORECASE)
    )
    if route.max_ctdivol is None and route.series_description is None:
        return True
    return dose_ok or text_ok


def routes_for(
    config: NodeConfig, calling_ae: str | None, series: list[SeriesFacts] | None = None
) -> list[Route]:
    """All routes that match a study sent by ``calling_ae`` holding ``series``, in file order."""
    matched = []
    for route in config.routes:
        if route.calling_ae not in ("*", calling_ae):
            continue
        conditional = route.modality or route.max_ctdivol is not None or route.series_description
        if conditional and not any(_series_matches(route, s) for s in series or []):
            continue
        matched.append(route)
    return matched
