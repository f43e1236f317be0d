"""Is the shipped restoration model's evaluation table unchanged? (issue 20, last line)

Speed work (slabs, bfloat16, integer maps) must not move the model's figures. This runs
``dicom-node evaluate restoration`` again, on the card's own test set (seed 7, 16 slices
per dose, 512x512, SIMULATED), in the precision the node runs here (``[models] precision =
auto``: bfloat16 where the card lists it and the CPU multiplies it natively, else float32),
and prints each model figure beside the one stored with the model
(``models/zoo/ldct-restoration/<version>/evaluation*.json``). It fails (exit 1) when the
PSNR moved by more than 0.05 dB at either dose, or another figure by more than its
tolerance below. BM3D is left out (a non-commercial package; the stored table says so).

Usage: ``python tests/bench/bench_restoration_evaluation.py [--precision auto|float32|bfloat16]``
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from models.restoration import RestorationModel  # noqa: E402

#: (figure, path in a dose's table, tolerance): the PSNR's is the issue's 0.05 dB.
FIGURES: list[tuple[str, tuple[str, ...], float]] = [
    ("PSNR (dB)", ("psnr_db", "model"), 0.05),
    ("SSIM", ("ssim", "model"), 0.002),
    ("lesion contrast ratio", ("lesion_contrast_ratio", "model"), 0.01),
    ("d'", ("dprime", "model"), 0.01),
    ("90 % coverage", ("coverage_90",), 0.005),
    ("hallucination AUROC, inserted 30 HU", ("hallucination_auroc", "inserted 30 HU r2.5"), 0.01),
]


def _get(table: dict[str, Any], path: tuple[str, ...]) -> float | None:
    value: Any = table
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return float(value) if isinstance(value, int | float) else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--precision", default="auto", choices=["auto", "float32", "bfloat16"])
    args = ap.parse_args()
    model = RestorationModel.shipped(precision=args.precision)
    card, precision = model.meta, model.precision
    stored_path = model.directory / (
        "evaluation.json" if precision == "float32" else f"evaluation-{precision}.json"
    )
    stored = json.loads(stored_path.read_text())
    with tempfile.TemporaryDirectory(prefix="dn-bench-eval-") as tmp:
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "dicom_node", "evaluate", "restoration", "--report", tmp]
        subprocess.run([*cmd, "--no-bm3d", "--precision", precision], check=True, capture_output=True)
        elapsed = time.perf_counter() - t0
        now = json.loads((Path(tmp) / "summary.json").read_text())
    print(
        f"{card.name} {card.version}, {precision}: evaluation re-run on its test set (seed 7, 16 slices "
        f"per dose, SIMULATED) in {elapsed:.0f} s, against {stored_path}"
    )
    print(f"  {'dose':10s} {'figure':38s} {'stored':>8s} {'now':>8s} {'change':>8s}  tolerance")
    within: list[bool] = []
    for dose, table in stored["doses"].items():
        for name, path, tolerance in FIGURES:
            before, after = _get(table, path), _get(now["doses"].get(dose, {}), path)
            if before is None or after is None:
                print(f"  {dose:10s} {name:38s} {'–':>8s} {'–':>8s}")
                continue
            change = after - before
            ok = abs(change) <= tolerance + 1e-9
            within.append(ok)
            print(
                f"  {dose:10s} {name:38s} {before:8.4f} {after:8.4f} {change:+8.4f}  "
                f"±{tolerance:g} {'ok' if ok else 'MOVED'}"
            )
    if precision != "float32" and (model.directory / "evaluation.json").exists():
        # the float32 table is the model's reference: how far this precision is from it
        reference = json.loads((model.directory / "evaluation.json").read_text())
        for dose, table in reference["doses"].items():
            before, after = (
                _get(table, ("psnr_db", "model")),
                _get(now["doses"].get(dose, {}), ("psnr_db", "model")),
            )
            if before is not None and after is not None:
                print(f"  {dose:10s} PSNR in {precision} against the float32 table: {after - before:+.2f} dB")
    unchanged = bool(within) and all(within)
    print(
        f"evaluation table of the shipped model: {'unchanged' if unchanged else 'CHANGED'} "
        "(within the tolerances)"
    )
    return 0 if unchanged else 1


if __name__ == "__main__":
    raise SystemExit(main())
