"""The input domain: what a model was made for, checked before it runs.

A model card's ``input_domain`` (``models/zoo/<name>/<version>/card.json``) declares the
series the model may be given: modality and SOP classes; Image Type (an ORIGINAL PRIMARY
acquisition, never a map, a localizer or a derived series); Rescale Type (units); the
photometric interpretation; the orientation; pixel spacing, slice thickness and image
size ranges; the body region; for MR the sequence family; and which image check applies.
A card without one (a site's older card) gets :func:`default_domain` for its modality:
an original axial acquisition of ordinary clinical geometry.

Two stages check it, and either refuses with :class:`pipelines.base.InputRefused`, every
reason at once, so the job ends ``refused`` (not ``failed``) and the rule's fallback applies:

- :class:`CheckInputHeaders`, right after the series is selected: the tags, before a pixel
  is decoded;
- :class:`CheckInputImage`, right after the volume is loaded: the pixels, where tags cannot
  be trusted. ``ct-tissue-in-air``: the HU histogram of the field of view holds air and
  mostly soft tissue, as a CT of a body in air does (a perfusion map, an unscaled image or
  a reconstruction cropped inside the body does not). ``mr-head``: a whole head lies in the
  field of view: a closed, head-sized, roughly oval body outline with a dark (skull) layer
  beneath a brighter rim — a shoulder or a pelvis runs off the image or is too large, a
  phantom has no skull.

The card's ``calibrated_noise_hu`` is not a refusal: it is the range of input noise the
model's calibration saw (:mod:`pipelines.baseline` runs the classical baseline outside it).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pydicom
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydicom.dataset import Dataset
from pydicom.uid import UID

from pipelines import spill
from pipelines.base import InputRefused, series_label
from pipelines.geometry import frame_group, orientation_name
from pipelines.stages import Context
from pipelines.volume import Volume

CT_IMAGE, ENHANCED_CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1"
MR_IMAGE, ENHANCED_MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.4.1"

#: Image Type values that mark what no model here was made for, whatever the first two
#: values say: localizers, maps (perfusion, diffusion, relaxometry), projections, reformats.
REFUSED_IMAGE_TYPE_VALUES = frozenset(
    {
        "LOCALIZER", "SCOUT", "PERFUSION", "SUBTRACTION", "MIP", "MINIP", "MPR", "CURVED MPR",
        "PROJECTION IMAGE", "REFORMATTED", "CALCIUM SCORE", "RCBF", "RCBV", "MTT", "TTP",
        "ADC", "EADC", "FA", "TRACEW", "T1 MAP", "T2 MAP", "T2* MAP", "MOCO", "PHASE MAP",
    }
)  # fmt: skip

#: Acquisition rule per MR sequence family a card can name: (TR ms, TE ms) → matches.
#: T1-weighted spin echo: short TR and short TE (the simulator's T1w is TR 500, TE 12). An
#: inversion-prepared T1 (e.g. MPRAGE, TR about 2000 ms) is not: no model here saw one.
CONTRAST_RULES: dict[str, tuple[str, Callable[[float, float], bool]]] = {
    "t1w": ("T1-weighted (TR < 1000 ms and TE < 30 ms)", lambda tr, te: tr < 1000.0 and te < 30.0),
    # T2-weighted spin echo: long TR and long TE (the simulator's T2w is TR 4000, TE 100).
    "t2w": ("T2-weighted (TR >= 2000 ms and TE >= 60 ms)", lambda tr, te: tr >= 2000.0 and te >= 60.0),
}

#: Whole words of a description that name a body region (for a series without Body Part
#: Examined); a description naming one of the domain's regions is never held against it.
REGION_WORDS = frozenset(
    {
        "HEAD", "BRAIN", "SKULL", "NEURO", "CHEST", "THORAX", "LUNG", "LUNGS", "NECK", "ABDOMEN",
        "PELVIS", "PANCREAS", "LIVER", "KIDNEY", "SPINE", "CSPINE", "LSPINE", "TSPINE", "SHOULDER",
        "KNEE", "HIP", "ANKLE", "FOOT", "HAND", "WRIST", "ELBOW", "BREAST", "PROSTATE", "HEART",
        "CARDIAC", "EXTREMITY", "LEG", "ARM", "ABD", "PELV",
    }
)  # fmt: skip
#: Synonyms a domain's body part also accepts in a description.
_REGION_SYNONYMS = {"HEAD": {"BRAIN", "SKULL", "NEURO"}, "CHEST": {"THORAX", "LUNG", "LUNGS"}}

_DESCRIPTIONS = ("StudyDescription", "SeriesDescription", "ProtocolName")
_TAGS = [
    "Modality", "SOPClassUID", "SeriesNumber", "ImageType", "RescaleType", "PhotometricInterpretation",
    "PixelSpacing", "SliceThickness", "Rows", "Columns", "ImageOrientationPatient",
    "BodyPartExamined", "SeriesInstanceUID", *_DESCRIPTIONS, "RepetitionTime", "EchoTime",
    "EffectiveEchoTime", "MagneticFieldStrength", "ScanningSequence", "EchoPulseSequence",
    "InversionRecovery", "EchoPlanarPulseSequence", "EchoNumbers",
    "SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence",
]  # fmt: skip

ImageCheck = Literal["ct-tissue-in-air", "mr-head"]
#: "axial" admits a gantry-tilted or an oblique axial series: the slice normal within this
#: many degrees of the patient's head-foot axis.
MAX_AXIAL_TILT_DEG = 30.0
#: How far an input's Magnetic Field Strength may be from one the model was trained at:
#: scanners of one nominal field report it differently (a 3 T Siemens says 2.89, a 1.5 T
#: one 1.494), and a 1.5 T model must not take a 1.0 T or 1.2 T open scanner's images.
FIELD_TOLERANCE_T = 0.15
#: Scanning Sequence (0018,0020) defined terms, and what each is called in a reason.
SCANNING_SEQUENCES = frozenset({"SE", "IR", "GR", "EP", "RM"})
_SEQUENCE_NAMES = {
    "SE": "spin echo", "IR": "inversion recovery", "GR": "gradient echo", "EP": "echo planar",
    "RM": "research mode",
}  # fmt: skip
#: Above this a Magnetic Field Strength is in gauss, as older GE scanners write it (15000).
_GAUSS_ABOVE = 100.0


class CalibratedNoise(BaseModel):
    """The input noise the model's calibration saw (σ estimate, HU): the baseline runs outside it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    low: float = Field(gt=0)
    high: float = Field(gt=0)
    #: How the noise was estimated; only the one :func:`pipelines.baseline.input_noise_hu` computes.
    estimator: Literal["immerkaer-fov-median"] = "immerkaer-fov-median"
    #: Where the range was measured (free text, for the reader of the card).
    measured_on: str = ""

    @model_validator(mode="after")
    def _ordered(self) -> CalibratedNoise:
        if self.low > self.high:
            raise ValueError(f"low {self.low:g} is above high {self.high:g}")
        return self

    def __contains__(self, value: float) -> bool:
        return self.low <= value <= self.high


