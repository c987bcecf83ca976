"""``qsilk compare`` output: grid.png, diff.png, stats.png, steps.png, compare.json and a self-contained
index.html (relative links, no scripts, no external assets)."""

from __future__ import annotations

import html
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qsilk.files import atomic_write_text

from . import render
from .runs import ImageResult, Settings, slugify, to_json

# The measured FID/KID cells of the demo model (a copy of docs/results/demo-fid.json; a test keeps them equal).
DEMO_FID_RESULTS = Path(__file__).resolve().parents[1] / "assets" / "results" / "demo-fid.json"


@dataclass(frozen=True)
class Column:
    """One column of the comparison: what the page calls it, its sub-folder of images/, its QSilk config, and
    whether the attached QRM (``--qrm``) is on for its images."""

    label: str
    folder: str
    config: dict[str, Any] | None
    qrm: bool = False


def make_columns(named: list[tuple]) -> list[Column]:
    """Columns from (label, config) or (label, config, qrm) tuples; folders are slugs of the labels, made unique. The first two columns
    keep the folders ``plain`` and ``qsilk`` whatever their labels say."""
    columns: list[Column] = []
    taken: set[str] = set()
    for i, (label, config, *qrm) in enumerate(named):
        base = ("plain", "qsilk")[i] if i < 2 else slugify(label)
        folder, n = base, 2
        while folder in taken:
            folder, n = f"{base}-{n}", n + 1
        taken.add(folder)
        columns.append(Column(label, folder, config, bool(qrm and qrm[0])))
    return columns


def _row_label(condition, seed: int) -> str:
    return f"{condition.label} / seed {seed}"


def _mean_confidence(maps: dict[str, np.ndarray] | None) -> np.ndarray | None:
    """Mean confidence over the steps that had a map (the map QSilk used, shown beside the image)."""
    if not maps or "confidence" not in maps:
        return None
    conf = maps["confidence"]
    valid = np.isfinite(conf).all(axis=(1, 2))
    return conf[valid].mean(axis=0) if valid.any() else None


def _curves(results: list[ImageResult]) -> dict[str, list[float]]:
    """Mean over images of the per-step statistics."""
    by_step: dict[int, dict[str, list[float]]] = {}
    for result in results:
        for i, s in enumerate(result.stats):
            slot = by_step.setdefault(int(s.get("step", i)), {"touched": [], "before": [], "after": []})
            for key, name in (("touched", "touched_fraction"), ("before", "max_abs_before"), ("after", "max_abs_after")):
                value = s.get(name)
                if isinstance(value, int | float) and math.isfinite(value):
                    slot[key].append(float(value))
    steps = sorted(by_step)

    def mean(values: list[float]) -> float:
        return sum(values) / len(values) if values else float("nan")

    return {
        "step": steps,
        "touched": [mean(by_step[s]["touched"]) for s in steps],
        "before": [mean(by_step[s]["before"]) for s in steps],
        "after": [mean(by_step[s]["after"]) for s in steps],
    }


def confidence_used(items: list[ImageResult], configured: str | None) -> str | None:
    """The confidence source the column really used: the configured one, or e.g. "attention -> structure
    (fallback on 75 % of steps: <reason>)" when the per-step stats (``confidence_source``, e.g.
    "structure (fallback: <reason>)") say the attention probe gave no map for some or all steps."""
    counts: dict[str, int] = {}
    for r in items:
        for source, n in ((r.record.get("stats") or {}).get("confidence_sources") or {}).items():
            counts[source] = counts.get(source, 0) + int(n)
    if configured is None or not counts or set(counts) == {configured}:
        return configured
    others = [k for k in counts if k != configured]
    bases = sorted({k.split(" (", 1)[0] for k in others})
    reasons = sorted({k.split("(fallback: ", 1)[1].rstrip(")") for k in others if "(fallback: " in k})
    share = 100 * sum(counts[k] for k in others) / sum(counts.values())
    why = f": {reasons[0]}" if reasons else ""
    return f"{configured} -> {'/'.join(bases)} (fallback on {share:.0f} % of steps{why})"


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


