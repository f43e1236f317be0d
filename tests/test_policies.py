"""The policy engine, table-driven: which rules a study matches (and the condition that
decided it), the loader's refusals of malformed policy files (file:line: field: message),
the QC gate, and the shipped ``policies/default.yaml``."""

from __future__ import annotations

import hashlib
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from policies.engine import SeriesView, StudyView, decide, gate_output
from policies.loader import PolicyError, load_policy, parse_policy
from policies.model import Gate, Policy, QcGates

DESTINATIONS = {"pacs", "tps"}
DEFAULT_POLICY = Path(__file__).resolve().parents[1] / "policies" / "default.yaml"


# --- builders ------------------------------------------------------------------------------


def series(
    uid: str = "s1",
    modality: str | None = "CT",
    description: str | None = "Thorax 1.0 B31f",
    body_part: str | None = "CHEST",
    attrs: Mapping[str, Any] | None = None,
    instances: int = 200,
) -> SeriesView:
    """A series whose DICOM attributes (by keyword) are ``attrs``; any other is absent."""
    values = dict(attrs or {})
    return SeriesView(
        series_uid=uid,
        modality=modality,
        description=description,
        body_part=body_part,
        instances=instances,
        attribute=lambda keyword: values.get(keyword),
    )


def study(
    *members: SeriesView, calling_ae: str | None = "CT_SCANNER", called_ae: str | None = "NODE"
) -> StudyView:
    return StudyView(study_uid="1.2.3", calling_ae=calling_ae, called_ae=called_ae, series=members)


def one_rule(match: str, mode: str = "first-match") -> str:
    """A policy with the single rule ``r`` whose ``match`` is the YAML flow mapping given."""
    return f"mode: {mode}\nrules:\n  - {{name: r, pipeline: forward, destinations: [pacs], match: {match}}}\n"


def policy(mode: str, rules: str) -> str:
    """A policy of ``mode`` whose rules are the (dedented) YAML block sequence given."""
    return f"mode: {mode}\nrules:\n" + textwrap.indent(textwrap.dedent(rules).strip("\n"), "  ") + "\n"


def parse(text: str) -> Policy:
    return parse_policy(text, Path("p.yaml"), known_destinations=DESTINATIONS)


CT = series()
LOW_DOSE = series(attrs={"CTDIvol": 2.5})
FULL_DOSE = series(attrs={"CTDIvol": 12.0})
MR = series(
    modality="MR", description="t1_mprage_sag", body_part="HEAD", attrs={"MagneticFieldStrength": 1.5}
)
ANY_LOW_DOSE = (
    "{modality: CT, any_of: [{attributes: [{keyword: CTDIvol, op: '<', value: 5.0}]},"
    " {series_description: '(?i)low.?dose|ldct'}]}"
)
TWO_RULES = """
    - {name: a, pipeline: forward, destinations: [pacs], match: {modality: CT}}
    - {name: b, pipeline: restoration, destinations: [tps], match: {body_part: chest}}
"""
PRIORITIES = """
    - {name: low-5, priority: 5, pipeline: forward, destinations: [pacs]}
    - {name: high-10, priority: 10, pipeline: forward, destinations: [pacs]}
    - {name: also-5, priority: 5, pipeline: forward, destinations: [pacs]}
    - {name: ct-only-20, priority: 20, pipeline: forward, destinations: [pacs], match: {modality: CT}}
"""


# --- which rules a study matches -----------------------------------------------------------

