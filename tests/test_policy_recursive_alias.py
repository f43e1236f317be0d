"""A policy file whose YAML alias refers to a node containing it (``rules: &a [*a]``) is data
that contains itself: a policy error naming the place (exit 2 as any other), never a
RecursionError. Aliases that only share a node still load, and are checked once."""

from __future__ import annotations

from pathlib import Path

import pytest

from policies.loader import PolicyError, load_policy
from tests.test_cli_corners import cli, node_home, tree  # noqa: F401  (node_home: the fixture)
from tests.test_policies import RULE, parse


def recursive(where: str, line: int, source: str = "p.yaml") -> str:
    return (
        f"{source}:{line}: {where}: recursive alias: it refers to the node anchored at line {line}, "
        "which contains it"
    )


RECURSIVE = [
    pytest.param("rules: &a [*a]\n", "rules[0]", 1, id="sequence"),
    pytest.param(
        "mode: first-match\nrules: &a\n  - name: r1\n    pipeline: forward\n    match: *a\n",
        "rules[0].match",
        2,
        id="in-a-rule",
    ),
    pytest.param(
        "&top\nmode: first-match\nrules: []\nextra: {deeper: [1, *top]}\n",
        "extra.deeper[1]",
        1,
        id="the-whole-file",
    ),
]


@pytest.mark.parametrize(("text", "where", "line"), RECURSIVE)
def test_a_recursive_alias_is_a_policy_error(text: str, where: str, line: int) -> None:
    with pytest.raises(PolicyError) as refused:
        parse(text)
    assert refused.value.problems == [recursive(where, line)]


def test_a_shared_alias_loads_and_its_duplicate_key_is_reported_once() -> None:
    shared = "mode: first-match\nrules:\n  - &r {name: r1, pipeline: forward, destinations: [pacs]}\n"
    assert [r.name for r in parse(shared).rules] == ["r1"]
    twice = "mode: first-match\nx: &m {a: 1, a: 2}\ny: [*m, *m, *m]\nrules:\n" + RULE  # x, y: unknown too
    with pytest.raises(PolicyError) as refused:
        parse(twice)
    duplicates = [p for p in refused.value.problems if "appears twice" in p]
    assert duplicates == [
        "p.yaml:2: a: this key appears twice in the same mapping (first at line 2); "
        "YAML would silently keep only the last"
    ]


def test_nesting_too_deep_to_read_is_a_policy_error(tmp_path: Path) -> None:
    deep = tmp_path / "deep.yaml"
    deep.write_text("mode: first-match\nrules: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(PolicyError) as refused:
        load_policy(deep)
    assert refused.value.problems == [f"{deep}: not valid YAML: nested too deeply to read"]


def test_policy_check_and_explain_refuse_a_recursive_alias(node_home: Path) -> None:  # noqa: F811
    path = node_home / "recursive.yaml"
    path.write_text("rules: &a [*a]\n")
    before = tree(node_home)
    line = f"policy error: {recursive('rules[0]', 1, str(path))}\n"
    for args in (["policy", "check", str(path)], ["policy", "explain", "1.2.3", "--policy", str(path)]):
        result = cli(*args, "--home", str(node_home))
        assert (result.exit_code, result.stdout, result.stderr) == (2, "", line), args
    assert tree(node_home) == before