def write_report(
    results: list[ImageResult],
    columns: list[Column],
    rows: list[tuple[Any, int]],
    settings: Settings,
    versions: dict[str, str],
    out: Path,
    sample: int = 0,
) -> Path:
    """Write every comparison artefact into ``out``; returns the path of index.html."""
    out = Path(out)
    table: dict[tuple[str, int], ImageResult] = {}
    row_index = {(c, s): i for i, (c, s) in enumerate(rows)}
    by_folder = {col.folder: col.label for col in columns}
    for result in results:
        label = by_folder[result.job.folder.split("/", 1)[-1]]
        table[(label, row_index[(result.job.condition, result.job.seed)])] = result
    labels = [col.label for col in columns]
    sources = {
        col.label: confidence_used([table[(col.label, i)] for i in range(len(rows))], (col.config or {}).get("confidence"))
        for col in columns
    }
    row_labels = [_row_label(c, s) for c, s in rows]
    first = table[(labels[0], 0)].image
    scale = render.display_scale(*first.shape[:2])
    height, width = first.shape[0] * scale, first.shape[1] * scale

    # Grid: one column per config; a config whose confidence maps exist gets a column of them beside it.
    grid_cols: list[str] = []
    cells: list[list[np.ndarray | None]] = [[] for _ in rows]
    has_confidence = False
    for label in labels:
        confs = [_mean_confidence(table[(label, i)].maps) for i in range(len(rows))]
        grid_cols.append(label)
        for i in range(len(rows)):
            cells[i].append(render.upscale(table[(label, i)].image, scale))
        if any(c is not None for c in confs):
            has_confidence = True
            grid_cols.append(f"{label}: {sources[label] or 'uniform'} confidence")
            for i, conf in enumerate(confs):
                tile = None if conf is None else render.resize_nearest(render.colorize(conf), height, width)
                cells[i].append(tile)
    grid = render.labelled_grid(cells, row_labels, grid_cols)
    if has_confidence:
        legend = render.colorbar_image(
            "AQClip confidence (mean over steps): 0 = corridor k_min (narrowest), 1 = k_max (widest)", "viridis", 0, 1
        )
        grid = render.stack_below(grid, legend)
    render.save_png(out / "grid.png", grid)

    # Difference heat maps against the plain sampler, each config on its own (stated) colour scale.
    compared = labels[1:]
    diffs = [
        [
            np.abs(table[(label, i)].image.astype(np.float32) - table[(labels[0], i)].image.astype(np.float32)).mean(-1)
            for label in compared
        ]
        for i in range(len(rows))
    ]
    diff_max = render.difference_figure(diffs, row_labels, compared, out / "diff.png") if compared else []

    # Per-step statistics and maps.
    curves = {label: _curves([table[(label, i)] for i in range(len(rows))]) for label in labels}
    render.stats_figure(curves, out / "stats.png")
    panels, steps = [], None
    for label in compared:
        maps = table[(label, sample)].maps or {}
        if "steps" in maps:
            steps = [int(s) for s in maps["steps"]]
        for kind in ("confidence", "delta"):
            if kind in maps and np.isfinite(maps[kind]).any():
                name = f"{sources[label]} confidence" if kind == "confidence" and sources[label] else kind
                panels.append((f"{label}\n{name}", maps[kind], kind))
    if panels and steps:
        render.step_maps_figure(
            panels, steps, out / "steps.png", f"per-step maps, {row_labels[sample]} (delta = mean |x0' - x0|)"
        )

    summary = _summary(table, columns, rows, row_labels, settings, versions, diff_max, sample, out, sources)
    atomic_write_text(out / "compare.json", to_json(summary, indent=2, sort_keys=True) + "\n")
    page = out / "index.html"
    atomic_write_text(page, _html(summary, has_steps=bool(panels and steps), has_diff=bool(compared)))
    return page