# (policy YAML, study, chosen rule names in order, {rule name: its deciding condition})
MATCHING = [
    pytest.param(
        one_rule("{calling_ae: [CT_SCANNER, CT2]}"),
        study(CT),
        ["r"],
        {"r": "calling AE in ['CT_SCANNER', 'CT2']"},
        id="calling-ae-listed",
    ),
    pytest.param(
        one_rule("{calling_ae: CT2, modality: CT}"),
        study(CT, calling_ae="CT_SCANNER"),
        [],
        {"r": "calling AE in ['CT2']"},
        id="calling-ae-not-listed-decides-before-series",
    ),
    pytest.param(
        one_rule("{called_ae: NODE_LDCT}"),
        study(CT, called_ae="NODE_LDCT"),
        ["r"],
        {"r": "called AE in ['NODE_LDCT']"},
        id="called-ae-listed",
    ),
    pytest.param(
        one_rule("{called_ae: NODE_LDCT}"),
        study(CT, called_ae="NODE"),
        [],
        {"r": "called AE in ['NODE_LDCT']"},
        id="called-ae-not-listed",
    ),
    pytest.param(
        one_rule("{modality: [CT, PT]}"),
        study(CT),
        ["r"],
        {"r": "series s1: modality in ['CT', 'PT']"},
        id="modality-listed",
    ),
    pytest.param(
        one_rule("{modality: CT}"),
        study(MR),
        [],
        {"r": "series s1: modality in ['CT']"},
        id="modality-not-listed",
    ),
    pytest.param(
        one_rule("{modality: ct}"),
        study(CT),
        ["r"],
        {"r": "series s1: modality in ['ct']"},
        id="modality-case-insensitive",
    ),
    pytest.param(
        one_rule("{body_part: [chest, Abdomen]}"),
        study(series(body_part="CHEST")),
        ["r"],
        {"r": "series s1: body part in ['chest', 'Abdomen']"},
        id="body-part-case-insensitive",
    ),
    pytest.param(
        one_rule("{body_part: chest}"),
        study(series(body_part=None)),
        [],
        {"r": "series s1: body part in ['chest']"},
        id="body-part-absent",
    ),
    pytest.param(
        one_rule("{series_description: 'low.?dose'}"),
        study(series(description="LOW DOSE CHEST")),
        [],
        {"r": "series s1: series description ~ /low.?dose/"},
        id="description-regex-is-case-sensitive",
    ),
    pytest.param(
        one_rule("{series_description: '(?i)low.?dose'}"),
        study(series(description="LOW DOSE CHEST")),
        ["r"],
        {"r": "series s1: series description ~ /(?i)low.?dose/"},
        id="description-regex-with-(?i)",
    ),
    pytest.param(
        one_rule("{has_series: '(?i)topogram'}"),
        study(series("s1", description="Topogram 0.6 T20s"), series("s2")),
        ["r"],
        {"r": "study has a series ~ /(?i)topogram/"},
        id="has-series-present",
    ),
    pytest.param(
        one_rule("{has_series: '(?i)topogram'}"),
        study(CT),
        [],
        {"r": "study has a series ~ /(?i)topogram/"},
        id="has-series-missing",
    ),
    pytest.param(
        one_rule("{lacks_series: '(?i)contrast|KM'}"),
        study(CT),
        ["r"],
        {"r": "study lacks any series ~ /(?i)contrast|KM/"},
        id="lacks-series-absent",
    ),
    pytest.param(
        one_rule("{lacks_series: '(?i)contrast|KM', modality: CT}"),
        study(series("s1"), series("s2", description="Thorax KM 1.0 B31f")),
        [],
        {"r": "study lacks any series ~ /(?i)contrast|KM/"},
        id="lacks-series-present",
    ),
    pytest.param(
        one_rule("{attributes: [{keyword: CTDIvol, op: '<', value: 5}]}"),
        study(series(attrs={"CTDIvol": 4.99})),
        ["r"],
        {"r": "series s1: CTDIvol < 5.0"},
        id="lt-below",
    ),
    pytest.param(
        one_rule("{attributes: [{keyword: CTDIvol, op: '<', value: 5}]}"),
        study(series(attrs={"CTDIvol": 5.0})),
        [],
        {"r": "series s1: CTDIvol < 5.0"},
        id="lt-at-limit",
    ),
    pytest.param(
        one_rule("{attributes: [{keyword: CTDIvol, op: '<=', value: 5}]}"),
        study(series(attrs={"CTDIvol": "5.0"})),
        ["r"],
        {"r": "series s1: CTDIvol <= 5.0"},
        id="le-at-limit-DS-string",
    ),
    pytest.param(
        one_rule("{attributes: [{keyword: KVP, op: '>', value: 100}]}"),
        study(series(attrs={"KVP": 80})),
        [],
        {"r": "series s1: KVP > 100.0"},
        id="gt-below",
    ),
    pytest.param(
        one_rule("{attributes: [{keyword: KVP, op: '>=', value: 120}]}"),
        study(series(attrs={"KVP": 120})),
        ["r"],
        {"r": "series s1: KVP >= 120.0"},
        id="ge-at-limit",
    ),
    pytest.param(
        one_rule("{attributes: [{keyword: SliceThickness, op: '==', value: 1.0}]}"),
        study(series(attrs={"SliceThickness": "1"})),
        ["r"],
        {"r": "series s1: SliceThickness == 1.0"},
        id="eq-numeric",
    ),
    pytest.param(
        one_rule("{attributes: [{keyword: SliceThickness, op: '==', value: 1.0}]}"),
        study(series(attrs={"SliceThickness": 3.0})),
        [],
        {"r": "series s1: SliceThickness == 1.0"},
        id="eq-numeric-differs",
    ),
    pytest.param(
        one_rule("{modality: MR, attributes: [{keyword: MagneticFieldStrength, op: '!=', value: 3}]}"),
        study(MR),
        ["r"],
        {"r": "series s1: MagneticFieldStrength != 3.0"},
        id="ne-numeric",
    ),
    pytest.param(
        one_rule("{modality: MR, attributes: [{keyword: MagneticFieldStrength, op: '!=', value: 3}]}"),
        study(series(modality="MR", attrs={"MagneticFieldStrength": 3})),
        [],
        {"r": "series s1: MagneticFieldStrength != 3.0"},
        id="ne-numeric-equal",
    ),
    pytest.param(
        one_rule("{attributes: [{keyword: Manufacturer, op: '==', value: SIEMENS}]}"),
        study(series(attrs={"Manufacturer": "SIEMENS "})),
        ["r"],
        {"r": "series s1: Manufacturer == SIEMENS"},
        id="eq-string-padded",
    ),
    pytest.param(
        one_rule("{attributes: [{keyword: Manufacturer, op: '!=', value: GE}]}"),
        study(series(attrs={"Manufacturer": "SIEMENS"})),
        ["r"],
        {"r": "series s1: Manufacturer != GE"},
        id="ne-string",
    ),
    pytest.param(
        one_rule("{attributes: [{keyword: Manufacturer, op: '!=', value: GE}]}"),
        study(series(attrs={"Manufacturer": "GE"})),
        [],
        {"r": "series s1: Manufacturer != GE"},
        id="ne-string-equal",
    ),
    pytest.param(
        one_rule("{attributes: [{keyword: CTDIvol, op: '<', value: 5}]}"),
        study(series(attrs={})),
        [],
        {"r": "series s1: CTDIvol < 5.0"},
        id="absent-attribute-does-not-match",
    ),
    pytest.param(
        one_rule("{attributes: [{keyword: Manufacturer, op: '!=', value: GE}]}"),
        study(series(attrs={"Manufacturer": ""})),
        [],
        {"r": "series s1: Manufacturer != GE"},
        id="absent-attribute-does-not-match-ne",
    ),
    pytest.param(
        one_rule("{attributes: [{keyword: CTDIvol, op: '<', value: 5}]}"),
        study(series(attrs={"CTDIvol": "n/a"})),
        [],
        {"r": "series s1: CTDIvol < 5.0"},
        id="non-numeric-compared-numerically",
    ),
    pytest.param(
        one_rule(ANY_LOW_DOSE),
        study(LOW_DOSE),
        ["r"],
        {"r": "series s1: any_of[0] CTDIvol < 5.0"},
        id="any-of-first-alternative",
    ),
    pytest.param(
        one_rule(ANY_LOW_DOSE),
        study(series(description="Chest LDCT 1.0", attrs={"CTDIvol": 12.0})),
        ["r"],
        {"r": "series s1: any_of[1] series description ~ /(?i)low.?dose|ldct/"},
        id="any-of-second-alternative",
    ),
    pytest.param(
        one_rule(ANY_LOW_DOSE),
        study(FULL_DOSE),
        [],
        {"r": "series s1: one of 2 alternatives"},
        id="any-of-no-alternative",
    ),
    pytest.param(
        one_rule(ANY_LOW_DOSE),
        study(series(modality="MR", description="low dose"), series(modality="PT", attrs={"CTDIvol": 1.0})),
        [],
        {"r": "series s1: modality in ['CT']"},
        id="any-of-alternatives-but-wrong-modality",
    ),
    pytest.param(
        one_rule("{modality: CT, attributes: [{keyword: CTDIvol, op: '<', value: 5}]}"),
        study(series("s1", attrs={"CTDIvol": 12.0}), series("s2", attrs={"CTDIvol": 2.5})),
        ["r"],
        {"r": "series s2: CTDIvol < 5.0"},
        id="only-second-series-qualifies",
    ),
    pytest.param(
        one_rule("{modality: CT, attributes: [{keyword: KVP, op: '<=', value: 100}]}"),
        study(series("s1", modality="MR", attrs={"KVP": 80}), series("s2", attrs={"KVP": 120})),
        [],
        {"r": "series s1: modality in ['CT']"},
        id="conditions-split-across-series-do-not-match",
    ),
    pytest.param(
        one_rule("{modality: CT}"),
        study(),
        [],
        {"r": "a series meeting the series conditions"},
        id="study-without-series",
    ),
    pytest.param(
        policy("first-match", TWO_RULES),
        study(CT),
        ["a"],
        {"a": "series s1: modality in ['CT']", "b": "series s1: body part in ['chest']"},
        id="first-match-takes-first-in-file-order",
    ),
    pytest.param(
        policy("all-matches", TWO_RULES),
        study(CT),
        ["a", "b"],
        {},
        id="all-matches-takes-every-match",
    ),
    pytest.param(
        policy("all-matches", TWO_RULES),
        study(series(body_part="HEAD")),
        ["a"],
        {"b": "series s1: body part in ['chest']"},
        id="all-matches-skips-non-matching",
    ),
    pytest.param(
        policy("first-match", PRIORITIES),
        study(CT),
        ["ct-only-20"],
        {},
        id="first-match-highest-priority-wins",
    ),
    pytest.param(
        policy("first-match", PRIORITIES),
        study(MR),
        ["high-10"],
        {"ct-only-20": "series s1: modality in ['CT']"},
        id="first-match-falls-to-next-priority",
    ),
    pytest.param(
        policy("all-matches", PRIORITIES),
        study(MR),
        ["high-10", "low-5", "also-5"],
        {},
        id="all-matches-priority-then-file-order",
    ),
    pytest.param(
        policy("first-match", "- {name: everything, pipeline: forward, destinations: [pacs]}"),
        study(calling_ae=None, called_ae=None),
        ["everything"],
        {"everything": "no conditions"},
        id="no-conditions-matches-everything",
    ),
    pytest.param(
        policy(
            "all-matches",
            """
            - {name: ct, pipeline: forward, destinations: [pacs], match: {modality: CT}}
            - {name: tps, pipeline: forward, destinations: [tps], match: {calling_ae: RT_MR}}
            """,
        ),
        study(MR),
        [],
        {"ct": "series s1: modality in ['CT']", "tps": "calling AE in ['RT_MR']"},
        id="no-rule-matches",
    ),
    pytest.param(
        policy(
            "first-match",
            """
            - name: shadow-trial
              match: {modality: CT}
              pipeline: restoration
              gate: shadow
            """,
        ),
        study(CT),
        ["shadow-trial"],
        {},
        id="shadow-without-destinations",
    ),
]


