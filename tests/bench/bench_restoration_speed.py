"""Restoration inference speed: slices per second at 512×512, σ and hallucination map included.

Runs the shipped ``restoration`` pipeline (the same stages a job runs) on a SIMULATED
low-dose CT study (``models.sim``, projection-domain noise) and times its stages. The
figure the target is about (≥ 25 slices/s) is the model stage: the restored slices,
their σ and the hallucination map with its suspect regions (``model-or-baseline``), with
the field-of-view detection that feeds it. Loading, encoding and validating the outputs
are printed too but are the end-to-end benchmark's business
(``bench_restoration_e2e.py``). Torch runs on the threads the worker would use (all
cores). Median of ``--repeats`` runs on the same study.

Usage: ``python tests/bench/bench_restoration_speed.py [--slices 96] [--repeats 3]``
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dicom_node.cli.run_cmds import _study_inputs  # noqa: E402
from dicom_node.lab.simulate import LdctSpec, write_ldct_study  # noqa: E402
from pipelines.base import RunEnvironment, StudyInput  # noqa: E402
from pipelines.registry import get_pipeline  # noqa: E402

MODEL_STAGES = ("fov", "model-or-baseline")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=96)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="dn-bench-restore-"))
    try:
        write_ldct_study(root / "study", LdctSpec(slices=args.slices, size=args.size, dose=0.25, seed=11))
        studies, _, _ = _study_inputs([root / "study" / "low-dose"])
        ((study_uid, instances),) = studies.items()
        from models.restoration import native_bfloat16

        precisions = ["float32", "bfloat16"] if native_bfloat16() else ["float32"]
        default = get_pipeline("restoration", None, "auto").precision  # type: ignore[attr-defined]
        rates: dict[str, float] = {}
        for precision in precisions:
            print(f"inference precision {precision}:", flush=True)
            pipeline = get_pipeline("restoration", None, precision)
            rates[precision] = _time(pipeline, study_uid, instances, root, args)
        print()
        for precision, rate in rates.items():
            chosen = (
                "  <- what the node runs here ([models] precision = auto)" if precision == default else ""
            )
            print(f"restoration inference, {precision}: {rate:.1f} slices/s{chosen}")
        if len(precisions) == 1:
            print("bfloat16: not timed (this CPU has no AVX512-BF16/AMX; auto runs float32 here)")
        print(
            f"restoration inference (restored + σ + hallucination map): {rates[default]:.1f} slices/s "
            f"in {default} (target >= 25 slices/s)"
        )
        return 0
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _time(pipeline: object, study_uid: str, instances: list, root: Path, args: argparse.Namespace) -> float:
    """Median slices/s of the model stages over ``args.repeats`` runs; prints the stages."""
    timings: list[dict[str, float]] = []
    for rep in range(args.repeats):
        out = root / f"out-{rep}"
        out.mkdir()
        ctx = pipeline.execute(  # type: ignore[attr-defined]
            StudyInput(job_id=0, study_uid=study_uid, study_version=0, instances=tuple(instances)),
            RunEnvironment(workdir=out, uid_root="2.25.", node_version="bench"),
        )
        if ctx.qc.get("classical baseline ran: input noise outside model range", (0,))[0]:
            raise RuntimeError("the classical baseline ran instead of the model: not a model timing")
        timings.append(dict(ctx.timings))
        model_s = sum(ctx.timings[s] for s in MODEL_STAGES)
        print(
            f"  run {rep + 1}: model stages {model_s:6.2f} s  {args.slices / model_s:6.1f} slices/s",
            flush=True,
        )
        shutil.rmtree(out)
    print(f"  study: {args.slices} slices {args.size}x{args.size} low-dose CT (SIMULATED), dose 0.25")
    print(f"  {'stage':20s} {'median s':>9s} {'ms/slice':>9s}")
    for stage in timings[0]:
        med = statistics.median(t[stage] for t in timings)
        print(f"  {stage:20s} {med:9.2f} {1000 * med / args.slices:9.1f}")
    model_med = statistics.median(sum(t[s] for s in MODEL_STAGES) for t in timings)
    return args.slices / model_med


if __name__ == "__main__":
    raise SystemExit(main())