def _check_range(value: tuple[float, float] | None) -> tuple[float, float] | None:
    if value is not None and not 0 < value[0] <= value[1]:
        raise ValueError(f"expected [low, high] with 0 < low <= high, got {list(value)}")
    return value


class InputDomain(BaseModel):
    """A model card's ``input_domain`` section (unknown keys refused)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    modality: Literal["CT", "MR"]
    sop_classes: tuple[str, ...]
    #: The leading Image Type values an input must have (e.g. ORIGINAL, PRIMARY).
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY")
    #: Slice orientation; None: any.
    orientation: Literal["axial"] | None = "axial"
    #: Rescale Type an input may declare (absent counts as HU on CT, as the CT IOD says);
    #: empty: not checked (MR values are in arbitrary units anyway).
    rescale_types: tuple[str, ...] = ()
    photometric_interpretations: tuple[str, ...] = ("MONOCHROME2",)
    pixel_spacing_mm: tuple[float, float] | None = None
    slice_thickness_mm: tuple[float, float] | None = None
    #: Rows and Columns, each within [low, high].
    image_size_px: tuple[int, int] | None = None
    #: Body Part Examined values accepted (upper case); empty: any.
    body_parts: tuple[str, ...] = ()
    #: MR sequence family (a key of :data:`CONTRAST_RULES`); None: not checked.
    sequence: str | None = None
    #: Main field strengths (T) the model was trained and evaluated at: an MR input's
    #: Magnetic Field Strength must be within :data:`FIELD_TOLERANCE_T` of one (relaxation
    #: times, hence contrast, change with the field). Empty: not checked.
    field_strengths_t: tuple[float, ...] = ()
    #: Scanning Sequence values (0018,0020) an MR input may have, every one of them in this
    #: set (SE spin echo, IR inversion recovery, GR gradient recalled, EP echo planar, RM
    #: research mode); an enhanced MR's Echo Pulse Sequence, Inversion Recovery and Echo
    #: Planar Pulse Sequence are read as the same letters. Empty: not checked.
    scanning_sequences: tuple[str, ...] = ()
    image_check: ImageCheck | None = None
    calibrated_noise_hu: CalibratedNoise | None = None

    _ranges = field_validator("pixel_spacing_mm", "slice_thickness_mm", "image_size_px")(_check_range)

    @field_validator("sop_classes")
    @classmethod
    def _uids(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        bad = [v for v in value if not UID(v).is_valid]
        if not value or bad:
            raise ValueError(f"expected a non-empty list of SOP Class UIDs, got {list(value)}")
        return value

    @field_validator("image_type", "rescale_types", "photometric_interpretations", "body_parts")
    @classmethod
    def _upper(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(v.strip().upper() for v in value)

    @field_validator("field_strengths_t")
    @classmethod
    def _fields(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if any(not 0 < v <= 20 for v in value):
            raise ValueError(f"expected field strengths in tesla (0-20], got {list(value)}")
        return value

    @field_validator("scanning_sequences")
    @classmethod
    def _scanning(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return scanning_letters(value)

    @field_validator("sequence")
    @classmethod
    def _known_sequence(cls, value: str | None) -> str | None:
        if value is not None and value not in CONTRAST_RULES:
            raise ValueError(
                f"{value!r} has no acquisition rule (known: {', '.join(sorted(CONTRAST_RULES))})"
            )
        return value


def scanning_letters(value: Iterable[str]) -> tuple[str, ...]:
    """A card's Scanning Sequence values, upper case (``ValueError`` naming any that is not
    a defined term of :data:`SCANNING_SEQUENCES`)."""
    letters = tuple(str(v).strip().upper() for v in value)
    unknown = sorted(set(letters) - SCANNING_SEQUENCES)
    if unknown:
        raise ValueError(
            f"unknown Scanning Sequence {unknown} (known: {', '.join(sorted(SCANNING_SEQUENCES))})"
        )
    return letters


def default_domain(modality: str, sequence: str | None = None) -> InputDomain:
    """The conservative domain of a model whose card declares none: an original primary
    axial acquisition of ordinary clinical geometry in the model's modality (CT in HU)."""
    if modality == "CT":
        return InputDomain(
            modality="CT",
            sop_classes=(CT_IMAGE, ENHANCED_CT_IMAGE),
            rescale_types=("HU",),
            pixel_spacing_mm=(0.2, 2.0),
            slice_thickness_mm=(0.5, 10.0),
            image_size_px=(64, 1024),
            image_check="ct-tissue-in-air",
        )
    if modality == "MR":
        return InputDomain(
            modality="MR",
            sop_classes=(MR_IMAGE, ENHANCED_MR_IMAGE),
            pixel_spacing_mm=(0.2, 3.0),
            slice_thickness_mm=(0.5, 10.0),
            image_size_px=(64, 1024),
            sequence=sequence,
        )
    raise ValueError(f"no default input domain for modality {modality!r} (CT or MR)")