def measured_fid_sentence(results_path: Path = DEMO_FID_RESULTS) -> str | None:
    """One sentence with the demo model's measured FID without QSilk, with the defaults and with the strong
    preset (the cell where all three were measured), from the shipped results file; None if it has no such cell."""
    try:
        results = json.loads(Path(results_path).read_text())
    except (OSError, ValueError):
        return None
    cells: dict[tuple, dict[str, dict]] = {}
    for r in results.values():
        if r.get("steps") is None:
            continue
        tag = {"off": "off", "default": "default", "qsilk-strong": "strong", "strong": "strong"}.get(r["qsilk"])
        if tag is not None:
            cells.setdefault((r["steps"], r["cfg"], r.get("scheduler"), r["n"]), {})[tag] = r
    complete = [(k, v) for k, v in cells.items() if {"off", "default", "strong"} <= set(v)]
    if not complete:
        return None
    (steps, cfg, scheduler, n), cell = max(complete, key=lambda kv: kv[0][3])
    off, default, strong = cell["off"], cell["default"], cell["strong"]

    def verdict(r: dict) -> str:
        within = abs(r["kid"] - off["kid"]) <= max(r["kid_std"], off["kid_std"])
        return "within the KID spread between subsets" if within else "beyond the KID spread between subsets"

    return (
        f"Measured on this model (FID against 10,000 test images, {n:,} samples per cell, {scheduler}, "
        f"{steps} steps, CFG {cfg:g}; docs/results/demo-fid.json): FID {off['fid']:.2f} without QSilk, "
        f"{default['fid']:.2f} with the defaults ({default['fid'] - off['fid']:+.2f}, {verdict(default)}) and "
        f"{strong['fid']:.2f} with the strong preset ({strong['fid'] - off['fid']:+.2f}, {verdict(strong)})."
    )


def is_shipped_demo(model: dict[str, str]) -> bool:
    """The measured numbers belong to the shipped demo weights only, not to any folder named by QSILK_DEMO_MODEL."""
    from qsilk.models.demo import DEMO_MODEL_DIR

    return model.get("kind") == "demo" and Path(model["location"]) == Path(DEMO_MODEL_DIR).resolve()


def _summary(
    table, columns, rows, row_labels, settings, versions, diff_max, sample, out: Path, sources
) -> dict[str, Any]:
    labels = [col.label for col in columns]
    per_config = []
    for j, col in enumerate(columns):
        label, config = col.label, col.config
        items = [table[(label, i)] for i in range(len(rows))]
        fresh = [r.seconds for r in items if r.seconds is not None and not r.skipped]
        seconds = fresh or [r.seconds for r in items if r.seconds is not None]
        touched = [v for r in items for v in [((r.record.get("stats") or {}).get("touched_fraction_mean"))] if v is not None]
        before = [v for r in items for v in [((r.record.get("stats") or {}).get("max_abs_before"))] if v is not None]
        after = [v for r in items for v in [((r.record.get("stats") or {}).get("max_abs_after"))] if v is not None]
        base = [table[(labels[0], i)].image for i in range(len(rows))]
        mae = [float(np.abs(r.image.astype(np.float32) - b.astype(np.float32)).mean()) for r, b in zip(items, base, strict=True)]
        psnr = [_psnr(r.image, b) for r, b in zip(items, base, strict=True)]
        finite_psnr = [p for p in psnr if math.isfinite(p)]
        median = statistics.median(seconds) if seconds else None
        per_config.append(
            {
                "label": label,
                "folder": col.folder,
                "config": config,
                "qrm": col.qrm,
                "confidence_used": sources[label],
                "seconds_per_image_median": median,
                "seconds_per_step_median": median / settings.steps if median is not None else None,
                "timed_images": len(seconds),
                "timed_in_this_run": bool(fresh),
                "touched_fraction_mean": sum(touched) / len(touched) if touched else None,
                "max_abs_before_mean": sum(before) / len(before) if before else None,
                "max_abs_after_mean": sum(after) / len(after) if after else None,
                "mae_vs_plain": sum(mae) / len(mae),
                "max_diff_vs_plain": diff_max[j - 1] if j > 0 and diff_max else 0.0,
                "psnr_vs_plain": sum(finite_psnr) / len(finite_psnr) if finite_psnr else None,
                "identical_to_plain": sum(p == float("inf") for p in psnr),
            }
        )
    images = [
        {
            "row": row_labels[i],
            "files": {label: table[(label, i)].path.relative_to(out).as_posix() for label in labels},
        }
        for i in range(len(rows))
    ]
    return {
        "model": settings.model,
        "pipeline": settings.pipeline,
        "steps": settings.steps,
        "cfg": settings.cfg,
        "scheduler": settings.scheduler,
        "device": settings.device,
        "dtype": settings.dtype,
        "size": [settings.width, settings.height] if settings.width else None,
        "qrm": settings.qrm,
        "rows": row_labels,
        "seeds": sorted({s for _, s in rows}),
        "versions": versions,
        "configs": per_config,
        "diff_max": diff_max,
        "maps_sample": row_labels[sample],
        "measured": measured_fid_sentence() if is_shipped_demo(settings.model) else None,
        "images": images,
    }