@pytest.mark.parametrize(("text", "the_study", "chosen", "deciding"), MATCHING)
def test_matching(text: str, the_study: StudyView, chosen: list[str], deciding: dict[str, str]) -> None:
    decision = decide(parse(text), the_study)
    assert [v.rule.name for v in decision.chosen] == chosen
    verdicts = {v.rule.name: v for v in decision.verdicts}
    for name, condition in deciding.items():
        check = verdicts[name].deciding
        assert check is not None
        assert check.condition == condition
        assert check.passed == verdicts[name].matched


def test_matching_table_is_large_enough() -> None:
    assert len(MATCHING) >= 22


@pytest.mark.parametrize(
    ("value", "seen"),
    [
        pytest.param(None, "CTDIvol absent", id="absent"),
        pytest.param("", "CTDIvol absent", id="empty"),
        pytest.param("n/a", "CTDIvol = 'n/a' (not a number)", id="not-a-number"),
        pytest.param([2.5, 9.0], "CTDIvol = 2.5", id="multi-valued-first-value"),
        pytest.param("12", "CTDIvol = 12", id="numeric-string"),
    ],
)
def test_what_the_engine_saw(value: Any, seen: str) -> None:
    """The ``seen`` text ``explain`` shows next to a comparison."""
    verdict = decide(
        parse(one_rule("{attributes: [{keyword: CTDIvol, op: '<', value: 5}]}")),
        study(series(attrs={"CTDIvol": value})),
    ).verdicts[0]
    assert verdict.deciding is not None
    assert verdict.deciding.seen == seen