#: The ``denoise-classical`` pipeline's own domain. No learned model, so no anatomy and no
#: noise range, and wide geometry; still an original primary acquisition, never a map, a
#: localizer or a derived series: a CT in HU that looks like tissue in air, or an MR image.
CLASSICAL_DOMAINS = (
    InputDomain(
        modality="CT",
        sop_classes=(CT_IMAGE, ENHANCED_CT_IMAGE),
        rescale_types=("HU",),
        pixel_spacing_mm=(0.1, 5.0),
        image_size_px=(32, 2048),
        image_check="ct-tissue-in-air",
    ),
    InputDomain(
        modality="MR",
        sop_classes=(MR_IMAGE, ENHANCED_MR_IMAGE),
        orientation=None,
        pixel_spacing_mm=(0.1, 5.0),
        image_size_px=(32, 2048),
    ),
)


def domain_of_card(card: Mapping[str, Any], modality: str) -> tuple[InputDomain, str]:
    """The input domain a model card declares and the model's name for messages.

    A card without ``input_domain`` (or with an empty one) gets :func:`default_domain` of
    ``modality`` (with the card's ``input_sequence``, if any), and the name says so.

    Raises
    ------
    ValueError
        One line naming the card, the key and the problem.
    """
    label = f"{card.get('name', '?')} {card.get('version', '?')}"
    sequence = card.get("input_sequence")
    raw = card.get("input_domain") or {}
    if not raw:
        return default_domain(
            modality, sequence
        ), f"{label} (its card declares no input domain: the {modality} default)"
    try:
        domain = InputDomain.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ValueError(f"model card {label}: input_domain.{where}: {first['msg']}") from None
    if domain.modality != modality:
        raise ValueError(
            f"model card {label}: input_domain.modality is {domain.modality}, the pipeline reads {modality}"
        )
    if sequence and domain.sequence != sequence:
        raise ValueError(
            f"model card {label}: input_domain.sequence {domain.sequence!r} is not "
            f"its input_sequence {sequence!r}"
        )
    return domain, label


# -- the tags -----------------------------------------------------------------------------------
def _text(values: Iterable[str]) -> str:
    found = sorted(set(values))
    return ", ".join(found[:3]) + (f" (and {len(found) - 3} more)" if len(found) > 3 else "")


def _range_text(low: float, high: float, unit: str) -> str:
    return f"{low:g}–{high:g}{unit}"


def _frame_items(ds: Dataset, group: str) -> list[Dataset]:
    """The ``group`` functional group items of every frame of an enhanced instance (none else)."""
    frames = ds.get("PerFrameFunctionalGroupsSequence")
    if not frames and not ds.get("SharedFunctionalGroupsSequence"):
        return []
    numbers: list[int | None] = list(range(1, len(frames) + 1)) if frames else [None]
    items = [frame_group(ds, n, group) for n in numbers]
    return [i for i in items if i is not None]


def _image_types(ds: Dataset) -> set[tuple[str, ...]]:
    """Image Type, and each frame's Frame Type of an enhanced instance."""
    found: set[tuple[str, ...]] = set()
    for value in [ds.get("ImageType")] + [
        item.get("FrameType")
        for group in ("CTImageFrameTypeSequence", "MRImageFrameTypeSequence")
        for item in _frame_items(ds, group)
    ]:
        if value:
            values = [value] if isinstance(value, str) else list(value)
            found.add(tuple(str(v).strip().upper() for v in values))
    return found


