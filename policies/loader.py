"""Load a policy file: YAML, validated at load, with errors that name file, line and field.

The file is parsed twice by PyYAML: once into data (``safe_load``: no tags, no objects,
never ``eval``) and once into its node tree, whose marks give the line of every key, so a
pydantic error at ``rules[2].match.modality`` is reported at that key's line.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from policies.model import Policy


class PolicyError(ValueError):
    """A policy file that cannot be used; one line per problem, each naming file:line: field."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class LoadedPolicy:
    policy: Policy
    source: Path
    sha256: str


def _line_of(root: yaml.Node | None, loc: tuple[int | str, ...]) -> int | None:
    """1-based line of the YAML node at ``loc`` (the deepest one that exists)."""
    node, line = root, (root.start_mark.line + 1) if root is not None else None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if key.value == part:
                    node, line = value, key.start_mark.line + 1
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def _where(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


_TYPE_WORDS = {"float": "a number", "int": "a whole number", "str": "text", "bool": "true or false"}


def _children(node: yaml.Node) -> Iterator[tuple[int | str, yaml.Node]]:
    """A node's keys and values (a mapping) or items (a sequence), each with its place."""
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            yield str(key.value), key
            yield str(key.value), value
    elif isinstance(node, yaml.SequenceNode):
        yield from enumerate(node.value)


def _recursive_alias(root: yaml.Node | None, source: Path) -> str | None:
    """The first alias that refers to a node containing it (``rules: &a [*a]``), as a problem.

    Such a file is data that contains itself: nothing can validate or use it. Walked without
    recursion, each node once (a node an alias shares is not walked again).
    """
    if root is None:
        return None
    done: set[int] = set()
    path: list[tuple[yaml.Node, tuple[int | str, ...], Iterator[tuple[int | str, yaml.Node]]]]
    path = [(root, (), _children(root))]
    on_path = {id(root)}
    while path:
        node, loc, children = path[-1]
        for part, child in children:
            if id(child) in on_path:
                line = child.start_mark.line + 1
                return (
                    f"{source}:{line}: {_where((*loc, part))}: recursive alias: it refers to the node "
                    f"anchored at line {line}, which contains it"
                )
            if id(child) not in done:
                on_path.add(id(child))
                path.append((child, (*loc, part), _children(child)))
                break
        else:
            path.pop()
            on_path.discard(id(node))
            done.add(id(node))
    return None


def _duplicate_keys(root: yaml.Node | None, source: Path) -> list[str]:
    """YAML silently keeps the last of two equal keys; a policy file must not.

    Each mapping is checked once, however many aliases share it; walked without recursion
    (the caller has refused recursive aliases first), in document order.
    """
    problems: list[str] = []

    def check(node: yaml.Node) -> Iterator[yaml.Node]:
        """Report the node's own duplicate keys, each before the value that follows it."""
        if isinstance(node, yaml.MappingNode):
            seen: dict[str, int] = {}
            for key, value in node.value:
                name = str(key.value)
                if name in seen:
                    problems.append(
                        f"{source}:{key.start_mark.line + 1}: {name}: this key appears twice in the same "
                        f"mapping (first at line {seen[name]}); YAML would silently keep only the last"
                    )
                else:
                    seen[name] = key.start_mark.line + 1
                yield value
        elif isinstance(node, yaml.SequenceNode):
            yield from node.value

    if root is None:
        return problems
    done = {id(root)}
    walk = [check(root)]
    while walk:
        child = next(walk[-1], None)
        if child is None:
            walk.pop()
        elif id(child) not in done:
            done.add(id(child))
            walk.append(check(child))
    return problems


def _schema_problems(exc: ValidationError, root: yaml.Node | None, source: Path) -> list[str]:
    """pydantic errors → ``file:line: field: message``, one per field.

    Members of a union each report their own failure (``value.float``, ``value.str``);
    those are merged into one line saying which kinds of value would do.
    """
    merged: dict[tuple[int | str, ...], list[str]] = {}
    kinds: dict[tuple[int | str, ...], list[str]] = {}
    for err in exc.errors():
        loc: list[int | str] = []
        kind = None
        for part in err["loc"]:
            if isinstance(part, str) and part.startswith(("function-", "literal")):
                continue
            if isinstance(part, str) and (part in _TYPE_WORDS or "[" in part):
                kind = _TYPE_WORDS.get(part, "a mapping")
                continue
            loc.append(part)
        key = tuple(loc)
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown field (check the spelling; see policies/default.yaml)"
        elif err["type"] == "missing":
            message = "required field is missing"
        elif err["type"] == "literal_error":
            message += f" (got {err.get('input')!r})"
        if kind is not None:
            kinds.setdefault(key, []).append(kind)
        merged.setdefault(key, [])
        if message not in merged[key]:
            merged[key].append(message)
    problems = []
    for key, messages in merged.items():
        if len(kinds.get(key, [])) > 1:
            messages = [f"expected {' or '.join(dict.fromkeys(kinds[key]))}"]
        problems.append(f"{source}:{_line_of(root, key)}: {_where(key)}: {'; '.join(messages)}")
    return problems


def _destination_problems(
    data: dict[str, Any], root: yaml.Node | None, source: Path, known: set[str]
) -> list[str]:
    problems = []
    rules = data.get("rules")
    for i, rule in enumerate(rules if isinstance(rules, list) else []):
        names = rule.get("destinations") if isinstance(rule, dict) else None
        names = [names] if isinstance(names, str) else names
        for j, name in enumerate(names if isinstance(names, list) else []):
            if isinstance(name, str) and name not in known:
                configured = (
                    f"configured: {', '.join(sorted(known))}" if known else "no [destinations] are configured"
                )
                at = _line_of(root, ("rules", i, "destinations", j))
                problems.append(
                    f"{source}:{at}: rules[{i}].destinations[{j}]: "
                    f"unknown destination {name!r} ({configured})"
                )
    return problems


def _archive_problems(
    data: dict[str, Any], root: yaml.Node | None, source: Path, known: set[str]
) -> list[str]:
    """A rule's ``priors.archive`` must be a configured ``[archives.NAME]``."""
    problems = []
    rules = data.get("rules")
    for i, rule in enumerate(rules if isinstance(rules, list) else []):
        priors = rule.get("priors") if isinstance(rule, dict) else None
        name = priors.get("archive") if isinstance(priors, dict) else None
        if isinstance(name, str) and name.strip() and name.strip() not in known:
            configured = (
                f"configured: {', '.join(sorted(known))}" if known else "no [archives] are configured"
            )
            at = _line_of(root, ("rules", i, "priors", "archive"))
            problems.append(
                f"{source}:{at}: rules[{i}].priors.archive: unknown archive {name!r} ({configured})"
            )
    return problems


def _duplicate_rule_names(policy: Policy, root: yaml.Node | None, source: Path) -> list[str]:
    problems: list[str] = []
    first: dict[str, int] = {}
    for i, rule in enumerate(policy.rules):
        if rule.name in first:
            problems.append(
                f"{source}:{_line_of(root, ('rules', i, 'name'))}: rules[{i}].name: another rule is "
                f"already named {rule.name!r} (rules[{first[rule.name]}]); names must be unique"
            )
        else:
            first[rule.name] = i
    return problems


def parse_policy(
    text: str,
    source: Path,
    known_destinations: set[str] | None = None,
    known_archives: set[str] | None = None,
) -> Policy:
    """Validate policy text; raise :class:`PolicyError` naming file, line and field.

    Every problem found is reported at once (schema, duplicate keys, unknown destinations
    and archives, duplicate rule names), so one edit-and-check round fixes them all.
    ``known_archives`` None: the archives a rule's priors name are not checked.
    """
    try:
        data: Any = yaml.safe_load(text)
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        context = getattr(exc, "context", None)
        started = getattr(exc, "context_mark", None)
        where = (
            f" ({context} that started at line {started.line + 1})" if context and started is not None else ""
        )
        raise PolicyError(
            [f"{source}{line}: not valid YAML: {getattr(exc, 'problem', exc)}{where}"]
        ) from None
    except RecursionError:  # PyYAML composes recursively: thousands of nested [ or {
        raise PolicyError([f"{source}: not valid YAML: nested too deeply to read"]) from None
    recursive = _recursive_alias(root, source)
    if recursive is not None:
        raise PolicyError([recursive])
    if not isinstance(data, dict):
        raise PolicyError([f"{source}:1: a policy file is a mapping with 'mode' and 'rules'"])
    problems = _duplicate_keys(root, source)
    if known_destinations is not None:
        problems += _destination_problems(data, root, source, known_destinations)
    if known_archives is not None:
        problems += _archive_problems(data, root, source, known_archives)
    try:
        policy = Policy.model_validate(data)
    except ValidationError as exc:
        raise PolicyError(_schema_problems(exc, root, source) + problems) from None
    problems += _duplicate_rule_names(policy, root, source)
    if problems:
        raise PolicyError(problems)
    return policy


def load_policy(
    path: Path, known_destinations: set[str] | None = None, known_archives: set[str] | None = None
) -> LoadedPolicy:
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise PolicyError([f"{path}: cannot read the policy file: {exc.strerror}"]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise PolicyError([f"{path}: not UTF-8 text"]) from None
    policy = parse_policy(text, Path(path), known_destinations, known_archives)
    return LoadedPolicy(policy=policy, source=Path(path), sha256=hashlib.sha256(raw).hexdigest())
