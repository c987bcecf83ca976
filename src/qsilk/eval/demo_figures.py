"""Figures of the demo model for the docs: the few-step / high-CFG failure grid, without and with QSilk.

    python -m qsilk.eval.demo_figures --out docs/images

Rows: (steps, CFG) settings; columns: one image per class (fixed seeds). One grid without QSilk, one with the
default QSilk config, side by side in one PNG with labels.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

import qsilk

STEPS = (4, 8, 20, 50)
CFGS = (1.5, 4.0, 9.0)


def render_cell_row(pipe, classes: list[int], steps: int, cfg: float, seed: int) -> np.ndarray:
    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(classes))]
    images = pipe(classes, num_inference_steps=steps, guidance_scale=cfg, generator=generators, output_type="np")
    return np.concatenate(list(images.images), axis=1)


def failure_grid(pipe, classes: list[int], seed: int = 0, config: qsilk.QSilkConfig | None = None):
    rows, labels = [], []
    handle = qsilk.enable(pipe, config) if config is not None else None
    try:
        for steps in STEPS:
            for cfg in CFGS:
                rows.append(render_cell_row(pipe, classes, steps, cfg, seed))
                labels.append(f"{steps} steps, CFG {cfg:g}")
    finally:
        if handle is not None:
            handle.remove()
    return rows, labels


def main(argv=None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from qsilk.models.demo import load_demo_pipeline

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("docs/images"))
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--scheduler", default="dpm")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--config", type=Path, default=None, help="QSilk config JSON for the right column (default: defaults)")
    p.add_argument("--preset", default=None, help="named QSilk config for the right column, e.g. strong")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = load_demo_pipeline(scheduler=args.scheduler, path=args.model)
    pipe.set_progress_bar_config(disable=True)
    classes = list(range(int(pipe.transformer.config.num_embeds_ada_norm)))
    plain, labels = failure_grid(pipe, classes, args.seed)
    if args.config and args.preset:
        p.error("give --config or --preset, not both")
    if args.preset:
        config, config_name = qsilk.QSilkConfig.preset(args.preset), f"with QSilk (preset {args.preset})"
    elif args.config:
        config, config_name = qsilk.QSilkConfig.from_json(args.config), f"with QSilk ({args.config.stem})"
    else:
        config, config_name = qsilk.QSilkConfig(), "with QSilk (defaults)"
    stabilised, _ = failure_grid(pipe, classes, args.seed, config)
    fig, axes = plt.subplots(len(plain), 2, figsize=(15, 0.78 * len(plain) + 0.6))
    for r, (a, b, label) in enumerate(zip(plain, stabilised, labels, strict=True)):
        for c, img in enumerate((a, b)):
            ax = axes[r, c]
            ax.imshow(img, vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
            if r == 0:
                ax.set_title("without QSilk" if c == 0 else config_name, fontsize=10)
    fig.suptitle(f"demo model, {args.scheduler}, seeds {args.seed}..{args.seed + len(classes) - 1}, one per class")
    fig.tight_layout()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "demo-failure-grid.png"
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