def _rescale_types(ds: Dataset) -> set[str]:
    found = {str(ds.RescaleType).strip().upper()} if ds.get("RescaleType") else set()
    for item in _frame_items(ds, "PixelValueTransformationSequence"):
        if item.get("RescaleType"):
            found.add(str(item.RescaleType).strip().upper())
    return found


def _numbers(value: Any, count: int | None = None) -> tuple[float, ...] | None:
    """A multi-valued number as floats; None when absent, malformed or not ``count`` long
    (a value the node cannot read counts as not given)."""
    if value in (None, ""):
        return None
    values = [value] if isinstance(value, str | int | float) else list(value)
    try:
        numbers = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        return None
    return numbers if numbers and (count is None or len(numbers) == count) else None


def _measures(ds: Dataset, keyword: str, group: str, count: int) -> set[tuple[float, ...]]:
    """``keyword`` at the top level and in each frame's functional group ``group``."""
    values = [ds.get(keyword)] + [i.get(keyword) for i in _frame_items(ds, group)]
    return {n for n in (_numbers(v, count) for v in values) if n is not None}


def _pixel_spacings(ds: Dataset) -> set[tuple[float, ...]]:
    return _measures(ds, "PixelSpacing", "PixelMeasuresSequence", 2)


def _slice_thicknesses(ds: Dataset) -> set[float]:
    return {t for (t,) in _measures(ds, "SliceThickness", "PixelMeasuresSequence", 1)}


def _tilts(ds: Dataset) -> set[tuple[float, str]]:
    """(angle of the slice normal from the head-foot axis in degrees, orientation name) of
    every plane orientation the instance gives."""
    found = set()
    for cosines in _measures(ds, "ImageOrientationPatient", "PlaneOrientationSequence", 6):
        normal = np.cross(cosines[:3], cosines[3:])
        angle = float(np.degrees(np.arccos(min(1.0, abs(float(normal[2]))))))
        found.add((round(angle, 1), orientation_name(cosines)))
    return found


def _timing(ds: Dataset, keyword: str, group: str) -> float | None:
    """``keyword`` at the top level, else in the shared functional group ``group`` (enhanced MR)."""
    value = ds.get(keyword)
    if value in (None, ""):
        shared = ds.get("SharedFunctionalGroupsSequence")
        items = shared[0].get(group) if shared else None
        value = items[0].get(keyword) if items else None
    try:
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _timings(ds: Dataset) -> tuple[float, float] | None:
    tr = _timing(ds, "RepetitionTime", "MRTimingAndRelatedParametersSequence")
    te = _timing(ds, "EchoTime", "MREchoSequence")
    if te is None:
        te = _timing(ds, "EffectiveEchoTime", "MREchoSequence")
    return (tr, te) if tr is not None and te is not None else None


def _region_words(ds: Dataset) -> dict[str, set[str]]:
    """Region words each description names (description keyword → words)."""
    found: dict[str, set[str]] = {}
    for keyword in _DESCRIPTIONS:
        words = set(re.findall(r"[A-Z]+", str(ds.get(keyword, "") or "").upper())) & REGION_WORDS
        if words:
            found[keyword] = words
    return found


