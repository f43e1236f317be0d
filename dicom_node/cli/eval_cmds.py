"""``dicom-node evaluate restoration|sct|prognosis|synthesis --report DIR``: evaluations on simulated data."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from dicom_node.cli.common import app, console, fail, output_dir

evaluate_app = typer.Typer(
    help="Evaluate models on held-out simulated data (HTML + JSON report).", no_args_is_help=True
)
app.add_typer(evaluate_app, name="evaluate")


@evaluate_app.command("restoration")
def evaluate_restoration(
    report: Annotated[Path, typer.Option("--report", help="Directory for report.html and report.json.")],
    cases: Annotated[int, typer.Option(min=2, help="Held-out slices per dose (half head, half chest).")] = 16,
    size: Annotated[int, typer.Option(min=64, max=1024, help="Slice size in pixels.")] = 512,
    seed: Annotated[int, typer.Option(help="Seed of the test set.")] = 7,
    model_dir: Annotated[
        Path | None, typer.Option(help="Model directory (default: the shipped model).")
    ] = None,
    bm3d: Annotated[
        bool, typer.Option(help="Include BM3D if the non-commercial bm3d package is installed.")
    ] = True,
    precision: Annotated[
        str,
        typer.Option(
            help="What the network computes in: float32 or bfloat16 (evaluating a precision the "
            "card does not list yet is how it gets listed: see docs/design-notes.md)."
        ),
    ] = "float32",
) -> None:
    """Pixel, feature, task, calibration and hallucination figures, on SIMULATED data."""
    import torch
    from rich.progress import Progress

    from models.evaluation.report import write_report
    from models.evaluation.restoration_eval import EvalConfig, evaluate_with_example, inference_speed
    from models.evaluation.results import to_jsonable
    from models.restoration import PRECISIONS, RestorationModel

    torch.set_num_threads(2)
    if precision not in PRECISIONS:
        raise fail(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    try:
        model = RestorationModel(model_dir) if model_dir else RestorationModel.shipped()
    except (FileNotFoundError, RuntimeError, ValueError) as exc:
        raise fail(str(exc)) from None
    # the evaluation is what admits a precision into the card, so it may run one the card
    # does not list yet
    model.precision = precision
    output_dir(report, "--report")
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("evaluating", total=None)
        results, summary, example = evaluate_with_example(
            model,
            EvalConfig(seed=seed, n_cases=cases, size=size, bm3d=bm3d),
            progress=lambda stage, done, total: bar.update(task, description=stage),
        )
        bar.update(task, description="inference speed")
        summary["inference_slices_per_s_512"] = round(inference_speed(model), 2)
    summary["model"] = {
        "name": model.card.name,
        "version": model.card.version,
        "weights_sha256": model.card.weights_sha256,
        "inference_precision": precision,
    }
    summary["note"] = "computed on SIMULATED data (models.sim); not a clinical validation"
    results["summary"] = summary
    write_report(
        results,
        report,
        title=f"{model.card.name} {model.card.version} — evaluation on simulated data",
        example=example,
    )
    (report / "summary.json").write_text(json.dumps(to_jsonable(summary), indent=2) + "\n")
    console.print_json(data=to_jsonable(summary))
    console.print(f"report: {report / 'report.html'}")


@evaluate_app.command("sct")
def evaluate_sct(
    report: Annotated[Path, typer.Option("--report", help="Directory for report.html and results.json.")],
    cases: Annotated[int, typer.Option(min=1, help="Held-out test cases (MR/CT head volumes).")] = 8,
    slices: Annotated[int, typer.Option(min=3, help="Slices per case.")] = 12,
    size: Annotated[int, typer.Option(min=64, max=512, help="Slice size in pixels.")] = 256,
    fit_cases: Annotated[
        int, typer.Option("--fit-cases", min=1, help="Training-role cases the baselines are fitted on.")
    ] = 8,
    seed: Annotated[
        int | None, typer.Option(help="Seed of the test set (default: the model's training seed).")
    ] = None,
    model_dir: Annotated[
        Path | None, typer.Option("--model", help="Model directory (default: the shipped sct-head).")
    ] = None,
) -> None:
    """MR → synthetic CT: HU errors, WEPL dose proxy, calibration and hallucination figures for the
    model and two classical baselines, on SIMULATED data."""
    import torch
    from rich.progress import Progress

    from models.evaluation.results import to_jsonable
    from models.evaluation.sct_eval import OverlappingTestSet, SctEvalConfig, evaluate
    from models.evaluation.sct_report import write_sct_report
    from models.sct import SctModel

    torch.set_num_threads(2)
    try:
        model = SctModel(model_dir) if model_dir else SctModel.shipped()
    except (FileNotFoundError, RuntimeError, ValueError) as exc:
        raise fail(f"{exc} (pass --model DIR to evaluate another model directory)") from None
    if seed is None:
        seed = int((model.meta.training or {}).get("seed", SctEvalConfig().seed))
    config = SctEvalConfig(seed=seed, n_cases=cases, slices=slices, size=size, fit_cases=fit_cases)
    output_dir(report, "--report")
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("evaluating", total=None)
        try:
            results, summary, example = evaluate(
                model, config, progress=lambda stage, done, total: bar.update(task, description=stage)
            )
        except OverlappingTestSet as exc:
            raise fail(str(exc)) from None
    summary["model"] = {
        "name": model.card.name,
        "version": model.card.version,
        "weights_sha256": model.card.weights_sha256,
        "directory": str(model.directory),
    }
    summary["note"] = "computed on SIMULATED data (models.sim.mrct); not a clinical validation"
    results["summary"] = summary
    write_sct_report(
        results,
        report,
        title=f"{model.card.name} {model.card.version} — synthetic CT evaluation on simulated data",
        example=example,
    )
    console.print_json(data=to_jsonable(summary))
    console.print(f"report: {report / 'report.html'} (simulated data)")


@evaluate_app.command("prognosis")
def evaluate_prognosis(
    report: Annotated[Path, typer.Option("--report", help="Directory for report.md and evaluation.json.")],
    test: Annotated[
        int,
        typer.Option("--test", min=1, max=240, help="Held-out test patients (seeds from --test-first on)."),
    ] = 40,
    test_first: Annotated[
        int,
        typer.Option(
            "--test-first",
            min=9000,
            max=9999,
            help="The first test seed (default 9000; prognosis-growth 1.2 was accepted on 9120-9239).",
        ),
    ] = 9000,
    train: Annotated[
        int, typer.Option("--train", min=2, max=80, help="Training patients, with --learn (seeds 7000-).")
    ] = 80,
    learn: Annotated[
        bool, typer.Option("--learn", help="Re-learn the calibration on the training patients.")
    ] = False,
    cache: Annotated[
        Path | None, typer.Option("--cache", help="Keep each patient's growth-fit ensemble here.")
    ] = None,
    model_dir: Annotated[
        Path | None, typer.Option("--model", help="Model directory (default: the shipped prognosis-growth).")
    ] = None,
) -> None:
    """Tumour-growth prognosis: pixel, feature, task, calibration and hallucination levels, on
    SIMULATED patients."""
    from rich.progress import Progress

    from models.evaluation import prognosis_eval as pe
    from models.evaluation.prognosis_report import run, write_report
    from models.evaluation.results import to_jsonable
    from models.prognosis import PrognosisModel

    try:
        model = PrognosisModel(model_dir) if model_dir else PrognosisModel.shipped()
    except (FileNotFoundError, RuntimeError, ValueError) as exc:
        raise fail(f"{exc} (pass --model DIR to evaluate another model directory)") from None
    calibration, source = model.calibration, f"calibration of {model.directory}"
    if learn and train % 2:
        raise fail("--train must be even (half learn the prior, half the interval)")
    output_dir(report, "--report")
    if learn:
        cases = pe._cases(pe.TRAIN_SEEDS[:train], "train", cache)
        half = min(pe.PRIOR_PATIENTS, len(cases) // 2)
        calibration = pe.learn_calibration(cases[:half], cases[half:])
        source = f"calibration re-learned on training seeds {pe.TRAIN_SEEDS[0]}-{pe.TRAIN_SEEDS[train - 1]}"
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("evaluating", total=test)
        results = run(
            tuple(range(test_first, test_first + test)),
            calibration,
            cache=cache,
            progress=lambda stage, done, total: bar.update(task, description=stage, completed=done),
        )
    results["model"] = {
        "name": model.card.name,
        "version": model.card.version,
        "weights_sha256": model.card.weights_sha256,
        "directory": str(model.directory),
        "calibration_source": source,
    }
    results["calibration"] = to_jsonable(asdict(calibration))
    path = write_report(
        results,
        report,
        title=f"{model.card.name} {model.card.version} — prognosis evaluation on simulated data",
    )
    summary = results["task"]["summary"]["model"]
    console.print(
        f"SIMULATED: model Dice {summary['dice_mean']:.3f}, pixel MAE "
        f"{results['pixel']['mae']['model'].get('flair tumour', float('nan')):.3f} (FLAIR, tumour region), "
        f"hallucination AUROC {results['hallucination']['auroc']}"
    )
    console.print(f"report: {path} (simulated data)")


@evaluate_app.command("synthesis")
def evaluate_synthesis(
    report: Annotated[Path, typer.Option("--report", help="Directory for report.md and evaluation.json.")],
    task: Annotated[
        str, typer.Option(help='"t1w+t2w->flair", "t1w->flair" or "t1w->t2w".')
    ] = "t1w+t2w->flair",
    model_dir: Annotated[
        Path | None,
        typer.Option("--model", help="A synthesis model directory to score beside the baselines."),
    ] = None,
    train: Annotated[
        int, typer.Option(min=1, max=200, help="Training studies the baselines are fitted on.")
    ] = 40,
    test: Annotated[int, typer.Option(min=1, max=40, help="Held-out test studies (seeds 30000-).")] = 40,
) -> None:
    """Contrast synthesis: pixel figures per tissue, lesion detection on the synthetic against the
    true FLAIR, and coverage of the model's sigma, for a model and two baselines, on SIMULATED data."""
    from models.evaluation.synthesis_eval import run, table
    from models.synthesis_norm import TASKS

    if task not in TASKS:
        raise fail(f"--task {task!r}: one of {', '.join(sorted(TASKS))}")
    output_dir(report, "--report")
    try:
        results = run(report, task, train=train, test=test, model_dir=model_dir)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        raise fail(f"evaluate synthesis: {exc}") from None
    console.print(table(results), highlight=False, markup=False)
    console.print(f"report: {report / 'report.md'} (simulated data)")