def test_matching_verdict_names_the_series() -> None:
    text = one_rule("{attributes: [{keyword: CTDIvol, op: '<', value: 5}]}")
    both_low = study(series("s1", attrs={"CTDIvol": 2.0}), series("s2", attrs={"CTDIvol": 1.0}))
    assert decide(parse(text), both_low).chosen[0].series_uid == "s1"
    only_second = study(series("s1", attrs={"CTDIvol": 9.0}), series("s2", attrs={"CTDIvol": 1.0}))
    assert decide(parse(text), only_second).chosen[0].series_uid == "s2"
    assert decide(parse(one_rule("{called_ae: NODE}")), only_second).chosen[0].series_uid is None


# --- malformed policies --------------------------------------------------------------------

NO_DESTINATIONS = "destinations: a rule that is not gate: shadow must name at least one destination"
RULE = "  - name: r1\n    pipeline: forward\n    destinations: [pacs]\n"

# (policy YAML, the problems reported: one expected substring per problem, in order)
MALFORMED = [
    pytest.param(
        "mode: first-match\nrules:\n  - name: r1\n    match:\n      modalty: CT\n"
        "    pipeline: forward\n    destinations: [pacs]\n",
        ["p.yaml:5: rules[0].match.modalty: unknown field (check the spelling; see policies/default.yaml)"],
        id="unknown-field-typo",
    ),
    pytest.param(
        "mode: first-match\nrules:\n  - name: r1\n    match:\n      any_of:\n        - {modality: CT}\n"
        "        - {series_descripton: ldct}\n    pipeline: forward\n    destinations: [pacs]\n",
        ["p.yaml:7: rules[0].match.any_of[1].series_descripton: unknown field (check the spelling"],
        id="unknown-field-in-any-of",
    ),
    pytest.param(
        "version: 1\nrules:\n" + RULE,
        ["p.yaml:1: mode: required field is missing"],
        id="missing-mode",
    ),
    pytest.param(
        "mode: first_match\nrules:\n" + RULE,
        ["p.yaml:1: mode: Input should be 'first-match' or 'all-matches'"],
        id="bad-mode",
    ),
    pytest.param(
        "mode: first-match\nrules:\n" + RULE + "  - name: r2\n    destinations: [pacs]\n",
        ["p.yaml:6: rules[1].pipeline: required field is missing"],
        id="missing-pipeline",
    ),
    pytest.param(
        "mode: first-match\nrules:\n  - name: seg\n    pipeline: segmentation\n    destinations: [pacs]\n",
        [
            "p.yaml:4: rules[0].pipeline: unknown pipeline 'segmentation' "
            "(available: denoise-classical, forward, prognosis, restoration, sct, synthesis, synthesis-t2w)"
        ],
        id="unknown-pipeline",
    ),
    pytest.param(
        "mode: first-match\nrules:\n  - name: r1\n    pipeline: forward\n    destinations:\n      - pacs\n"
        "      - archive\n",
        ["p.yaml:7: rules[0].destinations[1]: unknown destination 'archive' (configured: pacs, tps)"],
        id="unknown-destination",
    ),
    pytest.param(
        "mode: first-match\nrules:\n  - name: r1\n    match:\n      series_description: '(low dose'\n"
        "    pipeline: forward\n    destinations: [pacs]\n",
        ["p.yaml:5: rules[0].match.series_description: not a valid regular expression: missing )"],
        id="bad-regex",
    ),
    pytest.param(
        "mode: first-match\nrules:\n  - name: r1\n    match:\n      lacks_series: '[a-'\n"
        "    pipeline: forward\n    destinations: [pacs]\n",
        ["p.yaml:5: rules[0].match.lacks_series: not a valid regular expression: unterminated character set"],
        id="bad-regex-lacks-series",
    ),
    pytest.param(
        "mode: first-match\nrules:\n  - name: r1\n    match:\n      attributes:\n"
        "        - {keyword: KVP, op: '<', value: 100}\n        - {keyword: CTDIVol, op: '<', value: 5}\n"
        "    pipeline: forward\n    destinations: [pacs]\n",
        [
            "p.yaml:7: rules[0].match.attributes[1].keyword: 'CTDIVol' is not a DICOM attribute keyword "
            "(e.g. CTDIvol, KVP, SliceThickness)"
        ],
        id="unknown-dicom-keyword",
    ),
    pytest.param(
        "mode: first-match\nrules:\n  - name: r1\n    match:\n      attributes:\n"
        "        - keyword: SeriesDescription\n          op: '=~'\n          value: LDCT\n"
        "    pipeline: forward\n    destinations: [pacs]\n",
        [
            "p.yaml:7: rules[0].match.attributes[0].op: Input should be '<', '<=', '>', '>=', '==' or '!=' "
            "(got '=~')"
        ],
        id="bad-operator",
    ),
    pytest.param(
        "mode: first-match\nrules:\n" + RULE + "    gate: manual\n",
        ["p.yaml:6: rules[0].gate: Input should be 'auto', 'review' or 'shadow'"],
        id="bad-gate",
    ),
    pytest.param(
        "mode: first-match\nrules:\n" + RULE + "  - name: r2\n    pipeline: forward\n    gate: review\n",
        [f"p.yaml:6: rules[1]: {NO_DESTINATIONS}"],
        id="review-without-destinations",
    ),
    pytest.param(
        "mode: first-match\nrules:\n  - name: r1\n    pipeline: forward\n",
        [f"p.yaml:3: rules[0]: {NO_DESTINATIONS}"],
        id="default-auto-gate-without-destinations",
    ),
    pytest.param(
        "mode: first-match\nrules:\n" + RULE + RULE,
        ["p.yaml:6: rules[1].name: another rule is already named 'r1' (rules[0]); names must be unique"],
        id="duplicate-rule-names",
    ),
    pytest.param(
        "mode: first-match\nmode: all-matches\nrules: []\n",
        ["p.yaml:2: mode: this key appears twice in the same mapping (first at line 1)"],
        id="duplicate-yaml-key",
    ),
    pytest.param(
        "mode: first-match\nrules:\n  - name: r1\n    match:\n      attributes:\n"
        "        - {keyword: CTDIvol, op: '<', value: '5'}\n"
        "    pipeline: forward\n    destinations: [pacs]\n",
        ["p.yaml:6: rules[0].match.attributes[0]: value: '<' compares numbers; write 5 without quotes"],
        id="quoted-number-ordering",
    ),
    pytest.param(
        "mode: first-match\nrules:\n  - name: r1\n    match:\n      attributes:\n"
        "        - {keyword: CTDIvol, op: '<', value: [5]}\n"
        "    pipeline: forward\n    destinations: [pacs]\n",
        ["p.yaml:6: rules[0].match.attributes[0].value: expected a number or text"],
        id="list-where-a-value-belongs",
    ),
    pytest.param(
        "mode: first-match\nrules:\n  - name: r1\n    match: {modality: 5}\n    pipeline: forward\n"
        "    destinations: [pacs]\n",
        ["p.yaml:4: rules[0].match.modality: expected a name or a non-empty list of names, got 5"],
        id="number-where-a-name-belongs",
    ),
    pytest.param(
        "mode: first-match\nrules:\n  - name: r1\n    pipeline: [forward\n",
        [
            "p.yaml:5: not valid YAML: expected ',' or ']', but got '<stream end>' "
            "(while parsing a flow sequence that started at line 4)"
        ],
        id="yaml-unclosed-bracket-names-where-it-opened",
    ),
    pytest.param(
        "mode: first-match\nrules:\n  - name: r1\n   pipeline: forward\n",
        ["p.yaml:4: not valid YAML: expected <block end>, but found '<block mapping start>'"],
        id="yaml-bad-indentation",
    ),
    pytest.param(
        "mode: first-match\nrules:\n\t- name: r1\n",
        ["p.yaml:3: not valid YAML: found character '\\t' that cannot start any token"],
        id="yaml-tab",
    ),
    pytest.param(
        "- name: r1\n  pipeline: forward\n",
        ["p.yaml:1: a policy file is a mapping with 'mode' and 'rules'"],
        id="top-level-list",
    ),
    pytest.param(
        "",
        ["p.yaml:1: a policy file is a mapping with 'mode' and 'rules'"],
        id="empty-file",
    ),
    pytest.param(
        "mode: first-match\nrules:\n" + RULE + "    qc:\n      max_suspect_fraction: 1.5\n",
        ["p.yaml:7: rules[0].qc.max_suspect_fraction: Input should be less than or equal to 1"],
        id="qc-fraction-above-one",
    ),
    pytest.param(
        "mode: first-match\nrules:\n" + RULE + "    qc: {max_mean_sigma: 0}\n",
        ["p.yaml:6: rules[0].qc.max_mean_sigma: Input should be greater than 0"],
        id="qc-sigma-zero",
    ),
    pytest.param(
        "mode: first-match\nrules:\n  - name: low dose ct\n    pipeline: forward\n    destinations: [pacs]\n",
        [
            "p.yaml:3: rules[0].name: 'low dose ct': a rule name is 1-64 letters, digits, "
            "'-', '_' or '.' (no spaces)"
        ],
        id="rule-name-with-spaces",
    ),
    pytest.param(
        "mode: first-match\nrules:\n  - name: r1\n    match: {modality: []}\n    pipeline: forward\n"
        "    destinations: [pacs]\n",
        ["p.yaml:4: rules[0].match.modality: expected a name or a non-empty list of names"],
        id="empty-modality-list",
    ),
    pytest.param(
        "version: 2\nmode: first-match\n",
        ["p.yaml:1: version: Input should be 1"],
        id="unsupported-version",
    ),
    pytest.param(
        "mode: first-match\nrules:\n  - name: r1\n    pipeline: segmentation\n    destinations: [pacs]\n"
        "  - name: r2\n    pipeline: forward\n    destinations: [pacs]\n    gate: later\n",
        [
            "p.yaml:4: rules[0].pipeline: unknown pipeline 'segmentation'",
            "p.yaml:9: rules[1].gate: Input should be 'auto', 'review' or 'shadow'",
        ],
        id="every-problem-reported",
    ),
]


