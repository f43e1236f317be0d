"""The evaluation report: ``report.json`` (all numbers) and a self-contained ``report.html``.

The HTML has inline CSS and PNG figures embedded as base64 (matplotlib's Agg canvas, no pyplot
state), so it can be mailed or archived as one file. It is built from the nested ``results`` dict
described in :mod:`models.evaluation.results` (:class:`~models.evaluation.results.EvaluationResults`);
every section is optional and is shown only when present. The page header and every figure
caption state that the numbers were computed on simulated data; feature-space numbers carry the
:data:`~models.evaluation.features.SIM_ENCODER_LABEL` label and
:data:`~models.evaluation.features.FEATURE_NOTE`.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from models.evaluation.features import FEATURE_NOTE, SIM_ENCODER_LABEL
from models.evaluation.results import EvaluationResults, RestorationExample, to_jsonable

#: Shown under the page title.
SIMULATED_NOTE = (
    "All numbers in this report were computed on simulated data (the models.sim low-dose CT "
    "simulator: synthetic anatomy, projection-domain noise), not on patient images."
)
#: Appended to every figure caption.
CAPTION_SUFFIX = "Computed on simulated data."

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2em auto;max-width:1100px;
color:#222;line-height:1.45;padding:0 1em}
h1{margin-bottom:.2em}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em}
.banner{background:#fff4d6;border:1px solid #e8c66a;padding:.6em 1em;border-radius:4px;font-weight:600}
table{border-collapse:collapse;margin:1em 0;font-size:.92em}
th,td{border:1px solid #ccc;padding:.3em .7em;text-align:right}
th{background:#f2f2f2}td:first-child,th:first-child{text-align:left}
figure{margin:1.2em 0}figure img{max-width:100%;border:1px solid #eee}
figcaption{font-size:.88em;color:#444;margin-top:.3em}
.meta td{text-align:left}.small{font-size:.85em;color:#555}
"""


# -- helpers --------------------------------------------------------------------------------------
def _finite(values: Iterable[Any]) -> np.ndarray:
    arr = np.asarray([np.nan if v is None else float(v) for v in values], dtype=np.float64)
    return arr[np.isfinite(arr)]


def mean_sd(values: Iterable[Any]) -> tuple[float, float, int]:
    """Mean and sample standard deviation of the finite values.

    Parameters
    ----------
    values : iterable
        Numbers (``None``, NaN and infinities are skipped).

    Returns
    -------
    tuple
        ``(mean, sd, n)``; NaN when empty (sd NaN when ``n < 2``).
    """
    a = _finite(values)
    if a.size == 0:
        return float("nan"), float("nan"), 0
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else float("nan"), int(a.size)


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    try:
        f = float(value)
    except (TypeError, ValueError):
        return html.escape(str(value))
    if math.isnan(f):
        return "–"
    if math.isinf(f):
        return "∞" if f > 0 else "−∞"
    return f"{f:.{digits}g}" if abs(f) >= 1e4 or (f != 0 and abs(f) < 1e-3) else f"{f:.{digits}f}"


def _pm(values: Iterable[Any], digits: int = 3) -> str:
    vals = list(values)
    m, s, n = mean_sd(vals)
    if n == 0:
        infinite = [v for v in vals if v is not None and math.isinf(float(v))]
        return _fmt(infinite[0]) if infinite else "–"
    return _fmt(m, digits) if n < 2 else f"{_fmt(m, digits)} ± {_fmt(s, digits)}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    attr = f' class="{cls}"' if cls else ""
    return f"<table{attr}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _png(fig: Figure) -> str:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(fig: Figure, caption: str) -> str:
    text = html.escape(f"{caption.rstrip()} {CAPTION_SUFFIX}")
    return (
        f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{_png(fig)}">'
        f"<figcaption>{text}</figcaption></figure>"
    )


def _new_figure(width: float = 7.0, height: float = 4.0, ncols: int = 1) -> tuple[Figure, list[Any]]:
    fig = Figure(figsize=(width, height))
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def _get(d: Mapping[str, Any], *keys: str, default: Any = None) -> Any:
    cur: Any = d
    for k in keys:
        if not isinstance(cur, Mapping) or k not in cur:
            return default
        cur = cur[k]
    return cur


