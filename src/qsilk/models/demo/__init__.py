"""The embedded demo model: a class-conditional latent DiT trained from scratch on Fashion-MNIST.

    from qsilk.models.demo import load_demo_pipeline
    pipe = load_demo_pipeline()                      # shipped weights, CPU, fp32
    images = pipe(["Dress", "Sneaker"], num_inference_steps=8, guidance_scale=4.0).images

Architecture, training recipe and measurements: docs/demo-model.md. Training: scripts/train_demo.sh.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .data import CLASS_NAMES
from .pipeline import QSilkDemoPipeline


def _demo_model_dir() -> Path:
    if __package__ == "qsilk.models.demo":
        from importlib.resources import files

        return Path(str(files("qsilk").joinpath("assets", "demo")))
    return Path(__file__).resolve().parents[2] / "assets" / "demo"  # a copied snapshot of this package


DEMO_MODEL_DIR: Path = _demo_model_dir()

# Short names accepted by load_demo_pipeline(scheduler=...).
SCHEDULER_NAMES = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "dpm": "DPMSolverMultistepScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
}


def swap_scheduler(pipe: QSilkDemoPipeline, scheduler) -> QSilkDemoPipeline:
    """Replace ``pipe.scheduler`` by a name (``SCHEDULER_NAMES`` or a diffusers class name), class or instance,
    built from the shipped scheduler config (same betas, v-prediction, trailing spacing)."""
    import diffusers

    if isinstance(scheduler, str):
        scheduler = getattr(diffusers, SCHEDULER_NAMES.get(scheduler.lower(), scheduler))
    if isinstance(scheduler, type):
        scheduler = scheduler.from_config(pipe.scheduler.config)
    pipe.scheduler = scheduler
    return pipe


def load_demo_pipeline(
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    scheduler=None,
    path: str | Path | None = None,
) -> QSilkDemoPipeline:
    """Load the shipped demo pipeline (offline, from the package folder ``DEMO_MODEL_DIR``)."""
    folder = Path(path) if path is not None else DEMO_MODEL_DIR
    if not (folder / "model_index.json").exists():
        raise FileNotFoundError(f"no demo model at {folder}; train and export it with scripts/train_demo.sh")
    pipe = QSilkDemoPipeline.from_pretrained(folder, dtype=dtype)
    if scheduler is not None:
        swap_scheduler(pipe, scheduler)
    return pipe.to(device)


def demo_weights_available(path: str | Path | None = None) -> bool:
    folder = Path(path) if path is not None else DEMO_MODEL_DIR
    return (folder / "model_index.json").exists()


__all__ = [
    "CLASS_NAMES",
    "DEMO_MODEL_DIR",
    "SCHEDULER_NAMES",
    "QSilkDemoPipeline",
    "demo_weights_available",
    "load_demo_pipeline",
    "swap_scheduler",
]
