"""Render a class grid from the demo pipeline (rows = classes, columns = seeds).

    python -m qsilk.models.demo.sample --out grid.png --steps 20 --guidance 4 --scheduler dpm
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from .pipeline import QSilkDemoPipeline, _to_uint8_grid


def class_grid(
    pipe: QSilkDemoPipeline, per_class: int = 4, steps: int = 20, guidance: float = 4.0, seed: int = 0
) -> np.ndarray:
    """uint8 (rows * H, cols * W, 3) grid: one row per class, ``per_class`` seeds per row."""
    num_classes = int(pipe.transformer.config.num_embeds_ada_norm)
    labels = [c for c in range(num_classes) for _ in range(per_class)]
    generator = torch.Generator().manual_seed(seed)
    images = pipe(labels, num_inference_steps=steps, guidance_scale=guidance, generator=generator, output_type="np")
    return _to_uint8_grid(images.images, per_class)


def main(argv=None) -> None:
    from PIL import Image

    from . import load_demo_pipeline

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--per-class", type=int, default=4)
    p.add_argument("--scheduler", default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    pipe = load_demo_pipeline(scheduler=args.scheduler, path=args.model)
    pipe.set_progress_bar_config(disable=True)
    Image.fromarray(class_grid(pipe, args.per_class, args.steps, args.guidance, args.seed)).save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