@pytest.mark.parametrize(("text", "problems"), MALFORMED)
def test_malformed_policy_is_refused(text: str, problems: list[str]) -> None:
    with pytest.raises(PolicyError) as refused:
        parse(text)
    assert len(refused.value.problems) == len(problems), refused.value.problems
    for reported, expected in zip(refused.value.problems, problems, strict=True):
        assert expected in reported
    assert str(refused.value) == "\n".join(refused.value.problems)


def test_malformed_table_is_large_enough() -> None:
    assert len(MALFORMED) >= 10


def test_duplicate_rule_name_line() -> None:
    with pytest.raises(PolicyError, match=r"p\.yaml:6: rules\[1\]\.name: "):
        parse("mode: first-match\nrules:\n" + RULE + RULE)


def test_modality_number_is_refused_not_a_crash() -> None:
    with pytest.raises(PolicyError, match=r"p\.yaml:4: rules\[0\]\.match\.modality: "):
        parse("mode: first-match\nrules:\n  - name: r1\n    match: {modality: 5}\n    pipeline: forward\n")


def test_unknown_destination_is_checked_only_when_destinations_are_known() -> None:
    text = "mode: first-match\nrules:\n  - {name: r1, pipeline: forward, destinations: [archive]}\n"
    assert parse_policy(text, Path("p.yaml")).rules[0].destinations == ("archive",)
    with pytest.raises(
        PolicyError, match=r"unknown destination 'archive' \(no \[destinations\] are configured\)"
    ):
        parse_policy(text, Path("p.yaml"), known_destinations=set())