def header_reasons(datasets: Sequence[Dataset], domain: InputDomain, model: str) -> list[str]:
    """Why the series of ``datasets`` (headers suffice) is outside ``domain``; [] when inside.

    Each reason starts with what was checked (``modality``, ``SOP class``, ``Image Type``,
    ``Rescale Type``, ``Photometric Interpretation``, ``orientation``, ``pixel spacing``,
    ``slice thickness``, ``image size``, ``anatomy check (tags)``, ``sequence``, ``field strength``,
    ``scanning sequence``, ``echoes``).
    """
    reasons: list[str] = []
    modalities = {str(ds.get("Modality", "") or "(none)") for ds in datasets}
    if modalities != {domain.modality}:
        reasons.append(f"modality {_text(modalities)}: {model} takes {domain.modality}")
    classes = {str(ds.get("SOPClassUID", "")) for ds in datasets}
    if not classes <= set(domain.sop_classes):
        names = [UID(c).name for c in sorted(classes - set(domain.sop_classes))]
        wanted = ", ".join(UID(c).name for c in domain.sop_classes)
        reasons.append(f"SOP class {_text(names)}: {model} takes {wanted}")
    types = set().union(*(_image_types(ds) for ds in datasets)) if datasets else set()
    wanted_type = tuple(domain.image_type)
    off = sorted(
        t for t in types if t[: len(wanted_type)] != wanted_type or REFUSED_IMAGE_TYPE_VALUES & set(t)
    )
    if off or not types:
        seen = "\\".join(off[0]) if off else "(none)"
        flagged = ", ".join(sorted(REFUSED_IMAGE_TYPE_VALUES & set(off[0]))) if off else ""
        joined = "\\".join(wanted_type)
        if off and off[0][: len(wanted_type)] == wanted_type:
            reasons.append(
                f"Image Type {seen}: {flagged} marks a map, a localizer or a reformat, not an acquisition"
            )
        else:
            marks = f" ({flagged}: a map, a localizer or a reformat)" if flagged else ""
            reasons.append(f"Image Type {seen}: not an {joined} acquisition{marks}")
    if domain.rescale_types:
        rescale = set().union(*(_rescale_types(ds) for ds in datasets)) if datasets else set()
        if domain.modality == "CT" and not rescale:
            rescale = {"HU"}  # the CT Image IOD: Rescale Type is present only when not HU
        if not rescale <= set(domain.rescale_types):
            units = "/".join(domain.rescale_types)
            reasons.append(
                f"Rescale Type {_text(rescale - set(domain.rescale_types))}: pixel values are not {units}"
            )
    photometric = {str(ds.get("PhotometricInterpretation", "") or "(none)") for ds in datasets}
    if not photometric <= set(domain.photometric_interpretations):
        wanted = ", ".join(domain.photometric_interpretations)
        reasons.append(f"Photometric Interpretation {_text(photometric)}: {model} reads {wanted}")
    if domain.orientation:
        tilts = set().union(*(_tilts(ds) for ds in datasets)) if datasets else set()
        off_axis = sorted(t for t in tilts if t[0] > MAX_AXIAL_TILT_DEG)
        if off_axis or not tilts:
            seen = (
                f"{off_axis[-1][1]} (slice normal {off_axis[-1][0]:.0f}° from the head-foot axis)"
                if off_axis
                else "not given"
            )
            reasons.append(
                f"orientation {seen}: {model} takes axial slices (tilted up to {MAX_AXIAL_TILT_DEG:g}°)"
            )
    if domain.pixel_spacing_mm:
        low, high = domain.pixel_spacing_mm
        spacings = set().union(*(_pixel_spacings(ds) for ds in datasets)) if datasets else set()
        off_spacing = sorted(s for s in spacings if not all(low <= v <= high for v in s))
        expected = _range_text(low, high, " mm")
        if off_spacing:
            seen = "×".join(f"{v:g}" for v in off_spacing[0])
            reasons.append(f"pixel spacing {seen} mm outside {expected}")
        elif not spacings:
            reasons.append(f"pixel spacing not given ({expected} expected)")
    if domain.slice_thickness_mm:
        low, high = domain.slice_thickness_mm
        thick = set().union(*(_slice_thicknesses(ds) for ds in datasets)) if datasets else set()
        off_thick = sorted(t for t in thick if not low <= t <= high)
        if off_thick:  # a series that does not say is judged by its geometry when loaded
            reasons.append(f"slice thickness {off_thick[0]:g} mm outside {_range_text(low, high, ' mm')}")
    if domain.image_size_px:
        low_px, high_px = domain.image_size_px
        sizes = {
            (int((_numbers(ds.get("Rows"), 1) or (0,))[0]), int((_numbers(ds.get("Columns"), 1) or (0,))[0]))
            for ds in datasets
        }
        off_size = sorted(s for s in sizes if not all(low_px <= v <= high_px for v in s))
        if off_size:
            rows, cols = off_size[0]
            reasons.append(f"image size {rows}×{cols} outside {low_px}–{high_px} px")
    if domain.body_parts:
        reasons += _anatomy_from_tags(datasets, domain, model)
    if domain.sequence:
        reasons += _sequence_reasons(datasets, domain.sequence, model)
    if domain.field_strengths_t:
        reasons += field_strength_reasons(datasets, domain.field_strengths_t, model)
    if domain.scanning_sequences:
        reasons += scanning_sequence_reasons(datasets, domain.scanning_sequences, model)
    if domain.modality == "MR":
        reasons += echo_reasons(datasets, model)
    return reasons


def echo_reasons(datasets: Sequence[Dataset], model: str) -> list[str]:
    """Why the MR series of ``datasets`` is not one image per slice: it holds several echoes
    (Echo Numbers) at the same positions, which no model here was trained on; [] when one."""
    echoes = sorted({e for e in (_numbers(ds.get("EchoNumbers"), 1) for ds in datasets) if e is not None})
    if len(echoes) < 2:
        return []
    listed = ", ".join(f"{e[0]:g}" for e in echoes)
    return [
        f"echoes: the series holds echoes {listed} at the same slice positions; {model} takes one "
        "image per slice (have the scanner send each echo as its own series, or select one)"
    ]


def _anatomy_from_tags(datasets: Sequence[Dataset], domain: InputDomain, model: str) -> list[str]:
    wanted = set(domain.body_parts)
    parts = {str(ds.BodyPartExamined).strip().upper() for ds in datasets if ds.get("BodyPartExamined")}
    takes = f"{model} takes {', '.join(domain.body_parts)}"
    if parts:
        return (
            []
            if parts <= wanted
            else [f"anatomy check (tags): Body Part Examined {_text(parts - wanted)}; {takes}"]
        )
    accepted = wanted.union(*(_REGION_SYNONYMS.get(p, set()) for p in wanted))
    for keyword, words in _region_words(datasets[0]).items() if datasets else ():
        if not words & accepted:
            return [f"anatomy check (tags): {keyword} names {_text(words)}; {takes}"]
    return []


