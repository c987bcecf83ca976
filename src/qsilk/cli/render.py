"""Image helpers (grids with labels, colour-mapped arrays) and the matplotlib figures of ``qsilk compare``."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from qsilk.files import atomic_write_bytes

LABEL_HEIGHT = 18
ROW_LABEL_WIDTH = 150


def upscale(image: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour upscaling: small demo images stay crisp, pixels stay pixels."""
    if factor <= 1:
        return image
    return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)


def display_scale(height: int, width: int, target: int = 192) -> int:
    return max(1, target // max(height, width))


def colorize(values: np.ndarray, cmap: str = "viridis", vmin: float = 0.0, vmax: float = 1.0) -> np.ndarray:
    """(H, W) floats -> (H, W, 3) uint8 through a matplotlib colour map; NaN -> mid grey."""
    from matplotlib import colormaps

    span = vmax - vmin if vmax > vmin else 1.0
    scaled = np.clip((np.nan_to_num(values, nan=vmin) - vmin) / span, 0.0, 1.0)
    rgb = (colormaps[cmap](scaled)[..., :3] * 255).round().astype(np.uint8)
    rgb[np.isnan(values)] = 128
    return rgb


def resize_nearest(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize (h, w[, 3]) to (height, width) by nearest neighbour (maps live on the latent grid)."""
    rows = (np.arange(height) * image.shape[0] // height).clip(0, image.shape[0] - 1)
    cols = (np.arange(width) * image.shape[1] // width).clip(0, image.shape[1] - 1)
    return image[rows][:, cols]


def _font(size: int = 12):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType sizing
        return ImageFont.load_default()


def labelled_grid(
    cells: Sequence[Sequence[np.ndarray | None]],
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    gap: int = 4,
) -> np.ndarray:
    """Rows x columns of (H, W, 3) uint8 tiles (all the same size, None = blank) with text labels."""
    from PIL import Image, ImageDraw

    tile = next(c for row in cells for c in row if c is not None)
    h, w = tile.shape[:2]
    n_rows, n_cols = len(cells), max(len(r) for r in cells)
    width = ROW_LABEL_WIDTH + n_cols * (w + gap) + gap
    height = LABEL_HEIGHT + n_rows * (h + gap) + gap
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = _font()
    for j, label in enumerate(col_labels):
        x = ROW_LABEL_WIDTH + gap + j * (w + gap)
        draw.text((x + 2, 2), _fit(draw, label, font, w), fill=(0, 0, 0), font=font)
    for i, row in enumerate(cells):
        y = LABEL_HEIGHT + gap + i * (h + gap)
        label = row_labels[i] if i < len(row_labels) else ""
        draw.text((4, y + h // 2 - 7), _fit(draw, label, font, ROW_LABEL_WIDTH - 8), fill=(0, 0, 0), font=font)
        for j, cell in enumerate(row):
            if cell is not None:
                canvas.paste(Image.fromarray(cell), (ROW_LABEL_WIDTH + gap + j * (w + gap), y))
    return np.asarray(canvas)


def _fit(draw, text: str, font, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def save_png(path: Path, image: np.ndarray) -> None:
    from .runs import png_bytes

    atomic_write_bytes(path, png_bytes(image))


def _save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def difference_figure(
    diffs: Sequence[Sequence[np.ndarray]], row_labels: Sequence[str], col_labels: Sequence[str], path: Path
) -> list[float]:
    """Heat maps of |A - B| (mean over RGB, 0-255), ``diffs[sample][config]``, one row per compared config and one
    column per sample. Each config row has its own colour scale, 0 to its largest difference, with its own colour
    bar: a config that changes pixels by 2 grey levels is as visible as one that changes them by 60, and the bar
    says which is which. Returns each config's largest difference (0 = identical to plain)."""
    plt = _pyplot()
    n_samples, n_configs = len(diffs), len(col_labels)
    maxima = [max(float(diffs[i][j].max()) for i in range(n_samples)) for j in range(n_configs)]
    fig, axes = plt.subplots(
        n_configs, n_samples, figsize=(1.5 * n_samples + 2.2, 1.7 * n_configs + 0.5), squeeze=False
    )
    for j in range(n_configs):
        vmax = maxima[j] if maxima[j] > 0 else 1.0
        image = None
        for i in range(n_samples):
            ax = axes[j][i]
            image = ax.imshow(diffs[i][j], cmap="inferno", vmin=0.0, vmax=vmax, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_title(row_labels[i].replace(" / ", "\n"), fontsize=7)
            if i == 0:
                ax.set_ylabel(_wrap(col_labels[j], 22), fontsize=8)
        bar = fig.colorbar(image, ax=list(axes[j]), shrink=0.9, pad=0.02)
        bar.set_label("identical" if maxima[j] == 0 else f"|A - plain|, 0-{vmax:.3g} of 255", fontsize=7)
        bar.ax.tick_params(labelsize=7)
    _save_figure(fig, path)
    return maxima


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width)) or text


def colorbar_image(label: str, cmap: str, vmin: float, vmax: float, width_in: float = 6.0) -> np.ndarray:
    """A horizontal colour bar with ticks and a label, as an (H, W, 3) uint8 image (a legend for PIL grids)."""
    plt = _pyplot()
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    fig, ax = plt.subplots(figsize=(width_in, 0.28))
    bar = fig.colorbar(ScalarMappable(norm=Normalize(vmin, vmax), cmap=cmap), cax=ax, orientation="horizontal")
    bar.set_label(label, fontsize=8)
    bar.ax.tick_params(labelsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", facecolor="white")
    plt.close(fig)
    from PIL import Image

    buf.seek(0)
    with Image.open(buf) as img:
        return np.asarray(img.convert("RGB")).copy()


def stack_below(image: np.ndarray, below: np.ndarray, gap: int = 6) -> np.ndarray:
    """``below`` under ``image`` on white, left-aligned after the row-label column."""
    height = image.shape[0] + gap + below.shape[0]
    width = max(image.shape[1], ROW_LABEL_WIDTH + below.shape[1])
    canvas = np.full((height, width, 3), 255, np.uint8)
    canvas[: image.shape[0], : image.shape[1]] = image
    top, left = image.shape[0] + gap, min(ROW_LABEL_WIDTH, width - below.shape[1])
    canvas[top : top + below.shape[0], left : left + below.shape[1]] = below
    return canvas


def stats_figure(curves: dict[str, dict[str, list[float]]], path: Path) -> None:
    """Per step, per config (mean over samples): touched fraction and max|x0| before (dashed) / after (solid)."""
    plt = _pyplot()
    fig, (ax_touch, ax_max) = plt.subplots(1, 2, figsize=(10, 3.6))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (label, curve) in enumerate(curves.items()):
        color = colors[k % len(colors)]
        steps = curve["step"]
        if label != "plain" and curve.get("touched") and any(math.isfinite(v) for v in curve["touched"]):
            ax_touch.plot(steps, [100 * v for v in curve["touched"]], marker="o", ms=3, color=color, label=label)
        if curve.get("before"):
            ax_max.plot(steps, curve["before"], ls="--", color=color, label=f"{label} before")
        if curve.get("after") and label != "plain":
            ax_max.plot(steps, curve["after"], ls="-", marker="o", ms=3, color=color, label=f"{label} after")
    ax_touch.set_title("elements changed by QSilk per step")
    ax_touch.set_xlabel("step")
    ax_touch.set_ylabel("touched (%)")
    ax_max.set_title("max |x0| per step (before / after QSilk)")
    ax_max.set_xlabel("step")
    ax_max.set_ylabel("max |x0|")
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_touch, ax_max):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    _save_figure(fig, path)


def step_maps_figure(panels: list[tuple[str, np.ndarray, str]], steps: Sequence[int], path: Path, title: str) -> None:
    """One row per (label, (steps, h, w) maps, kind); kind "confidence" is drawn on [0, 1], "delta" on its own max."""
    plt = _pyplot()
    n_rows, n_cols = len(panels), len(steps)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.3 * n_cols + 1.6, 1.4 * n_rows + 0.6), squeeze=False)
    for i, (label, maps, kind) in enumerate(panels):
        if kind == "confidence":
            vmin, vmax, cmap = 0.0, 1.0, "viridis"
        else:
            finite = maps[np.isfinite(maps)]
            vmin, vmax, cmap = 0.0, float(finite.max()) if finite.size and finite.max() > 0 else 1e-6, "magma"
        image = None
        for j in range(n_cols):
            ax = axes[i][j]
            image = ax.imshow(maps[j], cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(f"step {steps[j]}", fontsize=8)
            if j == 0:
                ax.set_ylabel(label, fontsize=7)
        fig.colorbar(image, ax=list(axes[i]), shrink=0.9, pad=0.01)
    fig.suptitle(title, fontsize=9)
    _save_figure(fig, path)