def test_load_policy_refuses_unreadable_and_non_utf8(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read the policy file"):
        load_policy(tmp_path / "missing.yaml")
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("mode: first-match\n# Röntgen\n".encode("latin-1"))
    with pytest.raises(PolicyError, match="not UTF-8 text"):
        load_policy(latin1)


# --- the QC gate ---------------------------------------------------------------------------

LIMITS = QcGates(max_suspect_fraction=0.002, max_suspect_volume_ml=5.0, max_mean_sigma=60.0)
WITHIN = {"suspect fraction": 0.001, "suspect volume": 1.5, "mean calibrated sigma in body": 25.0}

# (gate, QC limits, figures, validation errors, expected action, expected reasons)
GATES = [
    pytest.param(
        "auto", LIMITS, WITHIN, None, "release", ("QC within the rule's limits",), id="within-limits"
    ),
    pytest.param(
        "auto",
        LIMITS,
        {"suspect fraction": 0.002, "suspect volume": 5.0, "mean calibrated sigma in body": 60.0},
        [],
        "release",
        ("QC within the rule's limits",),
        id="at-limits",
    ),
    pytest.param(
        "auto",
        LIMITS,
        {**WITHIN, "suspect fraction": 0.01},
        None,
        "hold",
        ("suspect fraction 0.01 > 0.002",),
        id="suspect-fraction",
    ),
    pytest.param(
        "auto",
        LIMITS,
        {**WITHIN, "suspect volume": 7.5},
        None,
        "hold",
        ("suspect volume 7.5 mL > 5 mL",),
        id="suspect-volume",
    ),
    pytest.param(
        "auto",
        QcGates(max_suspect_region_ml=0.04),
        {"largest suspect region": 0.065, "suspect volume": 0.07},
        None,
        "hold",
        ("largest suspect region 0.065 mL > 0.04 mL",),
        id="largest-suspect-region",
    ),
    pytest.param(
        "auto",
        QcGates(max_suspect_region_ml=0.04),
        {"largest suspect region": 0.023, "suspect volume": 1.05},
        None,
        "release",
        ("QC within the rule's limits",),
        id="largest-suspect-region-within",
    ),
    pytest.param(
        "auto",
        LIMITS,
        {**WITHIN, "mean calibrated sigma in body": 75.0},
        None,
        "hold",
        ("mean calibrated sigma 75 > 60",),
        id="mean-sigma",
    ),
    pytest.param(
        "auto",
        LIMITS,
        {"suspect fraction": 0.001, "suspect volume": 1.5, "mean uncertainty": 61.0},
        None,
        "hold",
        ("mean calibrated sigma 61 > 60",),
        id="mean-sigma-from-mean-uncertainty",
    ),
    pytest.param(
        "auto",
        LIMITS,
        {"suspect fraction": 0.5, "suspect volume": 90.0, "mean calibrated sigma in body": 100.0},
        None,
        "hold",
        ("suspect fraction 0.5 > 0.002", "suspect volume 90 mL > 5 mL", "mean calibrated sigma 100 > 60"),
        id="every-limit",
    ),
    pytest.param(
        "auto",
        LIMITS,
        {"suspect fraction": 0.0},
        None,
        "hold",
        (
            "suspect volume not reported by the pipeline (the rule sets a limit)",
            "mean calibrated sigma not reported by the pipeline (the rule sets a limit)",
        ),
        id="limit-set-but-figure-missing-fails-closed",
    ),
    pytest.param(
        "auto",
        QcGates(),
        {"suspect fraction": 0.5, "suspect volume": 90.0, "mean calibrated sigma in body": 100.0},
        None,
        "release",
        ("QC within the rule's limits",),
        id="no-limits-set",
    ),
    pytest.param(
        "auto",
        QcGates(max_interface_sigma_hu=150.0),
        {"mean calibrated sigma in body": 40.0, "mean sigma at bone/air interfaces": 212.5},
        None,
        "hold",
        ("mean sigma at bone/air interfaces 212.5 HU > 150 HU",),
        id="interface-sigma",
    ),
    pytest.param(
        "auto",
        QcGates(max_interface_sigma_hu=150.0, max_mean_sigma=60.0),
        {"mean calibrated sigma in body": 40.0, "mean sigma at bone/air interfaces": 150.0},
        None,
        "release",
        ("QC within the rule's limits",),
        id="interface-sigma-at-limit",
    ),
    pytest.param(
        "review",
        QcGates(max_interface_sigma_hu=150.0),
        {"mean calibrated sigma in body": 40.0},
        None,
        "hold",
        (
            "the rule requires review",
            "mean sigma at bone/air interfaces not reported by the pipeline (the rule sets a limit)",
        ),
        id="interface-sigma-not-reported-fails-closed",
    ),
    pytest.param(
        "auto",
        LIMITS,
        WITHIN,
        ["missing SOP Class UID", "pixel data length"],
        "hold",
        ("output validation failed: missing SOP Class UID", "output validation failed: pixel data length"),
        id="validation-errors",
    ),
    pytest.param(
        "auto",
        QcGates(hold_on_failed_validation=False),
        {},
        ["missing SOP Class UID"],
        "release",
        ("QC within the rule's limits",),
        id="validation-hold-switched-off",
    ),
    pytest.param(
        "review", LIMITS, WITHIN, None, "hold", ("the rule requires review",), id="review-always-holds"
    ),
    pytest.param(
        "review",
        LIMITS,
        {**WITHIN, "suspect volume": 7.5},
        None,
        "hold",
        ("the rule requires review", "suspect volume 7.5 mL > 5 mL"),
        id="review-with-qc-reason",
    ),
    pytest.param(
        "shadow",
        LIMITS,
        WITHIN,
        None,
        "shadow",
        ("shadow mode: run and audit, send nothing",),
        id="shadow-within-limits",
    ),
    pytest.param(
        "shadow",
        LIMITS,
        {**WITHIN, "suspect fraction": 0.01},
        ["bad UID"],
        "shadow",
        (
            "shadow mode: run and audit, send nothing",
            "output validation failed: bad UID",
            "suspect fraction 0.01 > 0.002",
        ),
        id="shadow-even-when-failing",
    ),
]


@pytest.mark.parametrize(("gate", "qc", "figures", "errors", "action", "reasons"), GATES)
def test_gate_output(
    gate: Gate,
    qc: QcGates,
    figures: dict[str, float],
    errors: list[str] | None,
    action: str,
    reasons: tuple[str, ...],
) -> None:
    verdict = gate_output(gate, qc, figures, errors)
    assert (verdict.action, verdict.reasons) == (action, reasons)


# --- the shipped default policy ------------------------------------------------------------


def test_default_policy_loads() -> None:
    loaded = load_policy(DEFAULT_POLICY, known_destinations=DESTINATIONS)
    assert loaded.sha256 == hashlib.sha256(DEFAULT_POLICY.read_bytes()).hexdigest()
    assert loaded.policy.mode == "first-match"
    assert [r.name for r in loaded.policy.rules] == [
        "low-dose-ct-restoration",
        "mr-planning-sct",
        "brain-tumour-prognosis",
        "brain-mr-missing-flair",
    ]
    rule = loaded.policy.rules[0]
    assert (rule.pipeline, rule.destinations, rule.gate) == ("restoration", ("pacs",), "auto")
    sct = loaded.policy.rules[1]
    assert (sct.pipeline, sct.destinations, sct.gate) == ("sct", ("tps",), "review")
    assert sct.match.calling_ae == ("RT_MR_PLANNING",) and sct.match.modality == ("MR",)
    assert sct.qc.max_interface_sigma_hu == 140.0 and sct.qc.max_suspect_region_ml == 0.08
    prognosis = loaded.policy.rules[2]
    assert (prognosis.pipeline, prognosis.gate) == ("prognosis", "review")
    assert prognosis.priors is not None
    assert (prognosis.priors.count, prognosis.priors.on_missing, prognosis.priors.registration) == (
        2,
        "refuse",
        "rigid",
    )
    synthesis = loaded.policy.rules[3]
    assert (synthesis.pipeline, synthesis.gate, synthesis.fallback) == ("synthesis", "review", "nothing")
    # the pipeline reads its inputs by the same patterns the rule matches on
    assert synthesis.options["protocol_t1w"] == synthesis.match.series_description
    assert synthesis.options["protocol_t2w"] == synthesis.match.has_series
    assert synthesis.options["protocol_flair"] == synthesis.match.lacks_series


def opt_in_t2w_policy(tmp_path: Path) -> Path:
    """The default policy with its commented ``brain-mr-missing-t2w`` rule switched on."""
    lines = DEFAULT_POLICY.read_text().splitlines()
    start = lines.index("  # - name: brain-mr-missing-t2w")
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("  #"))
    on = [("  " + line[4:]) for line in lines[start:end]]
    path = tmp_path / "policy.yaml"
    path.write_text("\n".join(lines[:start] + on + lines[end:]) + "\n")
    return path


