"""Fashion-MNIST as the demo model sees it: 28x28 uint8 -> 64x64 float in [-1, 1], one channel."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

FASHION_MNIST_DIR = Path(os.environ.get("QSILK_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
CLASS_NAMES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
IMAGE_SIZE = 64

_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def load_fashion_mnist(split: str = "train", root: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Return (images uint8 (N, 28, 28), labels int64 (N,)) read from the IDX gz files."""
    root = Path(root) if root is not None else FASHION_MNIST_DIR
    image_file, label_file = _FILES[split]
    if not (root / image_file).exists():
        raise FileNotFoundError(
            f"Fashion-MNIST not found at {root}: install it with `sudo apt-get install dataset-fashion-mnist` "
            "(Debian/Ubuntu) or point QSILK_FASHION_MNIST at a folder with the four IDX .gz files"
        )
    with gzip.open(root / image_file) as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(root / label_file) as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f"{split}: {len(images)} images but {len(labels)} labels")
    return images, labels


def to_model_images(images: np.ndarray | torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float32 (N, 1, size, size) in [-1, 1], bilinear upsampling."""
    x = torch.from_numpy(np.array(images, dtype=np.uint8)).float().div(127.5).sub(1.0).unsqueeze(1)
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.clamp(-1.0, 1.0)