def _sequence_reasons(datasets: Sequence[Dataset], sequence: str, model: str) -> list[str]:
    what, matches = CONTRAST_RULES[sequence]
    timings = {t for t in (_timings(ds) for ds in datasets) if t is not None}
    wrong = sorted(t for t in timings if not matches(*t))
    if not wrong:  # a series without TR and TE passes: the node cannot tell
        return []
    series_uid = str(datasets[0].get("SeriesInstanceUID", "?"))
    seen = ", ".join(f"TR {tr:g} ms / TE {te:g} ms" for tr, te in wrong[:3])
    return [
        f"sequence: MR series {series_uid} is not {what}: it has {seen}; {model} takes {sequence} MR only "
        "(send the matching series, or select it in the policy rule)"
    ]


def _field_strength(ds: Dataset) -> float | None:
    """Magnetic Field Strength in tesla (a value in gauss converted); None when absent,
    unreadable or not positive."""
    value = _numbers(ds.get("MagneticFieldStrength"), 1)
    if value is None or not value[0] > 0:
        return None
    return value[0] / 10_000.0 if value[0] > _GAUSS_ABOVE else value[0]


def field_strength_reasons(datasets: Sequence[Dataset], trained: tuple[float, ...], model: str) -> list[str]:
    """Why the series of ``datasets`` is outside the field strengths ``trained`` (tesla,
    each ± :data:`FIELD_TOLERANCE_T`); [] when inside. A series that does not say is outside."""
    fields = [_field_strength(ds) for ds in datasets]
    known = " or ".join(f"{t:g} T" for t in trained)
    takes = f"{model} was trained at {known} (± {FIELD_TOLERANCE_T:g} T)"
    if any(f is None for f in fields):
        return [
            f"field strength not given (Magnetic Field Strength, 0018,0087): {takes}, and contrast "
            "changes with the field; the node does not guess it"
        ]
    off = sorted(
        {f for f in fields if f is not None and min(abs(f - t) for t in trained) > FIELD_TOLERANCE_T}
    )
    if off:
        return [f"field strength {off[0]:g} T: {takes}"]
    return []


def _flag(ds: Dataset, keyword: str, group: str) -> bool:
    """An enhanced MR's YES/NO ``keyword`` at the top level or in the shared group ``group``."""
    value = ds.get(keyword)
    if value in (None, ""):
        shared = ds.get("SharedFunctionalGroupsSequence")
        items = shared[0].get(group) if shared else None
        value = items[0].get(keyword) if items else None
    return str(value or "").strip().upper() == "YES"


def _scanning_sequence(ds: Dataset) -> set[str] | None:
    """The Scanning Sequence letters of an instance; an enhanced MR's from its Echo Pulse
    Sequence and flags. None when the instance does not say."""
    value = ds.get("ScanningSequence")
    if value not in (None, ""):
        values = [value] if isinstance(value, str) else list(value)
        given = {str(v).strip().upper() for v in values if str(v).strip()}
        return given or None
    pulse = str(ds.get("EchoPulseSequence", "") or "").strip().upper()
    if pulse not in ("SPIN", "GRADIENT", "BOTH"):
        return None
    letters = {"SPIN": {"SE"}, "GRADIENT": {"GR"}, "BOTH": {"SE", "GR"}}[pulse]
    if _flag(ds, "InversionRecovery", "MRModifierSequence"):
        letters.add("IR")
    if _flag(ds, "EchoPlanarPulseSequence", "MRModifierSequence"):
        letters.add("EP")
    return letters


def scanning_sequence_reasons(
    datasets: Sequence[Dataset], allowed: tuple[str, ...], model: str, *, exact: bool = False
) -> list[str]:
    """Why the MR series of ``datasets`` is outside the Scanning Sequences ``allowed`` (every
    letter an instance has must be one of them; with ``exact``, every one of them must be
    there too: a FLAIR role declared ``SE\\IR`` takes no series that says spin echo alone,
    whatever its inversion time); [] when inside. A series that does not say (neither
    Scanning Sequence nor an enhanced MR's Echo Pulse Sequence) is outside."""
    trained = "\\".join(allowed) + f" ({', '.join(_SEQUENCE_NAMES.get(a, a) for a in allowed)})"
    takes = f"{model} was trained on {trained} images only"
    found = [_scanning_sequence(ds) for ds in datasets]
    if any(f is None for f in found):
        return [f"scanning sequence not given (Scanning Sequence, 0018,0020): {takes}"]
    declared = set(allowed)
    off = sorted({"\\".join(sorted(f)) for f in found if f is not None and not f <= declared})
    short = sorted({"\\".join(sorted(f)) for f in found if f is not None and f != declared}) if exact else []
    if not off and not short:
        return []
    seen = (off or short)[0]
    letters = seen.split("\\")
    said = f"{seen} ({', '.join(_SEQUENCE_NAMES.get(x, x) for x in letters)})"
    if not off:  # every letter declared, but not every declared letter given
        lacking = sorted(declared - set(letters))
        said += " without " + ", ".join(f"{x} ({_SEQUENCE_NAMES.get(x, x)})" for x in lacking)
    return [f"scanning sequence {said}: {takes}, and the contrast differs"]


