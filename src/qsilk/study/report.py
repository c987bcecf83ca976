"""Results of a study folder: results.json / results.csv (every number), timings.json, and report/index.html
(metric deltas vs steps per CFG with CI bands, FID against the high-frequency gap per cell, spectra and an image
grid of the worst corner, tables)."""

from __future__ import annotations

import csv
import dataclasses
import html
import io
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from qsilk.files import atomic_write_text

from .bootstrap import paired_interval
from .methods import BASELINE

if TYPE_CHECKING:
    from .runner import Study

# The keys a reader looks at first (others are still in the JSON/CSV and get plots too).
HEADLINE = ("fid", "kid", "fd_fmnist", "spectral_hf_gap", "spectral_mf_gap", "spectral_rms_hf", "saturation", "peak")


def _json_number(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else x


def component_methods(method: str) -> list[str]:
    """A composed method without each one of its parts: ``"fdg+qsilk"`` -> ``["qsilk", "fdg"]``. The difference
    to each says what that part adds on top of the others (QSilk on top of a guider: ``fdg+qsilk`` vs ``fdg``)."""
    parts = method.split("+")
    if len(parts) < 2:
        return []
    return ["+".join(parts[:k] + parts[k + 1 :]) for k in range(len(parts))]


def _differences(cell, baseline: str, this: tuple[dict, dict], other: tuple[dict, dict], level: float) -> list[dict]:
    """One row per score key: the cell's value minus ``baseline``'s (same group, same seeds), with the paired interval."""
    (point, reps), (base_point, base_reps) = this, other
    rows = []
    for key in sorted(point):
        lo, hi = paired_interval(reps[key], base_reps[key], level)
        delta = point[key] - base_point[key]
        metric, _, score_key = key.partition(".")
        rows.append(
            {
                "scheduler": cell.scheduler,
                "steps": cell.steps,
                "cfg": cell.cfg,
                "method": cell.method,
                "baseline": baseline,
                "metric": metric,
                "key": score_key,
                "value": _json_number(point[key]),
                "baseline_value": _json_number(base_point[key]),
                "delta": _json_number(delta),
                "ci_low": _json_number(lo),
                "ci_high": _json_number(hi),
                "relative": _json_number(delta / base_point[key]) if base_point[key] else None,
                "excludes_zero": bool(lo > 0 or hi < 0),
            }
        )
    return rows


def collect(study: Study) -> dict[str, Any]:
    """Every number of a study, deterministic (sorted, no timings). ``comparisons``: each method minus plain CFG;
    ``compositions``: each composed method minus the same method without one of its parts (what that part adds)."""
    spec = study.spec
    cells, comparisons, compositions, incomplete = [], [], [], []
    points: dict[Any, tuple[dict, dict]] = {}
    for cell in spec.cells():
        if not (study.cell_complete(cell) and study.bootstrap_complete(cell)):
            incomplete.append(cell.key)
            continue
        points[cell] = study.load_bootstrap(cell)
    for cell, (point, _) in points.items():
        cells.append(
            {
                "key": cell.key,
                "scheduler": cell.scheduler,
                "steps": cell.steps,
                "cfg": cell.cfg,
                "method": cell.method,
                "n": spec.n,
                "record": study.cell_record(cell),
                "scores": {k: _json_number(v) for k, v in sorted(point.items())},
            }
        )
        if cell.method != BASELINE and cell.baseline() in points:
            comparisons.extend(_differences(cell, BASELINE, points[cell], points[cell.baseline()], spec.ci))
        for without in component_methods(cell.method):
            other = dataclasses.replace(cell, method=without)
            if other in points:
                compositions.extend(_differences(cell, without, points[cell], points[other], spec.ci))
    study_info = {k: v for k, v in spec.to_dict().items() if k != "threads"}
    return {
        "study": study_info,
        "n": spec.n,
        "ci": spec.ci,
        "bootstrap": spec.bootstrap,
        "cells": cells,
        "comparisons": comparisons,
        "compositions": compositions,
        "incomplete": incomplete,
    }


def write_outputs(study: Study, report: bool = True) -> dict[str, Any]:

    results = collect(study)
    out = study.out
    atomic_write_text(out / "results.json", json.dumps(results, indent=1, sort_keys=True) + "\n")
    atomic_write_text(out / "results.csv", to_csv(results))
    timings = {}
    for cell in study.spec.cells():
        if study.cell_complete(cell):
            timings[cell.key] = study.cell_seconds(cell) / study.spec.n
    atomic_write_text(out / "timings.json", json.dumps({"seconds_per_image": timings}, indent=1, sort_keys=True) + "\n")
    code = {c.key: study.cell_code(c) for c in study.spec.cells() if study.cell_complete(c)}
    mixed = sorted(k for k, v in code.items() if len(v) > 1)
    atomic_write_text(out / "provenance.json", json.dumps({"code": code, "mixed_code_cells": mixed}, indent=1, sort_keys=True) + "\n")
    if report:
        write_report(study, results, timings)
    return results


def to_csv(results: dict[str, Any]) -> str:
    fields = ["scheduler", "steps", "cfg", "method", "baseline", "metric", "key", "value", "baseline_value", "delta",
              "ci_low", "ci_high", "relative", "excludes_zero"]  # fmt: skip
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for cell in results["cells"]:
        if cell["method"] == BASELINE:
            for key, value in cell["scores"].items():
                metric, _, score_key = key.partition(".")
                writer.writerow({"scheduler": cell["scheduler"], "steps": cell["steps"], "cfg": cell["cfg"],
                                 "method": BASELINE, "metric": metric, "key": score_key, "value": value})  # fmt: skip
    for row in [*results["comparisons"], *results.get("compositions", [])]:
        writer.writerow({k: row[k] for k in fields})
    return buffer.getvalue()


def markdown(results: dict[str, Any], keys: tuple[str, ...] = HEADLINE) -> str:
    """Markdown tables per (scheduler, steps, CFG): plain CFG's value, then each method's delta [95 % CI]
    (3 significant digits; bold: the interval excludes 0), and for composed methods the delta to each of their parts ("A+B vs A")."""
    present = [k for k in keys if any(r["key"] == k for r in results["comparisons"])]
    base = {(c["scheduler"], c["steps"], c["cfg"]): {k.partition(".")[2]: v for k, v in c["scores"].items()}
            for c in results["cells"] if c["method"] == BASELINE}  # fmt: skip
    out = []
    for group in sorted(base):
        rows = [r for r in results["comparisons"] if (r["scheduler"], r["steps"], r["cfg"]) == group and r["key"] in present]
        out.append(f"**{group[0]}, {group[1]} steps, CFG {group[2]:g}** (n = {results['n']} paired samples)\n")
        out.append("| method | " + " | ".join(present) + " |")
        out.append("|---" * (len(present) + 1) + "|")
        out.append("| plain CFG (value) | " + " | ".join(_fmt(base[group].get(k)) for k in present) + " |")
        added = [r for r in results.get("compositions", []) if (r["scheduler"], r["steps"], r["cfg"]) == group]
        pairs = sorted({(r["method"], BASELINE) for r in rows} | {(r["method"], r["baseline"]) for r in added})
        for method, baseline in pairs:
            source = rows if baseline == BASELINE else [r for r in added if r["baseline"] == baseline]
            cells = []
            for k in present:
                r = next((x for x in source if x["method"] == method and x["key"] == k), None)
                if r is None:
                    cells.append("")
                    continue
                text = f"{r['delta']:+.3g} [{r['ci_low']:+.3g}, {r['ci_high']:+.3g}]"
                cells.append(f"**{text}**" if r["excludes_zero"] else text)
            label = method if baseline == BASELINE else f"{method} vs {baseline}"
            out.append(f"| {label} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


# -- the HTML report --------------------------------------------------------------------------------------------------


def _fmt(x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"{x:.3g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.2e}"


def _savefig(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight", metadata={"Software": None})


def _plotted(key: str) -> bool:
    """Headline keys and every Frechet/KID key get a plot; the rest are in results.json / .csv."""
    return key in HEADLINE or key.startswith(("fd", "kid", "fid", "harmonic", "halo"))


def _delta_plots(results: dict, folder: Path) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["comparisons"]
    keys = sorted(
        {(r["metric"], r["key"]) for r in rows if _plotted(r["key"])},
        key=lambda mk: (mk[1] not in HEADLINE, HEADLINE.index(mk[1]) if mk[1] in HEADLINE else 0, mk),
    )
    out = []
    for scheduler in sorted({r["scheduler"] for r in rows}):
        cfgs = sorted({r["cfg"] for r in rows if r["scheduler"] == scheduler})
        for metric, key in keys:
            sel = [r for r in rows if r["scheduler"] == scheduler and (r["metric"], r["key"]) == (metric, key)]
            if not sel:
                continue
            fig, axes = plt.subplots(1, len(cfgs), figsize=(3.6 * len(cfgs), 3.0), squeeze=False, sharey=True)
            for ax, cfg in zip(axes[0], cfgs, strict=True):
                for method in sorted({r["method"] for r in sel}):
                    pts = sorted((r["steps"], r["delta"], r["ci_low"], r["ci_high"]) for r in sel if r["cfg"] == cfg and r["method"] == method)
                    pts = [p for p in pts if None not in p]
                    if not pts:
                        continue
                    steps, delta, lo, hi = (np.array(v, dtype=float) for v in zip(*pts, strict=True))
                    (line,) = ax.plot(steps, delta, marker="o", ms=3, label=method)
                    ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.15)
                ax.axhline(0, color="k", lw=0.8)
                ax.set_xscale("log", base=2)
                ticks = sorted({r["steps"] for r in sel})
                ax.set_xticks(ticks, [str(t) for t in ticks])
                ax.minorticks_off()
                ax.set_title(f"CFG {cfg:g}", fontsize=9)
                ax.set_xlabel("steps")
            axes[0][0].set_ylabel(f"delta {key} vs CFG")
            axes[0][-1].legend(fontsize=6, loc="best")
            fig.suptitle(f"{metric}.{key} ({scheduler}), {results['ci']:.0%} paired-bootstrap CI", fontsize=10, y=1.04)
            name = f"delta-{scheduler}-{metric}-{key}.png".replace("/", "_")
            _savefig(fig, folder / name)
            plt.close(fig)
            out.append((f"{metric}.{key} ({scheduler})", name))
    return out


def _baseline_scores(results: dict) -> dict[tuple[str, int, float], dict[str, float]]:
    """Plain CFG's scores per (scheduler, steps, cfg)."""
    return {(c["scheduler"], c["steps"], c["cfg"]): c["scores"] for c in results["cells"] if c["method"] == BASELINE}


TRADEOFF_X = "spectral_hf_gap"


def tradeoff_points(results: dict) -> dict[tuple[str, int, float], tuple[str, list[dict[str, Any]]]]:
    """Per (scheduler, steps, cfg): every method's difference to plain CFG in the signed HF gap (x) and in FID, or
    the first Frechet key measured when FID is not (y), with their intervals. Judging both at once tells a win by
    sharpening from a win by smoothing. Returns {group: (y key, [{method, x, x_lo, x_hi, y, y_lo, y_hi, sig}])}."""
    by_group: dict[tuple, dict[str, dict[str, dict]]] = {}
    for r in results["comparisons"]:
        by_group.setdefault((r["scheduler"], r["steps"], r["cfg"]), {}).setdefault(r["method"], {})[r["key"]] = r
    out = {}
    for group, methods in sorted(by_group.items()):
        keys = {k for rows in methods.values() for k in rows}
        y_key = "fid" if "fid" in keys else next((k for k in sorted(keys) if k.startswith("fd")), None)
        if y_key is None or TRADEOFF_X not in keys:
            continue
        points = []
        for method, rows in sorted(methods.items()):
            x, y = rows.get(TRADEOFF_X), rows.get(y_key)
            if x is None or y is None:
                continue
            point = {"method": method, "sig": (x["excludes_zero"], y["excludes_zero"])}
            for axis, r in (("x", x), ("y", y)):
                point |= {axis: r["delta"], f"{axis}_lo": r["ci_low"], f"{axis}_hi": r["ci_high"]}
            if None not in point.values():
                points.append(point)
        if points:
            out[group] = (y_key, points)
    return out


def _tradeoff_plots(results: dict, folder: Path) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.transforms import blended_transform_factory

    base = _baseline_scores(results)
    out = []
    for (scheduler, steps, cfg), (y_key, points) in tradeoff_points(results).items():
        gap = next((v for k, v in base.get((scheduler, steps, cfg), {}).items() if k.endswith("." + TRADEOFF_X)), None)
        fig, ax = plt.subplots(figsize=(7.5, 5.0))
        spread = max(abs(v) for p in points for v in (p["y_lo"], p["y_hi"]))
        symlog = spread > 20  # one method 50 FID away would squeeze every other point onto the axis
        x_span = max(abs(v) for p in points for v in (p["x_lo"], p["x_hi"]))
        # points that sit on the origin at this scale share one label instead of printing over each other
        near = [p["method"] for p in points if abs(p["x"]) < 0.03 * x_span and abs(p["y"]) < (0.1 if symlog else 0.03 * spread)]
        for p in points:
            strong = any(p["sig"])
            ax.errorbar(p["x"], p["y"], xerr=[[p["x"] - p["x_lo"]], [p["x_hi"] - p["x"]]],
                        yerr=[[p["y"] - p["y_lo"]], [p["y_hi"] - p["y"]]], fmt="o", ms=4, capsize=2, lw=0.8,
                        alpha=1.0 if strong else 0.45)  # fmt: skip
            if len(near) > 1 and p["method"] in near:
                continue
            below = "+" in p["method"]  # a composition sits on its guider's point: label it underneath
            ax.annotate(p["method"], (p["x"], p["y"]), xytext=(4, -9 if below else 3), textcoords="offset points", fontsize=7)
        ax.axhline(0, color="k", lw=0.8)
        ax.axvline(0, color="k", lw=0.8)
        if symlog:
            ax.set_yscale("symlog", linthresh=1.0)
        if len(near) > 1:  # the shared label goes on the wider side of the origin, inside the axes
            names = "\n".join(", ".join(near[i : i + 3]) for i in range(0, len(near), 3))
            ax.autoscale_view()
            ox, oy = ax.transAxes.inverted().transform(ax.transData.transform((0.0, 0.0)))
            right = ox < 0.5
            ax.annotate(f"at ~0:\n{names}", (0, 0), xytext=(ox + (0.08 if right else -0.08), oy + 0.12),
                        textcoords="axes fraction", ha="left" if right else "right", fontsize=7,
                        bbox={"boxstyle": "round", "fc": "white", "ec": "0.7"}, arrowprops={"arrowstyle": "-", "color": "0.5"})  # fmt: skip
        if gap is not None and gap < 0:  # plain CFG lacks high frequencies: more HF power is sharper, not noisier
            under_zero = blended_transform_factory(ax.transAxes, ax.transData)
            ax.text(0.99, 0, "better and sharper", transform=under_zero, ha="right", va="top", fontsize=8, color="green")
            ax.text(0.01, 0, "better by smoothing", transform=under_zero, va="top", fontsize=8, color="darkorange")
        where = "" if gap is None else f" (plain CFG: {gap:+.3f})"
        ax.set_xlabel(f"delta {TRADEOFF_X}{where}; + = more high-frequency power")
        ax.set_ylabel(f"delta {y_key} vs plain CFG (lower is better)")
        ax.set_title(f"{steps} steps, CFG {cfg:g} ({scheduler}): {results['ci']:.0%} CIs, faded = neither excludes 0", fontsize=9)
        name = f"tradeoff-{scheduler}-s{steps}-cfg{cfg:g}.png"
        _savefig(fig, folder / name)
        plt.close(fig)
        out.append((f"{y_key} vs high-frequency gap, {steps} steps, CFG {cfg:g} ({scheduler})", name))
    return out


def worst_corner(results: dict) -> tuple[str, int, float] | None:
    groups = {(c["scheduler"], c["steps"], c["cfg"]) for c in results["cells"]}
    if not groups:
        return None
    return min(groups, key=lambda g: (g[0], g[1], -g[2]))


def _corner_figures(study: Study, results: dict, folder: Path) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    corner = worst_corner(results)
    if corner is None:
        return []
    cells = [c for c in study.spec.cells() if c.group == corner and c.key in {x["key"] for x in results["cells"]}]
    out = []
    tiles = []
    per_row = min(8, study.spec.n)
    for cell in cells:
        images = study.load_cell(cell, "images")["images"][:per_row]
        row = np.concatenate([img.permute(1, 2, 0).numpy() for img in images], axis=1)
        tiles.append(row if row.shape[-1] == 3 else np.repeat(row[..., :1], 3, axis=-1))
    grid = np.concatenate(tiles, axis=0)
    # one labelled row per method (same seeds in every column), at 2 screen pixels per image pixel
    height, width = grid.shape[:2]
    image_w, image_h, margin_left, margin_top = width / 50, height / 50, 1.6, 0.4  # inches at dpi 100
    fig = plt.figure(figsize=(image_w + margin_left, image_h + margin_top), dpi=100)
    ax = fig.add_axes((margin_left / (image_w + margin_left), 0.0, image_w / (image_w + margin_left), image_h / (image_h + margin_top)))
    ax.imshow(grid, interpolation="nearest")
    row_height = height / len(cells)
    ax.set_yticks([row_height * (k + 0.5) for k in range(len(cells))], [c.method for c in cells], fontsize=9)
    ax.set_xticks([])
    ax.set_title(f"{corner[1]} steps, CFG {corner[2]:g}: seeds {study.spec.seed_base}+ (columns), one method per row", fontsize=9)
    _savefig(fig, folder / "corner-grid.png")
    plt.close(fig)
    labels = " / ".join(c.method for c in cells)
    out.append((f"worst corner {corner[0]}, {corner[1]} steps, CFG {corner[2]:g}; rows: {labels}", "corner-grid.png"))
    if "spectral" in study.spec.metrics:
        reference = study.load_reference()["spectral"].mean(0).numpy()
        fig, ax = plt.subplots(figsize=(6, 3.5))
        freqs = (np.arange(len(reference)) + 0.5) / (2 * len(reference))
        for cell in cells:
            spectrum = study.load_cell(cell)["spectral"].mean(0).numpy()
            ax.plot(freqs[1:], (spectrum - reference)[1:], label=cell.method)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xlabel("frequency (cycles/px)")
        ax.set_ylabel("log10 power - reference")
        ax.legend(fontsize=6)
        ax.set_title(f"radial spectrum vs reference, {corner[1]} steps, CFG {corner[2]:g}", fontsize=9)
        _savefig(fig, folder / "corner-spectra.png")
        plt.close(fig)
        out.append(("spectra at the worst corner", "corner-spectra.png"))
    return out


def _table(results: dict) -> str:
    rows = [r for r in results["comparisons"] if r["key"] in HEADLINE]
    rows += [{**r, "method": f"{r['method']} vs {r['baseline']}"} for r in results.get("compositions", []) if r["key"] in HEADLINE]
    keys = [k for k in HEADLINE if any(r["key"] == k for r in rows)]
    if not rows:
        return "<p>No comparisons yet.</p>"
    lines = ["<table><tr><th>scheduler</th><th>steps</th><th>CFG</th><th>method</th>"
             + "".join(f"<th>&Delta; {html.escape(k)}</th>" for k in keys) + "</tr>"]  # fmt: skip
    base = _baseline_scores(results)
    by_cell: dict[tuple, dict] = {}
    for r in rows:
        by_cell.setdefault((r["scheduler"], r["steps"], r["cfg"], r["method"]), {})[r["key"]] = r
    for (scheduler, steps, cfg, method), vals in sorted(by_cell.items()):
        cells = []
        for k in keys:
            r = vals.get(k)
            if r is None:
                cells.append("<td></td>")
                continue
            mark = " class='sig'" if r["excludes_zero"] else ""
            cells.append(f"<td{mark}>{_fmt(r['delta'])} [{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]</td>")
        lines.append(f"<tr><td>{scheduler}</td><td>{steps}</td><td>{cfg:g}</td><td>{html.escape(method)}</td>{''.join(cells)}</tr>")
    lines.append("</table>")
    baseline_lines = ["<table><tr><th>scheduler</th><th>steps</th><th>CFG</th>" + "".join(f"<th>{k}</th>" for k in keys) + "</tr>"]
    for (scheduler, steps, cfg), scores in sorted(base.items()):
        vals = {k.partition(".")[2]: v for k, v in scores.items()}
        baseline_lines.append(f"<tr><td>{scheduler}</td><td>{steps}</td><td>{cfg:g}</td>" + "".join(f"<td>{_fmt(vals.get(k))}</td>" for k in keys) + "</tr>")
    baseline_lines.append("</table>")
    return "<h2>Plain CFG (the baseline)</h2>" + "\n".join(baseline_lines) + "<h2>Differences to plain CFG (\"A+B vs A\": what B adds to A)</h2>" + "\n".join(lines)


def write_report(study: Study, results: dict, timings: dict[str, float]) -> Path:

    folder = study.out / "report"
    folder.mkdir(parents=True, exist_ok=True)
    figures = _delta_plots(results, folder) + _tradeoff_plots(results, folder) + _corner_figures(study, results, folder)
    spec = results["study"]
    head = (
        f"<p>n = {results['n']} paired samples per cell (seeds {spec['seed_base']}..{spec['seed_base'] + results['n'] - 1}, "
        f"class = index mod 10), reference: {spec['ref_n']} {html.escape(spec['ref_split'])} images; "
        f"{results['ci']:.0%} paired-bootstrap intervals, {results['bootstrap']} replicates. "
        "Highlighted: the interval excludes 0. Every number: results.json / results.csv.</p>"
    )
    if results["incomplete"]:
        head += f"<p>Incomplete cells (not in the tables): {html.escape(', '.join(results['incomplete']))}</p>"
    timing_rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v * 1e3:.1f}</td></tr>" for k, v in sorted(timings.items()))
    body = "\n".join(f"<figure><img src='{html.escape(name)}'><figcaption>{html.escape(title)}</figcaption></figure>" for title, name in figures)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>qsilk study</title>
<style>body{{font-family:sans-serif;max-width:1400px;margin:auto}} td,th{{border:1px solid #ccc;padding:2px 6px;font-size:12px}}
table{{border-collapse:collapse;margin:8px 0}} .sig{{background:#ffe9a8}} img{{max-width:100%}}</style></head><body>
<h1>qsilk study</h1>{head}{_table(results)}<h2>Figures</h2>{body}
<h2>Time per image (ms, this machine)</h2><table><tr><th>cell</th><th>ms / image</th></tr>{timing_rows}</table>
</body></html>
"""
    atomic_write_text(folder / "index.html", page)
    return folder / "index.html"


__all__ = ["HEADLINE", "collect", "markdown", "to_csv", "tradeoff_points", "worst_corner", "write_outputs", "write_report"]
