"""Export the latest checkpoints as the shipped diffusers folder (safe while training continues).

    python -m qsilk.models.demo.export --ae-dir runs/demo/ae --dit-dir runs/demo/dit --out src/qsilk/assets/demo

Reads the DiT's latest atomic checkpoint (EMA weights), stores fp16 tensors, writes ``model_index.json``
(``_class_name: QSilkDemoPipeline``, ``id2label``, ``null_class_id``) and ``export.json`` (provenance), swaps the
folder into place, and renders a sample grid and the loss curve for the docs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DiTTransformer2DModel, DPMSolverMultistepScheduler

from qsilk.files import temp_path

from .checkpoint import latest_checkpoint, load_checkpoint
from .data import CLASS_NAMES
from .dit import SCHEDULE_CONFIG, disable_label_dropout
from .pipeline import QSilkDemoPipeline


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ae-dir", type=Path, default=Path("runs/demo/ae"))
    p.add_argument("--dit-dir", type=Path, default=Path("runs/demo/dit"))
    p.add_argument("--out", type=Path, default=Path("src/qsilk/assets/demo"))
    p.add_argument("--weights", choices=("ema", "model"), default="ema")
    p.add_argument("--dtype", choices=("fp16", "fp32"), default="fp16")
    p.add_argument("--grid", type=Path, default=Path("docs/images/demo-samples.png"))
    p.add_argument("--loss-plot", type=Path, default=Path("docs/images/demo-dit-loss.png"))
    p.add_argument("--grid-steps", type=int, default=20)
    p.add_argument("--grid-guidance", type=float, default=4.0)
    return p.parse_args(argv)


def build_pipeline(ae_dir: Path, dit_dir: Path, weights: str = "ema") -> tuple[QSilkDemoPipeline, dict]:
    ckpt = latest_checkpoint(dit_dir)
    if ckpt is None:
        raise FileNotFoundError(f"no DiT checkpoint under {dit_dir}/ckpt")
    tensors, state = load_checkpoint(ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    transformer = DiTTransformer2DModel.from_config(config)
    transformer.load_state_dict(tensors[weights])
    disable_label_dropout(transformer)
    vae = AutoencoderKL.from_pretrained(ae_dir / "final")
    scheduler = DPMSolverMultistepScheduler(**SCHEDULE_CONFIG)
    pipe = QSilkDemoPipeline(
        transformer=transformer.eval(),
        vae=vae.eval(),
        scheduler=scheduler,
        id2label=dict(enumerate(CLASS_NAMES)),
        null_class_id=int(transformer.config.num_embeds_ada_norm),
    )
    info = {
        "dit_checkpoint": ckpt.name,
        "dit_step": state["step"],
        "dit_train_seconds": state.get("elapsed_s"),
        "weights": weights,
        "exported_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    ae_metrics = ae_dir / "metrics.json"
    if ae_metrics.exists():
        info["ae"] = json.loads(ae_metrics.read_text())
    return pipe, info


def save_folder(pipe: QSilkDemoPipeline, out: Path, dtype: torch.dtype, info: dict) -> None:
    """Write to a sibling temp folder, then swap it into place."""
    out = Path(out)
    tmp = temp_path(out)
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.transformer.to(dtype)
    pipe.vae.to(dtype)
    pipe.save_pretrained(tmp, safe_serialization=True)
    pipe.transformer.float()
    pipe.vae.float()
    (tmp / "export.json").write_text(json.dumps(info, indent=2) + "\n")
    for path in tmp.rglob("*"):  # safetensors writes 0600; package data should be world-readable
        path.chmod(0o755 if path.is_dir() else 0o644)
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def plot_losses(dit_dir: Path, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in (dit_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key in ("v_mse", "loss"):
        values = torch.tensor([r[key] for r in records])
        smooth = torch.nn.functional.avg_pool1d(values[None, None], 9, 1, 4, count_include_pad=False)[0, 0]
        ax.plot(steps, smooth, label=f"{key} (smoothed)")
    ax.set_xlabel("step")
    ax.set_yscale("log")
    ax.set_title("demo DiT training loss")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    from PIL import Image

    from .sample import class_grid

    args = parse_args(argv)
    torch.set_num_threads(1)
    pipe, info = build_pipeline(args.ae_dir, args.dit_dir, args.weights)
    dtype = torch.float16 if args.dtype == "fp16" else torch.float32
    save_folder(pipe, args.out, dtype, info)
    size = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"exported DiT step {info['dit_step']} ({args.weights}) to {args.out} ({size / 1e6:.1f} MB)")
    reloaded = QSilkDemoPipeline.from_pretrained(args.out, dtype=torch.float32)
    reloaded.set_progress_bar_config(disable=True)
    if args.grid:
        args.grid.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        Image.fromarray(class_grid(reloaded, 4, args.grid_steps, args.grid_guidance)).save(args.grid)
        print(f"wrote {args.grid} ({time.time() - t0:.1f} s)")
    if args.loss_plot and (args.dit_dir / "log.jsonl").exists():
        plot_losses(args.dit_dir, args.loss_plot)
        print(f"wrote {args.loss_plot}")


if __name__ == "__main__":
    main()