def test_the_opt_in_t2w_rule_loads_and_routes_a_study_without_t2w(tmp_path: Path) -> None:
    loaded = load_policy(opt_in_t2w_policy(tmp_path), known_destinations=DESTINATIONS)
    t2w = loaded.policy.rules[-1]
    assert t2w.name == "brain-mr-missing-t2w"
    assert (t2w.pipeline, t2w.gate, t2w.fallback) == ("synthesis-t2w", "review", "nothing")
    flair = loaded.policy.rules[3]
    assert t2w.options["protocol_t1w"] == t2w.match.series_description == flair.match.series_description
    assert t2w.options["protocol_t2w"] == t2w.match.lacks_series == flair.match.has_series
    assert t2w.options["protocol_flair"] == t2w.match.has_series == flair.match.lacks_series
    without_t2w = study(
        series("t1", "MR", "T1W SE AXIAL", "BRAIN"),
        series("flair", "MR", "T2 FLAIR AXIAL", "BRAIN"),
        calling_ae="MR_SCANNER",
    )
    assert [v.rule.name for v in decide(loaded.policy, without_t2w).chosen] == ["brain-mr-missing-t2w"]
    t1w_only = study(series("t1", "MR", "T1W SE AXIAL", "BRAIN"), calling_ae="MR_SCANNER")
    assert decide(loaded.policy, t1w_only).chosen == ()


def test_default_policy_needs_an_archive_for_the_prognosis_priors() -> None:
    with pytest.raises(PolicyError, match=r"rules\[2\]\.priors\.archive"):
        load_policy(DEFAULT_POLICY, known_destinations=DESTINATIONS, known_archives=set())
    load_policy(DEFAULT_POLICY, known_destinations=DESTINATIONS, known_archives={"pacs"})


