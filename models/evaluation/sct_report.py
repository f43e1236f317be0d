"""The sCT evaluation report: ``results.json`` (all numbers) and a self-contained ``report.html``.

Built from what :func:`models.evaluation.sct_eval.evaluate` returns, with the page machinery of
:mod:`models.evaluation.report` (inline CSS, base64 PNG figures from matplotlib's Agg canvas,
the calibration and hallucination sections). The page header, every figure caption and every
table caption state that the numbers were computed on simulated data.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from models.evaluation.report import (
    _CSS,
    CAPTION_SUFFIX,
    _calibration_section,
    _figure,
    _fmt,
    _hallucination_section,
    _meta_section,
    _new_figure,
    _pm,
    _table,
)
from models.evaluation.results import to_jsonable
from models.evaluation.sct_eval import METHODS, MODEL, TISSUE_GROUPS, SctExample

#: Shown under the page title and stored in ``results.json``.
SCT_SIMULATED_NOTE = (
    "All numbers in this report were computed on simulated data (models.sim.mrct: registered T1w MR / "
    "CT head pairs from the MNI152 template with simulated deformation, bone, sinus, bias field and "
    "noise), not on patient images. The dose proxy is a water-equivalent path length, not a dose "
    "calculation."
)
_REGIONS = ("head", *TISSUE_GROUPS)
_COLORS = {MODEL: "#4c72b0", "bulk density": "#dd8452", "piecewise intensity": "#55a868"}


def _sim_table(header: Sequence[str], rows: Sequence[Sequence[str]], caption: str) -> str:
    """A table whose caption says it is computed on simulated data."""
    table = _table(header, rows)
    text = html.escape(f"{caption.rstrip()} {CAPTION_SUFFIX}")
    return table.replace("<table>", f'<table><caption class="small">{text}</caption>', 1)


def _labelled(section: str) -> str:
    """A section from :mod:`models.evaluation.report`, with the simulated-data line under its title."""
    note = f'<p class="small"><b>{html.escape(CAPTION_SUFFIX)}</b></p>'
    return section.replace("</h2>", "</h2>" + note, 1)


def _acceptance_section(summary: Mapping[str, Any]) -> str:
    rows = []
    targets = summary.get("targets", {})
    passed = summary.get("pass", {})
    for key, label in (
        ("mae_ratio_model_to_bulk_density", "model MAE / bulk-density MAE (head)"),
        ("coverage_90", "coverage of the 90 % interval (head)"),
    ):
        ok = passed.get(key)
        rows.append(
            [
                html.escape(label),
                _fmt(summary.get(key), 3),
                html.escape(str(targets.get(key, "–"))),
                "–" if ok is None else ("pass" if ok else "FAIL"),
            ]
        )
    out = ["<h2>Acceptance</h2>"]
    out.append(_sim_table(["figure", "value", "target", "result"], rows, "Acceptance figures."))
    per_method = []
    for m in METHODS:
        per_method.append(
            [
                html.escape(m),
                _fmt(_g(summary, "mae_head_hu", m), 1),
                _fmt(_g(summary, "bone_mae_hu", m), 1),
                _fmt(_g(summary, "wepl_mean_abs_error_mm", m), 2),
                _fmt(_g(summary, "wepl_mean_abs_error_pct", m), 2),
            ]
        )
    out.append(
        _sim_table(
            ["method", "MAE head (HU)", "MAE bone (HU)", "mean |ΔWEPL| (mm)", "mean |ΔWEPL| (%)"],
            per_method,
            "Headline errors of the three methods on the held-out test cases.",
        )
    )
    return "".join(out)


def _g(d: Mapping[str, Any], *keys: str) -> Any:
    cur: Any = d
    for k in keys:
        if not isinstance(cur, Mapping) or k not in cur:
            return None
        cur = cur[k]
    return cur


def _baseline_section(baselines: Mapping[str, Any]) -> str:
    out = ["<h2>Baselines</h2>"]
    out.append(
        '<p class="small">Fitted on training-role simulated cases (never test cases), see '
        "models.evaluation.sct_baselines. Bulk density: dark (normalised, smoothed T1w &lt; "
        "bone_below) is bone; of the dark voxels, very dark ones (&lt; air_below) and those within "
        "air_edge_mm of the head edge are air (0 turns a rule off); the rest is soft tissue; each "
        "class gets its median "
        "reference HU. Piecewise intensity: median reference HU per intensity bin, linear between "
        "bin centres.</p>"
    )
    bulk = baselines.get("bulk density") or {}
    rows = [[html.escape(k), _fmt(v, 3)] for k, v in bulk.items()]
    out.append(_sim_table(["bulk density parameter", "value"], rows, "Fitted bulk-density parameters."))
    pw = baselines.get("piecewise intensity") or {}
    xs, ys = pw.get("knots_intensity") or [], pw.get("knots_hu") or []
    if xs:
        rows = [[_fmt(x, 3), _fmt(y, 1)] for x, y in zip(xs, ys, strict=True)]
        out.append(
            _sim_table(
                ["knot: normalised T1w intensity", "HU"], rows, "Fitted piecewise-linear intensity map."
            )
        )
    return "".join(out)


def _example_section(ex: SctExample) -> str:
    out = ["<h2>Example slice</h2>"]
    ref = ex.reference
    panels: list[tuple[str, np.ndarray, str, tuple[float, float]]] = [
        ("T1w MR (normalised)", ex.mr, "gray", (0.0, 1.4)),
        ("reference CT (HU)", ref, "gray", (-1000.0, 1600.0)),
        ("model sCT (HU)", ex.sct[MODEL], "gray", (-1000.0, 1600.0)),
        ("model |sCT − ref| (HU)", np.abs(ex.sct[MODEL] - ref), "magma", (0.0, 1000.0)),
        ("model σ (HU)", ex.sigma, "viridis", (0.0, float(max(np.percentile(ex.sigma, 99), 1.0)))),
        ("hallucination map (z)", ex.score, "inferno", (0.0, float(max(np.percentile(ex.score, 99.5), 3.0)))),
    ]
    for m in METHODS[1:]:
        panels.append((f"{m} sCT (HU)", ex.sct[m], "gray", (-1000.0, 1600.0)))
        panels.append((f"{m} |sCT − ref| (HU)", np.abs(ex.sct[m] - ref), "magma", (0.0, 1000.0)))
    ncols = 4
    nrows = math.ceil(len(panels) / ncols)
    fig, _ = _new_figure(13.0, 3.4 * nrows, 0)
    for i, (title, img, cmap, (lo, hi)) in enumerate(panels):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        im = ax.imshow(img, cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
        if i == 1:
            for r, c in ex.targets_rc:
                ax.plot([c], [r], marker="+", color="#e33", ms=10, mew=2)
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    fig.suptitle(f"test case seed {ex.case_seed}, slice {ex.slice_index} (simulated data)")
    out.append(
        _figure(
            fig,
            "Example slice: MR, reference CT (+: WEPL target), the model's sCT, error, σ and hallucination "
            "map, and the two baselines.",
        )
    )
    return "".join(out)


def _intensity_section(inten: Mapping[str, Any], window: Sequence[float]) -> str:
    out = ["<h2>HU accuracy</h2>"]
    out.append(
        '<p class="small">MAE = mean |sCT − reference|, ME = mean (sCT − reference) (positive: too '
        "dense), pooled over the voxels of all test cases in the MR head mask; tissue groups by the "
        "reference labels: bone = cortical + cancellous, soft tissue = fat, skin/muscle, CSF, grey, "
        "white; air = sinus and outside air inside the head mask. Per case: mean ± sd over cases. "
        f"PSNR and SSIM in the {window[0]:g}..{window[1]:g} HU window over the head mask.</p>"
    )
    rows = []
    for m in METHODS:
        r = inten[m]["regions"]
        per = inten[m]["per_case"]
        rows.append(
            [html.escape(m)]
            + [f"{_fmt(r[g]['mae_hu'], 1)} / {_fmt(r[g]['me_hu'], 1)}" for g in _REGIONS]
            + [_pm(per["head mae_hu"], 1), _fmt(inten[m]["psnr_db"], 2), _fmt(inten[m]["ssim"], 4)]
        )
    out.append(
        _sim_table(
            ["method"]
            + [f"{g} MAE / ME (HU)" for g in _REGIONS]
            + ["head MAE per case (HU)", "PSNR (dB)", "SSIM"],
            rows,
            "HU errors per method and tissue, pooled over the test cases.",
        )
    )
    fig, (ax,) = _new_figure(8.0, 4.0)
    x = np.arange(len(_REGIONS))
    width = 0.8 / len(METHODS)
    for i, m in enumerate(METHODS):
        vals = [inten[m]["regions"][g]["mae_hu"] for g in _REGIONS]
        vals = [np.nan if v is None else float(v) for v in vals]
        ax.bar(x + (i - (len(METHODS) - 1) / 2) * width, vals, width, label=m, color=_COLORS.get(m))
    ax.set_xticks(x, list(_REGIONS))
    ax.set_ylabel("MAE (HU)")
    ax.set_title("MAE per tissue (simulated data)")
    ax.legend(fontsize=8)
    out.append(_figure(fig, "Mean absolute HU error per tissue group for the model and both baselines."))
    seeds = inten[METHODS[0]]["per_case"].get("seed", [])
    case_rows = []
    for j, seed in enumerate(seeds):
        row = [str(seed)]
        for m in METHODS:
            per = inten[m]["per_case"]
            row.append(
                f"{_fmt(per['head mae_hu'][j], 1)} / {_fmt(per['bone mae_hu'][j], 1)} / "
                f"{_fmt(per['psnr_db'][j], 1)}"
            )
        case_rows.append(row)
    if case_rows:
        out.append(
            _sim_table(
                ["case seed"] + [f"{m}: MAE head / bone (HU) / PSNR (dB)" for m in METHODS],
                case_rows,
                "Per-case errors.",
            )
        )
    return "".join(out)


def _wepl_section(wepl: Mapping[str, Any]) -> str:
    out = ["<h2>Dose proxy: water-equivalent path length</h2>"]
    curve = wepl.get("hu_to_rsp") or []
    out.append(
        f'<p class="small">WEPL from the image edge to {wepl.get("n_targets", 0)} targets '
        f"({html.escape(str(wepl.get('targets', '')))}) along {len(wepl.get('angles_deg', []))} in-plane "
        "beam directions (IEC gantry angles, head first supine), "
        f"{wepl.get('n_rays', 0)} rays in all; midpoint rule, {wepl.get('step_mm', '–')} mm steps on "
        "bilinearly interpolated relative stopping power. HU → RSP: "
        f"{html.escape(str(wepl.get('hu_to_rsp_source', '')))}; points (HU, RSP) "
        + html.escape(", ".join(f"({h:g}, {r:g})" for h, r in curve))
        + f". Mean reference WEPL {_fmt(wepl.get('reference_wepl_mm_mean'), 1)} mm.</p>"
    )
    methods = wepl.get("methods") or {}
    rows = [
        [
            html.escape(m),
            _fmt(w["mean_abs_error_mm"], 2),
            _fmt(w["mean_abs_error_pct"], 2),
            _fmt(w["mean_error_mm"], 2),
            _fmt(w["max_abs_error_mm"], 2),
            _pm(w["per_case_mean_abs_error_mm"], 2),
        ]
        for m, w in methods.items()
    ]
    out.append(
        _sim_table(
            [
                "method",
                "mean |ΔWEPL| (mm)",
                "mean |ΔWEPL| (% of ref)",
                "mean ΔWEPL (mm)",
                "max |ΔWEPL| (mm)",
                "per case mean |ΔWEPL| (mm)",
            ],
            rows,
            "WEPL error of each sCT against the reference CT (ΔWEPL = sCT − reference).",
        )
    )
    if methods:
        angles = wepl.get("angles_deg", [])
        fig, (ax1, ax2) = _new_figure(11.0, 4.0, 2)
        for m, w in methods.items():
            ax1.plot(angles, w["per_angle_mean_abs_error_mm"], marker="o", label=m, color=_COLORS.get(m))
            ax2.plot(angles, w["per_angle_mean_error_mm"], marker="o", label=m, color=_COLORS.get(m))
        for ax, label in ((ax1, "mean |ΔWEPL| (mm)"), (ax2, "mean ΔWEPL (mm)")):
            ax.set_xticks(angles)
            ax.set_xlabel("gantry angle (°)")
            ax.set_ylabel(label)
            ax.set_title(f"{label} per beam angle (simulated data)", fontsize=10)
        ax2.axhline(0, color="#888", lw=0.8)
        ax1.legend(fontsize=8)
        out.append(_figure(fig, "WEPL error per beam angle, averaged over targets."))
    return "".join(out)


def _calibration_detail_section(detail: Mapping[str, Any]) -> str:
    per = detail.get("per_tissue") or {}
    rows = [
        [html.escape(k), _fmt(v.get("coverage"), 3), _fmt(v.get("mean_width_hu"), 1), str(v.get("n", "–"))]
        for k, v in per.items()
    ]
    out = [
        _sim_table(
            ["region", "coverage of the 90 % interval", "mean width (HU)", "voxels"],
            rows,
            "Coverage of the model's sCT ± 1.645 σ per tissue group.",
        )
    ]
    cov = detail.get("per_case_coverage") or []
    width = detail.get("per_case_width_hu") or []
    rows = [[str(i), _fmt(c, 3), _fmt(w, 1)] for i, (c, w) in enumerate(zip(cov, width, strict=True))]
    out.append(
        _sim_table(["test case", "coverage (90 %)", "mean width (HU)"], rows, "Coverage per test case.")
    )
    return "".join(out)


def _timings_section(timings: Mapping[str, Any]) -> str:
    rows = [[html.escape(k), _fmt(v, 3)] for k, v in timings.items()]
    return "<h2>Timings</h2>" + _sim_table(["stage", "seconds"], rows, "Wall-clock times of this run.")


def write_sct_report(
    results: Mapping[str, Any], out_dir: Path, title: str, example: SctExample | None = None
) -> Path:
    """Write ``results.json`` and a self-contained ``report.html`` into ``out_dir``.

    Parameters
    ----------
    results : mapping
        From :func:`models.evaluation.sct_eval.evaluate`, with the acceptance summary under
        ``"summary"``. Sections: ``meta``, ``baselines``, ``intensity``, ``wepl``,
        ``calibration``, ``calibration_detail``, ``hallucination``, ``timings``.
    out_dir : pathlib.Path
        Directory (created if needed).
    title : str
        Page title.
    example : SctExample, optional
        One slice for the example figure.

    Returns
    -------
    pathlib.Path
        Path of ``report.html``. ``results.json`` holds ``title``, ``note`` (the simulated-data
        statement), ``simulated_data`` (true), ``generated`` and ``results`` (non-finite numbers as
        ``null``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    payload = {
        "title": title,
        "note": SCT_SIMULATED_NOTE,
        "simulated_data": True,
        "generated": stamp,
        "results": to_jsonable(dict(results)),
    }
    (out / "results.json").write_text(json.dumps(payload, indent=1, allow_nan=False) + "\n")
    body = []
    if results.get("summary"):
        body.append(_acceptance_section(results["summary"]))
    if results.get("meta"):
        body.append(_labelled(_meta_section(results["meta"])))
    if results.get("baselines"):
        body.append(_baseline_section(results["baselines"]))
    if example is not None:
        body.append(_example_section(example))
    if results.get("intensity"):
        window = _g(results, "meta", "hu_window_psnr_ssim") or [-1000, 2000]
        body.append(_intensity_section(results["intensity"], window))
    if results.get("wepl"):
        body.append(_wepl_section(results["wepl"]))
    if results.get("calibration"):
        body.append(_labelled(_calibration_section(results["calibration"])))
        if results.get("calibration_detail"):
            body.append(_calibration_detail_section(results["calibration_detail"]))
    if results.get("hallucination"):
        section = _hallucination_section(results["hallucination"])
        body.append(
            _labelled(section)
            + '<p class="small">Inserted: bone-like (+600 HU) and air-like (−800 HU) discs of radius 3–5 px '
            "in the brain of the model's sCT; controls are unaltered brain discs of the same shapes. "
            "Removed: discs of radius 4 px in the skull whose sCT bone was set to 40 HU; controls are "
            "unaltered skull discs. The map is recomputed from the original MR and σ.</p>"
        )
    elif "hallucination" in results:
        body.append(
            "<h2>Hallucination detection</h2><p class='small'>No test could be run (no region to alter). "
            + html.escape(CAPTION_SUFFIX)
            + "</p>"
        )
    if results.get("timings"):
        body.append(_timings_section(results["timings"]))
    page = (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)} (simulated data)</title><style>{_CSS}"
        "caption{caption-side:top;text-align:left;padding:.2em 0}</style></head><body>"
        f"<header><h1>{html.escape(title)}</h1>"
        f'<p class="banner">{html.escape(SCT_SIMULATED_NOTE)}</p>'
        f'<p class="small">Generated {stamp}. All numbers are also in results.json.</p></header>'
        + "".join(body)
        + "</body></html>\n"
    )
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
