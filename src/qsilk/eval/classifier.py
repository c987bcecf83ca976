"""A small Fashion-MNIST CNN: the in-domain feature network of the Frechet metric, and QRM's held-out judge.

Images are classified the way the demo model emits them: 64x64, float in [0, 1], grey (RGB with equal channels is
averaged to grey). Real Fashion-MNIST goes through the demo model's own preparation (``to_model_images``: 28 -> 64
bilinear, [-1, 1]) and is then mapped to [0, 1], so real and generated images reach the network the same way.

The shipped weights (``qsilk/assets/classifiers/fmnist_cnn.*``) were trained by ``python -m qsilk.eval.classifier``
on the train split only; the JSON beside them records seed, architecture, test accuracy and train time.

This network must never be used to train anything in ``qsilk.qrm``: it is the held-out judge there.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qsilk.files import atomic_save_tensors, atomic_write_text

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "classifiers"
ASSET_NAME = "fmnist_cnn"
IMAGE_SIZE = 64


@dataclass
class ClassifierConfig:
    """Architecture of :class:`FashionCNN`; round-trips through JSON."""

    widths: tuple[int, ...] = (32, 32, 64, 128)
    num_classes: int = 10
    dropout: float = 0.2
    image_size: int = IMAGE_SIZE

    def __post_init__(self) -> None:
        self.widths = tuple(int(w) for w in self.widths)
        if len(self.widths) != 4 or min(self.widths) < 1:
            raise ValueError(f"widths must be 4 positive channel counts, got {self.widths}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["widths"] = list(self.widths)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ClassifierConfig:
        unknown = set(d) - {"widths", "num_classes", "dropout", "image_size"}
        if unknown:
            raise ValueError(f"unknown classifier config keys {sorted(unknown)}")
        return cls(**d)


def _conv(cin: int, cout: int, **kw) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, bias=False, **kw), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class FashionCNN(nn.Module):
    """64x64 grey -> stride-2 stem (32x32) -> 3x3 convs with max-pools (16, 8) -> global mean -> features -> logits.

    ``features`` is the penultimate (global-pooled) activation, ``widths[-1]`` dimensions."""

    def __init__(self, config: ClassifierConfig | None = None) -> None:
        super().__init__()
        self.config = config or ClassifierConfig()
        w0, w1, w2, w3 = self.config.widths
        self.body = nn.Sequential(
            _conv(1, w0, kernel_size=4, stride=2, padding=1),
            _conv(w0, w1, kernel_size=3, padding=1),
            nn.MaxPool2d(2),
            _conv(w1, w2, kernel_size=3, padding=1),
            nn.MaxPool2d(2),
            _conv(w2, w3, kernel_size=3, padding=1),
        )
        self.dropout = nn.Dropout(self.config.dropout)
        self.head = nn.Linear(w3, self.config.num_classes)

    @property
    def num_features(self) -> int:
        return self.config.widths[-1]

    def prepare(self, images: Tensor) -> Tensor:
        """(B, 1|3, H, W) in [0, 1] (or uint8) -> (B, 1, 64, 64) in [-1, 1]."""
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"expected (B, 1|3, H, W) images, got shape {tuple(images.shape)}")
        if x.shape[0] == 0:
            raise ValueError("expected at least one image, got an empty batch")
        x = x.mean(1, keepdim=True) if x.shape[1] == 3 else x
        size = self.config.image_size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        return x.clamp(0.0, 1.0) * 2.0 - 1.0

    def features(self, images: Tensor) -> Tensor:
        """Penultimate features of images in [0, 1]; (B, num_features), float32."""
        return self.body(self.prepare(images)).mean((-2, -1))

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.dropout(self.features(images)))


# ---------------------------------------------------------------------------------------------------- weights


def save_classifier(model: FashionCNN, folder: str | Path, metadata: dict, name: str = ASSET_NAME) -> Path:
    """Write ``name.safetensors`` (fp32 state) and ``name.json`` (config + metadata), atomically."""
    folder = Path(folder)
    atomic_save_tensors(model.state_dict(), folder / f"{name}.safetensors")
    os.chmod(folder / f"{name}.safetensors", 0o644)  # shipped as package data: readable by everyone
    meta = {"config": model.config.to_dict(), **metadata}
    atomic_write_text(folder / f"{name}.json", json.dumps(meta, indent=2) + "\n")
    return folder / f"{name}.safetensors"


def load_classifier(folder: str | Path, name: str = ASSET_NAME) -> FashionCNN:
    from safetensors.torch import load_file

    folder = Path(folder)
    weights, meta_file = folder / f"{name}.safetensors", folder / f"{name}.json"
    if not weights.is_file() or not meta_file.is_file():
        raise FileNotFoundError(f"classifier {name!r} not found in {folder} (need {weights.name} and {meta_file.name})")
    meta = json.loads(meta_file.read_text())
    model = FashionCNN(ClassifierConfig.from_dict(meta["config"]))
    model.load_state_dict(load_file(str(weights)))
    model.metadata = meta
    return model.eval().requires_grad_(False)


def load_fmnist_classifier(device: str | torch.device = "cpu") -> FashionCNN:
    """The shipped Fashion-MNIST classifier, in eval mode; ``.metadata`` holds its training record."""
    return load_classifier(ASSET_DIR).to(device)


# ---------------------------------------------------------------------------------------------------- training


@dataclass
class TrainConfig:
    epochs: int = 5
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 5e-4
    seed: int = 0
    max_shift: int = 4  # random translation in 64-px pixels: generated images are not perfectly centred
    hflip: bool = True
    threads: int = 1
    limit: int | None = None  # train on the first `limit` images (tests)
    init_from: str | None = None  # a folder with fmnist_cnn.* to continue from (a second, fine-tuning stage)
    model: dict = field(default_factory=lambda: ClassifierConfig().to_dict())


def fmnist_tensors(split: str, root: str | Path | None = None, limit: int | None = None) -> tuple[Tensor, Tensor]:
    """The split as the demo model sees it, mapped to [0, 1]: (N, 1, 64, 64) float32, (N,) int64."""
    from qsilk.models.demo.data import load_fashion_mnist, to_model_images

    images, labels = load_fashion_mnist(split, root)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    parts = [to_model_images(images[i : i + 4096]) for i in range(0, len(images), 4096)]
    return torch.cat(parts).add(1.0).mul(0.5), torch.from_numpy(labels.copy())


def _augment(x: Tensor, max_shift: int, hflip: bool, g: torch.Generator) -> Tensor:
    if hflip:
        flip = torch.rand(len(x), generator=g) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    if max_shift > 0:
        n, _, h, w = x.shape
        padded = F.pad(x, (max_shift,) * 4)  # background is 0 = black, as in Fashion-MNIST
        dy, dx = torch.randint(0, 2 * max_shift + 1, (2,), generator=g).tolist()
        x = padded[:, :, dy : dy + h, dx : dx + w]
    return x


@torch.no_grad()
def evaluate(model: FashionCNN, images: Tensor, labels: Tensor, batch_size: int = 500) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(images), batch_size):
        correct += int((model(images[i : i + batch_size]).argmax(1) == labels[i : i + batch_size]).sum())
    return correct / max(len(images), 1)


def _checkpoint_path(out: Path) -> Path:
    return out / "checkpoint.safetensors"


def _save_checkpoint(out: Path, model: FashionCNN, opt: torch.optim.Optimizer, epoch: int, elapsed: float) -> None:
    """Model + AdamW state after `epoch` (safetensors, atomic): training resumes exactly at the next epoch."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    for i, p in enumerate(model.parameters()):
        for key, value in opt.state.get(p, {}).items():
            tensors[f"opt.{i}.{key}"] = torch.as_tensor(value)
    atomic_save_tensors(tensors, _checkpoint_path(out), metadata={"epoch": str(epoch), "elapsed": repr(elapsed)})