# -- sections -------------------------------------------------------------------------------------
def _meta_section(meta: Mapping[str, Any]) -> str:
    rows = [
        [html.escape(str(k)), html.escape(json.dumps(to_jsonable(v)) if not isinstance(v, str) else v)]
        for k, v in meta.items()
    ]
    return "<h2>Data</h2>" + _table(["item", "value"], rows, "meta") if rows else ""


def _pixel_section(pixel: Mapping[str, Any]) -> str:
    methods = list(pixel)
    rows = []
    for name in methods:
        per = pixel[name].get("per_slice", {})
        scales = pixel[name].get("ms_ssim_scales", [])
        rows.append(
            [
                html.escape(name),
                _pm(per.get("rmse_hu", [pixel[name].get("rmse_hu")]), 2),
                _pm(per.get("psnr_db", [pixel[name].get("psnr_db")]), 2),
                _pm(per.get("ssim", [pixel[name].get("ssim")]), 4),
                _pm(per.get("ms_ssim", [pixel[name].get("ms_ssim")]), 4),
                str(pixel[name].get("n_slices", len(per.get("rmse_hu", [])))),
                html.escape(",".join(sorted({str(s) for s in scales})) or "–"),
            ]
        )
    first = pixel[methods[0]] if methods else {}
    window = first.get("window", [-1000, 1000])
    out = ["<h2>Pixel fidelity</h2>"]
    out.append(
        f'<p class="small">Mean ± sd over slices. Images clipped to the window '
        f"{window[0]:g}..{window[1]:g} HU (data range = window width). RMSE and PSNR over the mask; "
        "SSIM (Gaussian 11×11, σ 1.5) averaged over "
        f"the {html.escape(str(first.get('ssim_region', 'mask')))}; "
        "MS-SSIM (MONAI algorithm, in float64) on the "
        f"{html.escape(str(first.get('ms_ssim_region', 'mask bounding box')))}, with fewer scales for small "
        "images (column “scales”).</p>"
    )
    out.append(_table(["method", "RMSE (HU)", "PSNR (dB)", "SSIM", "MS-SSIM", "slices", "scales"], rows))
    fig, (ax1, ax2) = _new_figure(10.0, 3.8, 2)
    x = np.arange(len(methods))
    for ax, key, label in ((ax1, "psnr_db", "PSNR (dB)"), (ax2, "ssim", "SSIM")):
        stats = [mean_sd(pixel[m].get("per_slice", {}).get(key, [pixel[m].get(key)])) for m in methods]
        means = [s[0] for s in stats]
        sds = [0.0 if not math.isfinite(s[1]) else s[1] for s in stats]
        ax.bar(x, means, yerr=sds, color="#4c72b0", capsize=3)
        ax.set_xticks(x, methods, rotation=25, ha="right")
        ax.set_ylabel(label)
        lows = [m - s for m, s in zip(means, sds, strict=True) if math.isfinite(m)]
        highs = [m + s for m, s in zip(means, sds, strict=True) if math.isfinite(m)]
        if lows and key == "ssim":
            ax.set_ylim(max(0.0, min(lows) - 0.03), 1.0)
        elif lows:
            ax.set_ylim(min(lows) - 2.0, max(highs) + 1.0)
        ax.set_title(f"{label} per method (simulated data)")
    out.append(_figure(fig, "PSNR and SSIM per method, mean ± sd over slices."))
    return "".join(out)