_CSS = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; max-width: 1200px; }
table { border-collapse: collapse; margin: 8px 0 20px; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
img { max-width: 100%; image-rendering: pixelated; border: 1px solid #ddd; }
pre { margin: 0; font-size: 11px; }
h2 { margin-top: 28px; }
"""


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _html(summary: dict[str, Any], has_steps: bool, has_diff: bool) -> str:
    e = html.escape
    params = [
        ("model", f"{summary['model']['spec']} ({summary['model']['kind']}: {summary['model']['location']})"),
        ("pipeline", summary["pipeline"]),
        ("scheduler", summary["scheduler"]),
        ("steps", summary["steps"]),
        ("CFG", summary["cfg"]),
        ("seeds", ", ".join(map(str, summary["seeds"]))),
        ("rows", "; ".join(summary["rows"])),
        ("device / dtype", f"{summary['device']} / {summary['dtype']}"),
        ("versions", ", ".join(f"{k} {v}" for k, v in summary["versions"].items())),
    ]
    if summary["size"]:
        params.append(("size", "x".join(map(str, summary["size"]))))
    if summary.get("qrm"):
        qrm = summary["qrm"]
        on = ", ".join(c["label"] for c in summary["configs"] if c.get("qrm"))
        params.append(("QRM", f"{qrm['path']} ({qrm['kind']}, sha256 {qrm['sha256']}); on in: {on}"))
    param_rows = "\n".join(f"<tr><th>{e(k)}</th><td>{e(str(v))}</td></tr>" for k, v in params)
    stat_rows = "\n".join(
        "<tr>"
        f"<td>{e(c['label'])}</td>"
        f"<td>{e(c['confidence_used'] or '-') if c['config'] is not None else '-'}</td>"
        f"<td>{_fmt(c['seconds_per_image_median'], 3)}</td>"
        f"<td>{_fmt(c['seconds_per_step_median'], 3)}</td>"
        f"<td>{_fmt(None if c['touched_fraction_mean'] is None else 100 * c['touched_fraction_mean'], 3)}</td>"
        f"<td>{_fmt(c['max_abs_before_mean'])}</td>"
        f"<td>{_fmt(c['max_abs_after_mean'])}</td>"
        f"<td>{_fmt(c['mae_vs_plain'], 3)}</td>"
        f"<td>{_fmt(c['max_diff_vs_plain'], 3)}</td>"
        f"<td>{_fmt(c['psnr_vs_plain'], 3)}</td>"
        f"<td><details><summary>{'off' if c['config'] is None else 'config'}</summary>"
        f"<pre>{e(json.dumps(c['config'], indent=1))}</pre></details></td>"
        "</tr>"
        for c in summary["configs"]
    )
    labels = [c["label"] for c in summary["configs"]]
    compared = summary["configs"][1:]
    seen = "; ".join(
        f"{c['label']}: {_fmt(None if c['touched_fraction_mean'] is None else 100 * c['touched_fraction_mean'], 2)} % "
        f"of x0 values changed per step, images differ from plain by {_fmt(c['mae_vs_plain'], 2)} grey levels on "
        f"average (at most {_fmt(c['max_diff_vs_plain'], 3)} of 255)"
        for c in compared
    )
    lead = [f"<p><b>What this run shows.</b> {e(seen)}.</p>"] if compared else []
    if summary.get("measured"):
        lead.append(f"<p>{e(summary['measured'])}</p>")
    timed_here = all(c["timed_in_this_run"] for c in summary["configs"])
    timing_note = (
        "Timing: median over the images of each column, after one untimed warm-up call, so first-call costs are "
        "not charged to whichever column runs first"
        + ("." if timed_here else "; images reused from an earlier run keep the time measured then.")
    )
    image_rows = "\n".join(
        f"<tr><td>{e(item['row'])}</td>"
        + "".join(
            f'<td><a href="{e(item["files"][label])}">png</a> '
            f'<a href="{e(item["files"][label][:-4] + ".json")}">json</a></td>'
            for label in labels
        )
        + "</tr>"
        for item in summary["images"]
    )
    sections = [
        "<h2>Images</h2>",
        "<p>Rows: class or prompt and seed. Columns: the plain sampler, then each QSilk config "
        "(with its confidence map, mean over steps, where the config uses one; colour scale below the grid).</p>",
        '<img src="grid.png" alt="comparison grid">',
    ]
    if has_diff:
        scales = ", ".join(f"{c['label']} 0-{_fmt(m, 3)}" for c, m in zip(compared, summary["diff_max"], strict=True))
        sections += [
            "<h2>Difference from the plain sampler</h2>",
            "<p>|A - plain| per pixel, mean over RGB, in grey levels of 255. Each config has its own colour scale, "
            f"so small changes are amplified to be visible; read the scale on its colour bar ({e(scales)}).</p>",
            '<img src="diff.png" alt="difference heat maps">',
        ]
    sections += [
        "<h2>Per-step statistics</h2>",
        "<p>Mean over the rows. The plain sampler's max |x0| is measured through a no-op QSilk config, which is "
        "bit-identical to plain sampling.</p>",
        '<img src="stats.png" alt="per-step statistics">',
    ]
    if has_steps:
        sections += [
            "<h2>Per-step maps</h2>",
            f"<p>Sample: {e(summary['maps_sample'])}. Confidence in [0, 1] (AQClip's corridor widens where it is "
            "high); delta = mean over channels of |x0' - x0|.</p>",
            '<img src="steps.png" alt="per-step confidence and delta maps">',
        ]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>qsilk compare</title><style>{_CSS}</style></head>
<body>
<h1>qsilk compare</h1>
{chr(10).join(lead)}
<h2>Parameters</h2>
<table>{param_rows}</table>
<h2>Configs and statistics</h2>
<table>
<tr><th>config</th><th>confidence used</th><th>s / image (median)</th><th>s / step</th><th>touched %</th>
<th>max |x0| before</th><th>max |x0| after</th><th>MAE vs plain (0-255)</th><th>max |diff| vs plain</th>
<th>PSNR vs plain (dB)</th><th>settings</th></tr>
{stat_rows}
</table>
<p>{e(timing_note)}</p>
{chr(10).join(sections)}
<h2>Files</h2>
<p>Every PNG carries its reproduction record (PNG text key "qsilk"); the JSON sidecar beside it adds timings.
Details: <a href="compare.json">compare.json</a>.</p>
<table><tr><th>row</th>{"".join(f"<th>{e(label)}</th>" for label in labels)}</tr>
{image_rows}
</table>
</body></html>
"""