def _load_checkpoint(out: Path, model: FashionCNN, opt: torch.optim.Optimizer) -> tuple[int, float]:
    from safetensors import safe_open

    path = _checkpoint_path(out)
    if not path.is_file():
        return 0, 0.0
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    params = list(model.parameters())
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, i, name = key.split(".", 2)
            opt.state[params[int(i)]][name] = value
    return int(meta["epoch"]), float(meta["elapsed"])


def train_classifier(
    out: str | Path,
    config: TrainConfig | None = None,
    root: str | Path | None = None,
    log=print,
) -> tuple[FashionCNN, dict]:
    """Train on the train split, evaluate on the test split; resumable per epoch from ``out/checkpoint``.

    Writes ``out/fmnist_cnn.{safetensors,json}`` at the end and returns (model, metadata)."""
    config = config or TrainConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    previous = None
    if config.init_from:
        model = load_classifier(config.init_from).requires_grad_(True)
        previous = model.metadata
    else:
        model = FashionCNN(ClassifierConfig.from_dict(dict(config.model)))
    train_x, train_y = fmnist_tensors("train", root, config.limit)
    test_x, test_y = fmnist_tensors("test", root)
    steps_per_epoch = math.ceil(len(train_x) / config.batch_size)
    total = steps_per_epoch * config.epochs
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
    )
    start_epoch, elapsed = _load_checkpoint(out, model, opt)
    if start_epoch:
        log(f"resuming after epoch {start_epoch}")

    def lr_at(step: int) -> float:  # linear warm-up, cosine decay
        warm = max(steps_per_epoch // 4, 1)
        if step < warm:
            return config.lr * (step + 1) / warm
        return config.lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(total - warm, 1)))

    for epoch in range(start_epoch, config.epochs):
        t0 = time.perf_counter()
        # Per-epoch seeds (data order, augmentation, dropout): a resumed run reproduces an uninterrupted one.
        g = torch.Generator().manual_seed(config.seed * 1000 + epoch)
        torch.manual_seed(config.seed * 1000 + epoch)
        order = torch.randperm(len(train_x), generator=g)
        model.train()
        loss_sum = 0.0
        for b in range(steps_per_epoch):
            idx = order[b * config.batch_size : (b + 1) * config.batch_size]
            x = _augment(train_x[idx], config.max_shift, config.hflip, g)
            for group in opt.param_groups:
                group["lr"] = lr_at(epoch * steps_per_epoch + b)
            loss = F.cross_entropy(model(x), train_y[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += float(loss.detach()) * len(idx)
        elapsed += time.perf_counter() - t0
        _save_checkpoint(out, model, opt, epoch + 1, elapsed)
        acc = evaluate(model, test_x, test_y)
        log(f"epoch {epoch + 1}/{config.epochs}: train loss {loss_sum / len(train_x):.4f}, test acc {acc:.4f}, {elapsed:.0f} s")

    accuracy = evaluate(model, test_x, test_y)
    metadata = {
        "name": ASSET_NAME,
        "config": model.config.to_dict(),
        "purpose": "in-domain Frechet distance features (qsilk.eval.metrics) and QRM's held-out judge; never train QRM on it",
        "data": "Fashion-MNIST train split (60k), prepared as qsilk.models.demo.data.to_model_images, then [0, 1]",
        "preprocessing": "grey (RGB averaged), bilinear to 64x64, [0, 1] -> [-1, 1]",
        "features": f"global-mean of the last conv block, {model.num_features} dims",
        "test_accuracy": accuracy,
        "test_n": len(test_x),
        "train_n": len(train_x),
        "train_seconds": round(elapsed, 1),
        "train_threads": config.threads,
        "train": {k: v for k, v in asdict(config).items() if k != "model"},
        "previous_stage": previous,
        "torch": torch.__version__,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    model.eval()
    model.metadata = metadata
    save_classifier(model, out, metadata)
    return model.requires_grad_(False), metadata


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the Fashion-MNIST metric classifier (resumable).")
    parser.add_argument("--out", default="runs/classifier", help="work folder (checkpoint and final weights)")
    parser.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--root", default=None, help="Fashion-MNIST folder (default: the demo model's)")
    parser.add_argument("--lr", type=float, default=TrainConfig.lr)
    parser.add_argument("--max-shift", type=int, default=TrainConfig.max_shift)
    parser.add_argument("--init-from", default=None, help="continue from the fmnist_cnn.* in this folder")
    parser.add_argument("--install", action="store_true", help="copy the final weights into the package assets")
    args = parser.parse_args(argv)
    _, meta = train_classifier(
        args.out,
        TrainConfig(
            epochs=args.epochs,
            seed=args.seed,
            threads=args.threads,
            lr=args.lr,
            max_shift=args.max_shift,
            init_from=args.init_from,
        ),
        root=args.root,
    )
    print(json.dumps({k: meta[k] for k in ("test_accuracy", "train_seconds", "parameters")}))
    if args.install:
        model = load_classifier(args.out)
        save_classifier(model, ASSET_DIR, model.metadata)
        print(f"installed into {ASSET_DIR}")


if __name__ == "__main__":
    main()