def test_default_policy_needs_a_tps_destination() -> None:
    with pytest.raises(PolicyError, match=r"rules\[1\]\.destinations\[0\]: unknown destination 'tps'"):
        load_policy(DEFAULT_POLICY, known_destinations={"pacs"})


@pytest.mark.parametrize(
    ("the_study", "chosen", "deciding"),
    [
        pytest.param(
            study(series(attrs={"CTDIvol": 2.5, "Modality": "CT"})),
            ["low-dose-ct-restoration"],
            "series s1: any_of[0] CTDIvol < 5.0",
            id="low-dose-ct",
        ),
        pytest.param(
            study(series(description="Thorax 1.0 B31f", attrs={"CTDIvol": 12.0})),
            [],
            "series s1: one of 2 alternatives",
            id="full-dose-ct",
        ),
        pytest.param(study(MR), [], "series s1: modality in ['CT']", id="mr"),
        pytest.param(
            study(MR, calling_ae="RT_MR_PLANNING"),
            ["mr-planning-sct"],
            "series s1: modality in ['CT']",
            id="planning-mr-sct",
        ),
        pytest.param(
            study(series(attrs={"CTDIvol": 2.5}), calling_ae="RT_MR_PLANNING"),
            ["low-dose-ct-restoration"],
            "series s1: any_of[0] CTDIvol < 5.0",
            id="low-dose-ct-from-the-planning-ae",
        ),
        pytest.param(
            study(
                series("t1c", "MR", "T1 SE POST-CONTRAST AXIAL", "BRAIN"),
                series("flair", "MR", "FLAIR AXIAL", "BRAIN"),
                calling_ae="MR_SCANNER",
            ),
            ["brain-tumour-prognosis"],
            "series t1c: modality in ['CT']",
            id="brain-tumour-follow-up",
        ),
        pytest.param(
            study(series("t1c", "MR", "T1 SE POST-CONTRAST AXIAL", "BRAIN"), calling_ae="MR_SCANNER"),
            [],
            "series t1c: modality in ['CT']",
            id="brain-t1c-without-flair",
        ),
        pytest.param(
            study(
                series("t1", "MR", "T1W SE AXIAL", "BRAIN"),
                series("t2", "MR", "T2 TSE AXIAL", "BRAIN"),
                calling_ae="MR_SCANNER",
            ),
            ["brain-mr-missing-flair"],
            "series t1: modality in ['CT']",
            id="brain-mr-without-flair",
        ),
        pytest.param(
            study(
                series("t1", "MR", "T1W SE AXIAL", "BRAIN"),
                series("t2", "MR", "T2 TSE AXIAL", "BRAIN"),
                series("t1c", "MR", "T1 SE POST GD AXIAL", "BRAIN"),
                calling_ae="MR_SCANNER",
            ),
            ["brain-mr-missing-flair"],
            "series t1: modality in ['CT']",
            id="brain-mr-with-t1c-without-flair",
        ),
        pytest.param(
            study(
                series("t1", "MR", "T1W SE AXIAL", "BRAIN"),
                series("t2", "MR", "T2 TSE AXIAL", "BRAIN"),
                series("flair", "MR", "T2 FLAIR AXIAL", "BRAIN"),
                calling_ae="MR_SCANNER",
            ),
            [],
            "series t1: modality in ['CT']",
            id="brain-mr-with-every-expected-contrast",
        ),
        pytest.param(
            study(
                series("t1", "MR", "T1 SE POST GD AXIAL", "BRAIN"),
                series("t2", "MR", "T2 TSE AXIAL", "BRAIN"),
                calling_ae="MR_SCANNER",
            ),
            [],
            "series t1: modality in ['CT']",
            id="brain-mr-without-a-native-t1",
        ),
        pytest.param(
            study(
                series("t1", "MR", "T1 TSE SAG", "KNEE"),
                series("t2", "MR", "T2 TSE COR", "KNEE"),
                calling_ae="MR_SCANNER",
            ),
            [],
            "series t1: modality in ['CT']",
            id="knee-mr-without-flair",
        ),
        pytest.param(
            study(
                series("t1", "MR", "T1W SE AXIAL", "BRAIN"),
                series("flair", "MR", "T2 FLAIR AXIAL", "BRAIN"),
                calling_ae="MR_SCANNER",
            ),
            [],  # the T2w rule is opt-in (see test_the_opt_in_t2w_rule_...)
            "series t1: modality in ['CT']",
            id="brain-mr-without-t2w",
        ),
        pytest.param(
            study(series("t1", "MR", "T1W SE AXIAL", "BRAIN"), calling_ae="MR_SCANNER"),
            [],
            "series t1: modality in ['CT']",
            id="brain-mr-t1w-only-is-another-protocol",
        ),
        pytest.param(
            study(series("t1", "MR", "T1 TSE SAG", "KNEE"), calling_ae="MR_SCANNER"),
            [],
            "series t1: modality in ['CT']",
            id="knee-mr-without-t2w",
        ),
        pytest.param(
            study(series(description="LOW DOSE CHEST")),
            ["low-dose-ct-restoration"],
            "series s1: any_of[1] series description ~ /(?i)low.?dose|ldct/",
            id="ctdivol-absent-low-dose-description",
        ),
    ],
)
def test_default_policy_routes(the_study: StudyView, chosen: list[str], deciding: str) -> None:
    default = load_policy(DEFAULT_POLICY, known_destinations=DESTINATIONS).policy
    decision = decide(default, the_study)
    assert [v.rule.name for v in decision.chosen] == chosen
    check = decision.verdicts[0].deciding
    assert check is not None
    assert check.condition == deciding
