"""Shared test settings: small thread count (2-core CI), deterministic hypothesis profile; a tiny fake
Fashion-MNIST for the demo-model tests."""

import gzip
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings

torch.set_num_threads(1)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

settings.register_profile(
    "qsilk", max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("qsilk")


def write_idx(folder, split, n, seed):
    """IDX gz files of n fake 28x28 images: a bright rectangle whose height depends on the class (learnable)."""
    rng = np.random.default_rng(seed)
    images = np.zeros((n, 28, 28), np.uint8)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    for k in range(n):
        size = 6 + labels[k]
        images[k, 14 - size // 2 : 14 + size // 2, 10:18] = 200
    from qsilk.models.demo import data as demo_data

    files = demo_data._FILES[split]
    with gzip.open(folder / files[0], "wb") as f:
        f.write(
            np.array([0, 0, 8, 3], np.uint8).tobytes()
            + np.array([n, 28, 28], ">i4").tobytes()
            + images.tobytes()
        )
    with gzip.open(folder / files[1], "wb") as f:
        f.write(
            np.array([0, 0, 8, 1], np.uint8).tobytes() + np.array([n], ">i4").tobytes() + labels.tobytes()
        )


@pytest.fixture(scope="module")
def fake_dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fmnist")
    write_idx(folder, "train", 48, 0)
    write_idx(folder, "test", 16, 1)
    return folder