def _calibration_section(cal: Mapping[str, Any]) -> str:
    out = ["<h2>Uncertainty calibration</h2>"]
    rows = []
    for name, c in cal.items():
        rows.append(
            [
                html.escape(name),
                _fmt(c.get("nominal_coverage"), 3),
                _fmt(c.get("coverage"), 3),
                _pm(c.get("per_slice_coverage", []), 3),
                _fmt(c.get("mean_width_hu"), 1),
                _fmt(_get(c, "sparsification", "ause"), 3),
                _fmt(c.get("conformal_scale"), 3),
            ]
        )
    out.append(
        '<p class="small">Coverage of mean ± z·σ against the reference inside the mask, pooled and per slice '
        "(mean ± sd); width = mean of 2zσ; AUSE = area between the sparsification curve (remove largest σ "
        "first) and the oracle (remove largest error first), RMSE normalised to 1 at 0 % removed.</p>"
    )
    out.append(
        _table(
            ["method", "nominal", "coverage", "per slice", "mean width (HU)", "AUSE", "conformal scale"], rows
        )
    )
    fig, (ax,) = _new_figure(5.2, 5.0)
    ax.plot([0, 1], [0, 1], color="#888", lw=1, ls="--", label="ideal")
    for name, c in cal.items():
        rel = c.get("reliability") or {}
        if rel.get("nominal"):
            ax.plot(rel["nominal"], rel["observed"], marker="o", ms=3, label=name)
    ax.set_xlabel("nominal coverage of mean ± zσ")
    ax.set_ylabel("observed coverage")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title("Reliability (simulated data)")
    ax.legend(fontsize=8)
    out.append(_figure(fig, "Calibration reliability: nominal vs observed coverage for several z."))
    fig, (ax,) = _new_figure(6.5, 4.2)
    for i, (name, c) in enumerate(cal.items()):
        sp = c.get("sparsification") or {}
        if not sp.get("fraction"):
            continue
        color = f"C{i % 10}"
        ax.plot(sp["fraction"], sp["model"], color=color, label=f"{name} (AUSE {_fmt(sp.get('ause'), 3)})")
        ax.plot(sp["fraction"], sp["oracle"], color=color, ls=":", lw=1)
    ax.set_xlabel("fraction of pixels removed")
    ax.set_ylabel("RMSE of remaining / RMSE of all")
    ax.set_title("Sparsification (dotted: oracle; simulated data)")
    ax.legend(fontsize=8)
    out.append(_figure(fig, "Sparsification curves: removing the largest predicted σ first vs the oracle."))
    return "".join(out)


def _hallucination_section(hal: Mapping[str, Any]) -> str:
    out = ["<h2>Hallucination detection</h2>"]
    out.append(
        '<p class="small">Positives: regions altered in the output (inserted blobs, removed real '
        "structures); negatives: unaltered regions of the same shape; region score = max (or mean) of "
        "the hallucination map (protocol: models.evaluation.hallucination).</p>"
    )
    rows = [
        [
            html.escape(name),
            _fmt(h.get("auroc"), 3),
            str(h.get("n_positive", "–")),
            str(h.get("n_negative", "–")),
            html.escape(str(h.get("reduce", "max"))),
        ]
        for name, h in hal.items()
    ]
    out.append(_table(["test", "AUROC", "positives", "negatives", "region score"], rows))
    fig, (ax,) = _new_figure(5.2, 5.0)
    ax.plot([0, 1], [0, 1], color="#888", lw=1, ls="--")
    for name, h in hal.items():
        if h.get("fpr"):
            ax.plot(
                h["fpr"], h["tpr"], drawstyle="steps-post", label=f"{name} (AUROC {_fmt(h.get('auroc'), 3)})"
            )
    ax.set_xlabel("false-positive rate (control regions)")
    ax.set_ylabel("true-positive rate (altered regions)")
    ax.set_title("Hallucination map ROC (simulated data)")
    ax.legend(fontsize=7)
    out.append(_figure(fig, "ROC curves of the hallucination map: altered vs unaltered regions."))
    return "".join(out)