# -- the pixels ---------------------------------------------------------------------------------
#: ct-tissue-in-air: HU below this is air (or lung); between the soft-tissue limits, soft tissue and fat.
AIR_BELOW_HU = -700.0
SOFT_TISSUE_HU = (-200.0, 300.0)
#: Least share of the field of view that is air, and of the rest that is soft tissue.
MIN_AIR_SHARE = 0.02
MIN_SOFT_TISSUE_SHARE = 0.30
#: Below this a voxel is padding or outside the reconstruction circle, not image.
_PADDING_BELOW_HU = -1100.0


def ct_tissue_in_air(array: np.ndarray, fov: np.ndarray | None = None) -> list[str]:
    """Reasons the HU histogram does not look like a CT of tissue in air ([] when it does)."""
    low, high = SOFT_TISSUE_HU
    counted = air_count = soft_count = 0
    for part in spill.slabs(len(array)) if array.ndim else [slice(None)]:  # counts, a slab at a time
        values = array[part] if fov is None else array[part][fov[part]]
        values = values[values > _PADDING_BELOW_HU]
        counted += values.size
        is_air = values < AIR_BELOW_HU
        air_count += int(is_air.sum())
        rest = values[~is_air]
        soft_count += int(((rest >= low) & (rest <= high)).sum())
        spill.release(array)
    if counted == 0:
        return ["HU histogram: no voxel above -1100 HU (padding only?): not a CT of tissue in air"]
    air = air_count / counted
    reasons = []
    if air < MIN_AIR_SHARE:
        reasons.append(
            f"HU histogram: no air ({air:.1%} of the voxels below {AIR_BELOW_HU:g} HU, at least "
            f"{MIN_AIR_SHARE:.0%} expected): not a CT of tissue in air (a map, values not in HU, "
            "or a reconstruction inside the body)"
        )
    soft = soft_count / (counted - air_count) if counted > air_count else 0.0
    if soft < MIN_SOFT_TISSUE_SHARE:
        reasons.append(
            f"HU histogram: little soft tissue ({soft:.0%} of the non-air voxels within "
            f"{low:g}..{high:g} HU, at least {MIN_SOFT_TISSUE_SHARE:.0%} expected): not a CT of tissue in air"
        )
    return reasons


@dataclass(frozen=True)
class HeadLimits:
    """What ``mr-head`` accepts: a whole head in the field of view (mm and shares)."""

    #: Most image-border pixels a head's outline may cover, as a share of the border, and
    #: the most slices (share) in which it may do that.
    max_border_share: float = 0.02
    max_slices_off_image: float = 0.34
    #: Length and width (mm) of the largest axial outline: a head, from a child's to a large adult's.
    length_mm: tuple[float, float] = (120.0, 260.0)
    width_mm: tuple[float, float] = (90.0, 210.0)
    #: The largest outline's area over its convex hull's, and width over length: an oval.
    min_solidity: float = 0.85
    min_width_share: float = 0.55
    #: The skull: within ``rim_depth_mm`` below the outline, at least ``min_skull_share``
    #: of the voxels are darker than ``dark_ratio`` × the interior's median (deeper than
    #: ``interior_depth_mm``). Bone gives no MR signal; a phantom's fluid does everywhere.
    #: Simulated T1w and T2w heads (10 seeds, 128 and 256 px): 0.17-0.75; a water phantom: 0.
    min_skull_share: float = 0.08
    dark_ratio: float = 0.5
    rim_depth_mm: float = 15.0
    interior_depth_mm: float = 20.0


def _trim_constant_edges(array: np.ndarray) -> np.ndarray:
    """The volume without whole rows and columns at its edges that hold one constant value
    in every slice (zero-filled strips are not part of the field of view)."""
    varies_rows = np.ptp(array, axis=(0, 2)) > 0
    varies_cols = np.ptp(array, axis=(0, 1)) > 0
    if not varies_rows.any() or not varies_cols.any():
        return array
    r0, r1 = np.flatnonzero(varies_rows)[[0, -1]]
    c0, c1 = np.flatnonzero(varies_cols)[[0, -1]]
    return array[:, r0 : r1 + 1, c0 : c1 + 1]


def _body_masks(array: np.ndarray) -> np.ndarray:
    """Per slice: the largest connected object above the background, holes filled.

    The background level is a share of the volume's bright end (99th percentile), low
    enough that muscle on a T1 image counts as body, high enough that Rician noise does not.
    """
    from scipy import ndimage

    smooth = ndimage.gaussian_filter(array.astype(np.float32), (0, 1.0, 1.0))
    level = 0.12 * float(np.percentile(smooth, 99))
    masks = np.zeros(array.shape, bool)
    if level <= 0:
        return masks
    for k, plane in enumerate(smooth):
        found = ndimage.binary_closing(plane > level, iterations=2, border_value=0) | (plane > level)
        labels, n = ndimage.label(found)
        if n == 0:
            continue
        sizes = ndimage.sum_labels(found, labels, index=np.arange(1, n + 1))
        masks[k] = ndimage.binary_fill_holes(labels == 1 + int(np.argmax(sizes)))
    return masks


