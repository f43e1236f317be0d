"""``dicom-node policy check FILE | explain STUDY_UID``: is a policy valid, and why did a
study go where it went (or nowhere)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.text import Text

from dicom_node.cli.common import (
    ConfigOpt,
    HomeOpt,
    JsonOpt,
    app,
    console,
    err_console,
    fail,
    open_existing,
    os_user,
    print_json,
    read_config,
)

if TYPE_CHECKING:
    from policies.engine import Decision, RuleVerdict, StudyView
    from policies.model import Rule

policy_app = typer.Typer(
    help="Routing policies: check a file, explain a study's routing.", no_args_is_help=True
)
app.add_typer(policy_app, name="policy")


#: How ``policy check`` says a rule's urgency.
_URGENCY_TEXT = {
    "normal": "",
    "urgent": " (urgent: runs and is sent before normal jobs)",
    "offpeak": " (off-peak: runs only inside [workers] offpeak_hours, after every other job)",
}


def _gate_text(rule: Rule) -> str:
    limits = {
        k: v for k, v in rule.qc.model_dump().items() if v is not None and k != "hold_on_failed_validation"
    }
    qc = ", ".join(f"{k} {v:g}" for k, v in limits.items())
    if rule.gate == "shadow":
        return "shadow: the pipeline runs and is audited; nothing is sent"
    if rule.gate == "review":
        return "review: every output is held until a person approves it (dicom-node review)"
    return "auto: delivered, unless validation fails" + (f" or a QC limit is exceeded ({qc})" if qc else "")


def _fallback_text(rule: Rule) -> str:
    """What happens when the rule's pipeline refuses the input (outside its model's domain)."""
    from dicom_node.jobs.fallback import fallback_pipeline

    if rule.pipeline == "forward":
        return ""  # forward takes anything: nothing to refuse
    pipeline, none_runs = fallback_pipeline(rule.pipeline, rule.fallback)
    if pipeline is None:
        return f"; input outside the model's domain: refused, {none_runs}"
    if pipeline == "forward":
        then = f"the refused series goes unchanged to {', '.join(rule.destinations) or 'no destination'}"
    else:
        then = f"{pipeline} runs instead"
    return f"; input outside the model's domain: refused, then {then} (fallback {rule.fallback})"


def _print_problems(problems: list[str]) -> None:
    for problem in problems:
        err_console.print(Text(f"policy error: {problem}"), highlight=False, soft_wrap=True)


@policy_app.command("check")
def check(
    file: Annotated[Path, typer.Argument(help="The policy YAML file to check.")],
    config: ConfigOpt = None,
    home: HomeOpt = Path("."),
    json_out: JsonOpt = False,
) -> None:
    """Validate a policy file against the pipelines and the configured destinations.

    Exit 0 when it can be used, 2 with one line per problem (file:line: field: what).
    """
    from policies.loader import PolicyError, load_policy

    node_config = read_config(config, home).config
    destinations = set(node_config.destinations)
    try:
        loaded = load_policy(file, destinations or None, set(node_config.archives) if destinations else None)
    except PolicyError as exc:
        _print_problems(exc.problems)
        raise typer.Exit(2) from None
    rules = loaded.policy.ordered()
    if json_out:
        print_json(
            {
                "file": str(file),
                "sha256": loaded.sha256,
                "mode": loaded.policy.mode,
                "rules": [r.model_dump(mode="json") for r in rules],
                "destinations_checked": bool(destinations),
            }
        )
        return
    console.print(
        Text(f"{file}: valid — {len(rules)} rule(s), mode {loaded.policy.mode}, sha256 {loaded.sha256[:12]}")
    )
    for rule in rules:
        console.print(
            Text(
                f"  [{rule.priority}] {rule.name}: {rule.pipeline}"
                f"{' (one job per series, select.each)' if rule.per_series else ''}"
                f"{_URGENCY_TEXT[rule.urgency]} → "
                f"{', '.join(rule.destinations) or 'nowhere'}; {_gate_text(rule)}{_fallback_text(rule)}"
            )
        )
        if rule.priors is not None:
            console.print(Text(f"      priors: {rule.priors.describe()}"))
    if not destinations:
        console.print(
            Text("note: the config defines no [destinations]; destination names were not checked"),
            style="yellow",
        )


def _verdict_json(v: RuleVerdict) -> dict[str, Any]:
    deciding = v.deciding
    return {
        "rule": v.rule.name,
        "priority": v.rule.priority,
        "matched": v.matched,
        "series_uid": v.series_uid,
        # a rule with select: {each: true}: every series it takes, one job each
        "each_series": list(v.each_series),
        "checks": [{"condition": c.condition, "passed": c.passed, "seen": c.seen} for c in v.checks],
        "deciding": None if deciding is None else {"condition": deciding.condition, "seen": deciding.seen},
    }


def _series_text(uid: str | None, view: StudyView) -> str:
    """A series as ``explain`` names it: UID, modality and description (None: the pipeline's)."""
    if uid is None:
        return "(pipeline chooses)"
    s = next((s for s in view.series if s.series_uid == uid), None)
    return uid if s is None else f"{uid} ({s.modality} {s.description or ''!r})"


def _next_steps(decision: Decision, plans: list[Any], view: StudyView) -> list[str]:
    """One line per chosen rule: the pipeline, the series (each, one job per series, for a
    rule with ``select: {each: true}``), the destinations, the gate and the fallback."""
    if not decision.chosen:
        return ["no rule matches: the study is stored and nothing is processed or sent"]
    steps = []
    for v in decision.chosen:
        own = [p for p in plans if p.rule == v.rule.name]
        if not own:
            continue
        series = [_series_text(p.series_uid, view) for p in own]
        on = (
            f"on each of {len(own)} series, one job each: {'; '.join(series)}"
            if v.rule.per_series
            else f"on series {series[0]}"
        )
        steps.append(
            f"rule {v.rule.name}: run {own[0].pipeline} {on}, "
            f"then {', '.join(own[0].destinations) or 'no destination'}; {_gate_text(v.rule)}"
            f"{_fallback_text(v.rule)}"
        )
    return steps


@policy_app.command("explain")
def explain(
    study_uid: Annotated[str, typer.Argument(help="Study Instance UID (see `dicom-node studies`).")],
    config: ConfigOpt = None,
    home: HomeOpt = Path("."),
    policy_file: Annotated[
        Path | None,
        typer.Option("--policy", help="Explain with this policy file instead of the configured one."),
    ] = None,
    query_archive: Annotated[
        bool,
        typer.Option(
            "--query-archive",
            help="For a rule with priors, send its query to the archive (audited) and show what it holds.",
        ),
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Which rule matches a received study, which conditions passed or failed, what happens next.

    For a chosen rule with priors: the query it would send the archive, the priors this
    node already holds, and (``--query-archive``) what the archive answered.
    """
    from sqlalchemy import select

    from dicom_node.db import queries
    from dicom_node.db import schema as t
    from dicom_node.jobs.routing import PolicyRouter
    from policies.loader import PolicyError, load_policy

    runtime = open_existing(config, home, actor=os_user() if query_archive else None)
    try:
        path = policy_file or runtime.policy_path
        if path is None:
            raise fail("no policy: set [policy] file in the config, or pass --policy FILE")
        try:
            loaded = load_policy(path, set(runtime.config.destinations), set(runtime.config.archives))
        except PolicyError as exc:
            _print_problems(exc.problems)
            raise typer.Exit(2) from None
        router = PolicyRouter(
            loaded, runtime.paths.data, {n: d.ae_title for n, d in runtime.config.destinations.items()}
        )
        with runtime.db.read() as conn:
            study_id = conn.execute(
                select(t.studies.c.id).where(t.studies.c.study_uid == study_uid.strip())
            ).scalar()
            if study_id is None:
                raise fail(f"no study {study_uid} in this node's index (see `dicom-node studies`)")
            view, decision, plans = router.plan(conn, study_id)
            assert decision is not None
            priors = _explain_priors(runtime, conn, study_id, decision, query_archive)
        jobs = queries.list_jobs(runtime.db, study_uid=study_uid.strip())  # each with its series
    finally:
        runtime.close()
    assert decision is not None
    if json_out:
        print_json(
            {
                "study_uid": view.study_uid,
                "policy": str(path),
                "mode": loaded.policy.mode,
                "calling_ae": view.calling_ae,
                "called_ae": view.called_ae,
                "rules": [_verdict_json(v) for v in decision.verdicts],
                "chosen": [v.rule.name for v in decision.chosen],
                "next": _next_steps(decision, plans, view),
                "plans": [
                    {"rule": p.rule, "pipeline": p.pipeline, "series_uid": p.series_uid} for p in plans
                ],
                "priors": priors,
                "jobs": jobs,
            }
        )
        return
    _print_explanation(view, decision, plans, path, loaded.policy.mode, jobs)
    _print_priors(priors)


def _explain_priors(
    runtime: Any, conn: Any, study_id: int, decision: Decision, ask: bool
) -> list[dict[str, Any]]:
    """Per chosen rule with priors: the query, what is held here, what the archive holds."""
    from dicom_node.ingest.archives import ArchiveError, Archives
    from dicom_node.jobs import priors as p

    out: list[dict[str, Any]] = []
    for v in decision.chosen:
        wanted = v.rule.priors
        if wanted is None:
            continue
        current = p.current_study(conn, study_id, v.series_uid)
        local = p.local_priors(conn, current)
        entry: dict[str, Any] = {
            "rule": v.rule.name,
            "priors": wanted.describe(),
            "query": {"archive": wanted.archive, **p.query(wanted, current).keys()},
            "query_text": p.describe_query(wanted, current),
            "series_regex": wanted.series,
        }
        remote: list[p.PriorStudy] = []
        if ask:
            try:
                archive = Archives(runtime.config, runtime.paths.home, runtime.audit, actor=os_user()).get(
                    wanted.archive
                )
                remote = p.archive_priors(archive, wanted, current)
                entry["archive_answer"] = [_prior_json(s) for s in remote]
            except ArchiveError as exc:
                entry["archive_error"] = str(exc)
        selection = p.choose(wanted, current, p.merge(local, remote))
        entry["held_locally"] = [_prior_json(s) for s in p.choose(wanted, current, local).chosen]
        entry["chosen"] = [_prior_json(s) for s in selection.chosen]
        entry["to_fetch"] = selection.to_fetch
        entry["shortfall"] = selection.shortfall
        out.append(entry)
    return out


def _prior_json(study: Any) -> dict[str, Any]:
    return {
        "study_uid": study.study_uid,
        "study_date": study.study_date.isoformat() if study.study_date else None,
        "series": [
            {
                "series_uid": s.series_uid,
                "modality": s.modality,
                "description": s.description,
                "local": s.local,
            }
            for s in study.series
        ],
    }


def _print_priors(priors: list[dict[str, Any]]) -> None:
    for entry in priors:
        console.print(Text(f"priors for rule {entry['rule']}: {entry['priors']}", style="bold"))
        console.print(Text(f"  query: {entry['query_text']}"))
        if "archive_error" in entry:
            console.print(Text(f"  archive not asked: {entry['archive_error']}", style="red"))
        for label, key in (("held here", "held_locally"), ("archive answered", "archive_answer")):
            if key not in entry:
                continue
            studies = entry[key]
            noun = "study" if len(studies) == 1 else "studies"
            console.print(Text(f"  {label}: {len(studies)} qualifying {noun}"))
            for s in studies:
                console.print(
                    Text(
                        f"    {s['study_uid']} ({s['study_date']}): "
                        + ", ".join(f"{x['modality']} {x['description']!r}" for x in s["series"])
                    )
                )
        console.print(Text(f"  would use: {', '.join(s['study_uid'] for s in entry['chosen']) or 'none'}"))
        if entry["to_fetch"]:
            console.print(Text(f"  would fetch: {', '.join(entry['to_fetch'])}"))
        if entry["shortfall"]:
            console.print(Text(f"  short: {entry['shortfall']}", style="yellow"))


def _print_explanation(
    view: StudyView, decision: Decision, plans: list[Any], path: Path, mode: str, jobs: list[dict[str, Any]]
) -> None:
    out = console
    out.print(
        Text(f"study {view.study_uid} from {view.calling_ae} to {view.called_ae}; policy {path} ({mode})")
    )
    for s in view.series:
        out.print(Text(f"  series {s.series_uid}: {s.modality} {s.description!r}, {s.instances} instance(s)"))
    chosen = {v.rule.name for v in decision.chosen}
    for v in decision.verdicts:
        if v.rule.name in chosen:
            head, style = "MATCHED (chosen)", "bold green"
        elif v.matched:
            head, style = "matched (not chosen: first-match takes the higher-priority rule)", "green"
        else:
            head, style = "no match", "red"
        out.print(Text(f"rule {v.rule.name} [priority {v.rule.priority}]: {head}", style=style))
        for c in v.checks:
            mark = "pass" if c.passed else "FAIL"
            out.print(Text(f"    {mark}  {c.condition}   (seen: {c.seen})"))
        if v.deciding is not None:
            verb = "matched on" if v.matched else "failed on"
            out.print(Text(f"    deciding condition: {verb} {v.deciding.condition}"))
        if v.each_series:
            out.print(
                Text(f"    takes each of {len(v.each_series)} series (select.each), one job per series:")
            )
            for uid in v.each_series:
                out.print(Text(f"      {_series_text(uid, view)}"))
    out.print(Text("next:", style="bold"))
    for step in _next_steps(decision, plans, view):
        out.print(Text(f"  {step}"))
    if jobs:
        out.print(Text("jobs already made for this study:", style="bold"))
        for j in jobs:
            out.print(
                Text(
                    f"  job {j['id']} (v{j['study_version']}) {j['pipeline']}"
                    f"{' on series ' + j['series_uid'] if j.get('series_uid') else ''}: "
                    f"{j['state']} {j['reason'] or ''}"
                )
            )