def _lesion_section(les: Mapping[str, Any]) -> str:
    out = ["<h2>Low-contrast detail</h2>"]
    out.append(
        '<p class="small">Contrast = mean(lesion core) − mean(ring) (models.sim.ldct.lesion_contrast); '
        "ratio = measured / expected full-dose contrast; mean ratio is Σ sign-aligned measured / "
        "Σ |expected|. d′: non-prewhitening matched filter, signal known exactly, controls at "
        "lesion-free locations.</p>"
    )
    rows = []
    for name, r in les.items():
        ratios = _finite(r.get("ratio", []))
        rows.append(
            [
                html.escape(name),
                _fmt(r.get("mean_ratio"), 3),
                _fmt(float(np.median(ratios)) if ratios.size else None, 3),
                _fmt(r.get("dprime"), 3),
                str(r.get("n_signal", len(r.get("ratio", [])))),
                str(r.get("n_noise", "–")),
            ]
        )
    out.append(_table(["method", "mean ratio", "median ratio", "NPW d′", "lesions", "controls"], rows))
    fig, (ax,) = _new_figure(5.4, 5.0)
    lim = 1.0
    for name, r in les.items():
        ref = np.asarray([np.nan if v is None else v for v in r.get("reference_contrast_hu", [])], float)
        meas = np.asarray([np.nan if v is None else v for v in r.get("measured_contrast_hu", [])], float)
        if ref.size:
            ax.scatter(ref, meas, s=14, alpha=0.75, label=name)
            both = np.concatenate([np.abs(ref[np.isfinite(ref)]), np.abs(meas[np.isfinite(meas)]), [lim]])
            lim = max(lim, float(both.max()))
    ax.plot([-lim, lim], [-lim, lim], color="#888", lw=1, ls="--")
    ax.axhline(0, color="#ccc", lw=0.8)
    ax.set_xlabel("expected contrast (full-dose, HU)")
    ax.set_ylabel("measured contrast (HU)")
    ax.set_title("Lesion contrast (simulated data)")
    ax.legend(fontsize=8)
    out.append(_figure(fig, "Measured vs expected lesion contrast per method (dashed: identity)."))
    return "".join(out)


def _feature_section(feat: Mapping[str, Any]) -> str:
    label = SIM_ENCODER_LABEL
    out = [f"<h2>Feature-space distances ({html.escape(label)})</h2>"]
    out.append(f'<p class="small">{html.escape(FEATURE_NOTE)}</p>')
    rows = []
    for name, f in feat.items():
        enc = str(f.get("encoder", label))
        rows.append(
            [
                html.escape(name),
                html.escape(enc),
                _fmt(f.get("fid"), 4),
                f"{_fmt(f.get('kid'), 3)} ± {_fmt(f.get('kid_std'), 2)}",
                _fmt(f.get("mmd"), 3),
                f"{f.get('n_x', '–')} / {f.get('n_y', '–')}",
            ]
        )
    out.append(
        _table(
            [
                "method vs reference",
                "encoder",
                f"FID ({label})",
                f"KID ({label})",
                f"MMD² RBF ({label})",
                "n",
            ],
            rows,
        )
    )
    names = list(feat)
    fig, (ax1, ax2) = _new_figure(10.0, 3.8, 2)
    x = np.arange(len(names))
    for ax, key, title in ((ax1, "fid", f"FID ({label})"), (ax2, "mmd", f"MMD² RBF ({label})")):
        vals = [np.nan if feat[n].get(key) is None else float(feat[n][key]) for n in names]
        ax.bar(x, vals, color="#55a868")
        ax.set_xticks(x, names, rotation=25, ha="right")
        ax.set_title(f"{title}, simulated data")
    out.append(_figure(fig, f"Feature distances to the reference in {label} space. {FEATURE_NOTE}"))
    return "".join(out)


def _nps_section(nps: Mapping[str, Any]) -> str:
    out = ["<h2>Noise power spectrum</h2>"]
    fig, (ax,) = _new_figure(6.5, 4.2)
    for name, n in nps.items():
        f = n.get("frequency_per_mm") or []
        p = n.get("nps_hu2_mm2") or []
        if f:
            ax.plot(f, p, label=name)
    ax.set_xlabel("spatial frequency (1/mm)")
    ax.set_ylabel("NPS (HU² mm²)")
    ax.set_yscale("log")
    ax.set_title("Radially averaged NPS (simulated data)")
    ax.legend(fontsize=8)
    out.append(_figure(fig, "Noise power spectra of the residual noise per method."))
    return "".join(out)