def mr_head(
    array: np.ndarray, spacing: tuple[float, float, float], limits: HeadLimits = HeadLimits()
) -> list[str]:
    """Reasons the MR volume does not hold a whole head in its field of view ([] when it does)."""
    from skimage.measure import regionprops

    array = _trim_constant_edges(np.asarray(array, np.float32))
    masks = _body_masks(array)
    areas = masks.sum(axis=(1, 2))
    if not areas.any():
        return ["anatomy check (image): no body found in the images"]
    reasons: list[str] = []
    used = areas > 0.25 * areas.max()
    border = np.zeros(masks.shape[1:], bool)
    border[[0, -1], :] = border[:, [0, -1]] = True
    touching = [float(m[border].mean()) > limits.max_border_share for m in masks[used]]
    if sum(touching) > limits.max_slices_off_image * len(touching):
        reasons.append(
            f"anatomy check (image): the body outline runs off the image in {sum(touching)} of "
            f"{len(touching)} slices: not a whole head in the field of view"
        )
    pixel_mm = (spacing[1], spacing[2])
    (props,) = regionprops(masks[int(np.argmax(areas))].astype(np.uint8), spacing=pixel_mm)
    length, width = props.axis_major_length, props.axis_minor_length
    (lo_l, hi_l), (lo_w, hi_w) = limits.length_mm, limits.width_mm
    if not (lo_l <= length <= hi_l and lo_w <= width <= hi_w):
        reasons.append(
            f"anatomy check (image): the largest body outline is {length:.0f}×{width:.0f} mm, "
            f"not head-sized ({lo_l:g}–{hi_l:g} × {lo_w:g}–{hi_w:g} mm)"
        )
    if props.solidity < limits.min_solidity or width < limits.min_width_share * length:
        reasons.append(
            f"anatomy check (image): the largest body outline is not head-shaped (solidity "
            f"{props.solidity:.2f}, width/length {width / max(length, 1e-6):.2f}; an oval head has at "
            f"least {limits.min_solidity:g} and {limits.min_width_share:g})"
        )
    skull = _skull_share(array, masks & used[:, None, None], pixel_mm, limits)
    if skull is not None and skull < limits.min_skull_share:
        reasons.append(
            f"anatomy check (image): no skull beneath the outline ({skull:.0%} of the outer "
            f"{limits.rim_depth_mm:g} mm dark, at least {limits.min_skull_share:.0%} expected): "
            "not a head (a phantom?)"
        )
    return reasons


def _skull_share(
    array: np.ndarray, body: np.ndarray, pixel_mm: tuple[float, float], limits: HeadLimits
) -> float | None:
    """Share of the outer rim (from two pixels below the outline, where the outline's own
    blur ends, down to the rim depth) that is
    darker than the dark ratio × the interior's median; None when there is no interior."""
    from scipy import ndimage

    depth = np.stack([ndimage.distance_transform_edt(m, sampling=pixel_mm) for m in body])
    interior = body & (depth > limits.interior_depth_mm)
    if interior.sum() < 50:
        return None
    level = float(np.median(array[interior]))
    rim = body & (depth > 2.01 * min(pixel_mm)) & (depth <= limits.rim_depth_mm)
    if level <= 0 or not rim.any():
        return None
    return float(np.mean(array[rim] < limits.dark_ratio * level))


def image_reasons(volume: Volume, domain: InputDomain) -> list[str]:
    """Why the volume's pixels are outside ``domain``'s image check; [] when inside (or none applies)."""
    if domain.image_check == "ct-tissue-in-air":
        return ct_tissue_in_air(volume.array, volume.fov)
    if domain.image_check == "mr-head":
        return mr_head(volume.array, volume.spacing)
    return []


# -- the stages ---------------------------------------------------------------------------------
def _domain_for(domains: Sequence[InputDomain], modality: str) -> InputDomain:
    return next((d for d in domains if d.modality == modality), domains[0])


@dataclass(frozen=True)
class CheckInputHeaders:
    """Refuse a selected series whose tags put it outside the model's input domain.

    ``domains``: one per modality the pipeline reads (the series' modality picks it).
    ``declared_by``: the model (or pipeline) whose domain it is, for the reasons
    ("ldct-restoration 1.2").
    """

    domains: tuple[InputDomain, ...]
    declared_by: str
    name: str = "check-domain"

    def run(self, ctx: Context) -> Context:
        datasets = [pydicom.dcmread(i.path, stop_before_pixels=True, specific_tags=_TAGS) for i in ctx.series]
        modality = str(datasets[0].get("Modality", "")) if datasets else ""
        reasons = header_reasons(datasets, _domain_for(self.domains, modality), self.declared_by)
        if reasons:
            raise InputRefused(
                self.declared_by,
                ctx.series[0].series_uid if ctx.series else None,
                reasons,
                series=series_label(datasets[0]) if datasets else None,
            )
        return ctx


@dataclass(frozen=True)
class CheckInputImage:
    """Refuse a loaded volume whose pixels say it is not what the model was made for."""

    domains: tuple[InputDomain, ...]
    declared_by: str
    name: str = "check-image"

    def run(self, ctx: Context) -> Context:
        volume = ctx.need_volume()
        reasons = image_reasons(volume, _domain_for(self.domains, volume.modality))
        if reasons:
            label = series_label(volume.datasets[0]) if volume.datasets else None
            raise InputRefused(self.declared_by, volume.series_uid, reasons, series=label)
        return ctx