def _example_section(ex: RestorationExample) -> str:
    """Image panels of one SIMULATED test slice: input, restored, reference, error, σ and the
    hallucination map, same slice and same view."""
    out = [
        "<h2>Example slice</h2>",
        f'<p class="small"><b>SIMULATED data. {html.escape(CAPTION_SUFFIX)}</b></p>',
    ]
    window = (-160.0, 240.0)  # soft tissue (W 400, L 40): where the noise shows
    sigma_top = float(max(np.percentile(ex.sigma, 99), 1.0))
    panels: list[tuple[str, np.ndarray, str, tuple[float, float]]] = [
        ("low-dose input (HU, W400 L40)", ex.low, "gray", window),
        ("model restored (HU, W400 L40)", ex.restored, "gray", window),
        ("full-dose reference (HU, W400 L40)", ex.reference, "gray", window),
        ("|restored − reference| (HU)", np.abs(ex.restored - ex.reference), "magma", (0.0, 2.0 * sigma_top)),
        ("model σ, calibrated (HU)", ex.sigma, "viridis", (0.0, sigma_top)),
        ("hallucination map (z)", ex.score, "inferno", (0.0, float(max(np.percentile(ex.score, 99.5), 3.0)))),
    ]
    ncols = 3
    nrows = math.ceil(len(panels) / ncols)
    fig, _ = _new_figure(12.0, 4.0 * nrows, 0)
    for i, (title, img, cmap, (lo, hi)) in enumerate(panels):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        im = ax.imshow(img, cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
        ax.set_title(f"{title} — SIMULATED", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    fig.suptitle(
        f"SIMULATED {ex.anatomy} test slice {ex.slice_index} (case seed {ex.case_seed}), dose {ex.dose:g}"
    )
    out.append(
        _figure(
            fig,
            "Example slice (SIMULATED): the low-dose input, the model's restored image, the full-dose "
            "reference, the error, the calibrated σ and the hallucination map, all of the same slice.",
        )
    )
    return "".join(out)


_SECTIONS: list[tuple[str, Callable[[Mapping[str, Any]], str]]] = [
    ("meta", _meta_section),
    ("pixel", _pixel_section),
    ("calibration", _calibration_section),
    ("hallucination", _hallucination_section),
    ("lesions", _lesion_section),
    ("features", _feature_section),
    ("nps", _nps_section),
]


def write_report(
    results: EvaluationResults | Mapping[str, Any],
    out_dir: Path,
    title: str,
    example: RestorationExample | None = None,
) -> Path:
    """Write ``report.json`` and a self-contained ``report.html`` into ``out_dir``.

    Parameters
    ----------
    results : EvaluationResults
        Nested dict with the optional sections ``meta``, ``pixel``, ``calibration``,
        ``hallucination``, ``lesions``, ``features`` and ``nps`` (see
        :mod:`models.evaluation.results`; each per-method entry is what the corresponding
        ``models.evaluation`` function returns).
    out_dir : pathlib.Path
        Directory (created if needed).
    title : str
        Page title.
    example : RestorationExample, optional
        One test slice for the image panels (input, restored, reference, σ, hallucination
        map); not written to ``report.json``.

    Returns
    -------
    pathlib.Path
        Path of ``report.html``. ``report.json`` next to it holds ``title``, ``note`` (the
        simulated-data statement), ``feature_encoder`` and ``results`` (all numbers; non-finite
        values as ``null``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data: Mapping[str, Any] = dict(results)
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    payload = {
        "title": title,
        "note": SIMULATED_NOTE,
        "simulated_data": True,
        "feature_encoder": SIM_ENCODER_LABEL,
        "feature_note": FEATURE_NOTE,
        "generated": stamp,
        "results": to_jsonable(data),
    }
    (out / "report.json").write_text(json.dumps(payload, indent=1, allow_nan=False) + "\n")
    body = []
    for key, render in _SECTIONS:
        section = data.get(key)
        if section:
            body.append(render(section))
        if key == "meta" and example is not None:
            body.append(_example_section(example))
    unknown = [k for k in data if k not in dict(_SECTIONS)]
    if unknown:
        body.append(
            '<p class="small">Further result sections in report.json: '
            + html.escape(", ".join(unknown))
            + "</p>"
        )
    page = (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)} (simulated data)</title><style>{_CSS}</style></head><body>"
        f"<header><h1>{html.escape(title)}</h1>"
        f'<p class="banner">{html.escape(SIMULATED_NOTE)}</p>'
        f'<p class="small">Generated {stamp}. All numbers are also in report.json.</p></header>'
        + "".join(body)
        + "</body></html>\n"
    )
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
