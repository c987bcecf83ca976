"""Differentiable rewards for QRM training. A reward maps decoded images (B, C, H, W) in [-1, 1] and the requested
condition (class ids / prompts) to one score per sample, (B,), higher is better, differentiable in the images.

- :class:`ClassifierReward` (demo model): log p(requested class) from our own Fashion-MNIST **MLP** (area-pooled to
  28x28, two hidden layers), trained on the train split by ``python -m qsilk.qrm.rewards``. It is deliberately a
  different architecture from ``qsilk.eval.classifier`` (a CNN), which is QRM's held-out judge and never used here.
- :class:`CLIPReward` (real models): image-text cosine of a CLIP model loaded from an explicit **local** folder
  (a CLIP or an HPS-style fine-tuned CLIP in transformers format); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "qrm"
REWARD_NAME = "fmnist_mlp_reward"


@dataclass
class MLPConfig:
    hidden: tuple[int, ...] = (256, 128)
    input_size: int = 28
    num_classes: int = 10
    dropout: float = 0.1

    def __post_init__(self) -> None:
        self.hidden = tuple(int(h) for h in self.hidden)
        if not self.hidden or min(self.hidden) < 1 or self.input_size < 4 or self.num_classes < 2:
            raise ValueError(f"invalid MLPConfig {self}")


class FashionMLP(nn.Module):
    """Images in [-1, 1], any size, 1 or 3 (equal) channels -> class logits. Area-pooled to ``input_size``."""

    def __init__(self, config: MLPConfig | None = None):
        super().__init__()
        self.config = config or MLPConfig()
        layers: list[nn.Module] = []
        width = self.config.input_size**2
        for h in self.config.hidden:
            layers += [nn.Linear(width, h), nn.GELU(), nn.Dropout(self.config.dropout)]
            width = h
        layers.append(nn.Linear(width, self.config.num_classes))
        self.net = nn.Sequential(*layers)

    def prepare(self, images: Tensor) -> Tensor:
        x = images.float()
        if x.shape[1] != 1:
            x = x.mean(1, keepdim=True)
        size = self.config.input_size
        if x.shape[-1] != size or x.shape[-2] != size:
            x = F.interpolate(x, size=(size, size), mode="area")
        return x.flatten(1)

    def forward(self, images: Tensor) -> Tensor:
        return self.net(self.prepare(images))


def save_mlp(model: FashionMLP, folder: str | Path, metadata: dict, name: str = REWARD_NAME) -> Path:
    from qsilk.files import atomic_save_tensors, atomic_write_bytes

    folder = Path(folder)
    path = folder / f"{name}.safetensors"
    atomic_save_tensors({k: v.half() for k, v in model.state_dict().items()}, path)
    record = {"config": asdict(model.config), "metadata": metadata}
    atomic_write_bytes(folder / f"{name}.json", json.dumps(record, indent=2).encode())
    return path


def load_mlp(folder: str | Path | None = None, name: str = REWARD_NAME) -> FashionMLP:
    from safetensors.torch import load_file

    folder = Path(folder) if folder is not None else ASSET_DIR
    meta = folder / f"{name}.json"
    if not meta.exists():
        raise FileNotFoundError(
            f"no reward classifier at {meta}; train it with `python -m qsilk.qrm.rewards`"
        )
    record = json.loads(meta.read_text())
    model = FashionMLP(MLPConfig(**record["config"]))
    model.load_state_dict({k: v.float() for k, v in load_file(str(folder / f"{name}.safetensors")).items()})
    model.metadata = record.get("metadata", {})
    return model.eval().requires_grad_(False)


class ClassifierReward(nn.Module):
    """log p(requested class | image) under a frozen classifier (default: the shipped MLP)."""

    def __init__(self, classifier: nn.Module | None = None):
        super().__init__()
        self.classifier = (classifier or load_mlp()).eval().requires_grad_(False)

    def forward(self, images: Tensor, labels: Tensor) -> Tensor:
        logp = F.log_softmax(self.classifier(images).float(), dim=1)
        return logp.gather(1, labels.long().reshape(-1, 1)).squeeze(1)


class CLIPReward(nn.Module):
    """Cosine similarity of CLIP image and text embeddings (CLIPScore without the 2.5 w factor).

    ``model_path``: a local transformers-format CLIP folder (CLIP ViT-B/32, or an HPS-style fine-tune converted to
    that format). ``local_files_only`` is forced: this never downloads. Differentiable preprocessing: bicubic resize
    to the vision tower's input size and CLIP normalisation.
    """

    MEAN = (0.48145466, 0.4578275, 0.40821073)
    STD = (0.26862954, 0.26130258, 0.27577711)

    def __init__(self, model_path: str | Path | None = None, *, model=None, tokenizer=None):
        super().__init__()
        from transformers import AutoTokenizer, CLIPModel

        if model is None:
            if model_path is None or not Path(model_path).is_dir():
                raise FileNotFoundError(
                    f"CLIPReward needs a local CLIP folder, got {model_path!r} (nothing is downloaded)"
                )
            model = CLIPModel.from_pretrained(str(model_path), local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(str(model_path), local_files_only=True)
        if tokenizer is None:
            raise ValueError("CLIPReward(model=...) also needs tokenizer=...")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.size = int(model.config.vision_config.image_size)
        self.register_buffer("mean", torch.tensor(self.MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self.STD).view(1, 3, 1, 1), persistent=False)

    def image_features(self, images: Tensor) -> Tensor:
        x = (images.float() + 1) / 2
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False)
        x = (x - self.mean) / self.std
        out = self.model.get_image_features(pixel_values=x)
        out = getattr(out, "pooler_output", out)
        return F.normalize(out, dim=-1)

    def text_features(self, prompts: list[str], device) -> Tensor:
        tokens = self.tokenizer(list(prompts), padding=True, truncation=True, return_tensors="pt").to(device)
        out = self.model.get_text_features(**tokens)
        out = getattr(out, "pooler_output", out)
        return F.normalize(out, dim=-1)

    def forward(self, images: Tensor, prompts: list[str]) -> Tensor:
        return (self.image_features(images) * self.text_features(prompts, images.device)).sum(-1)


def x0_penalty(x0: Tensor, x0_base: Tensor) -> Tensor:
    """Per-sample mean squared distance to the frozen model's own x0 at the same state: gains must not be bought by
    leaving the model's image manifold."""
    return (x0.float() - x0_base.float()).pow(2).flatten(1).mean(1)


# -- training the demo reward classifier ------------------------------------------------------------------------


def _prepared_split(split: str, root=None, limit: int | None = None) -> tuple[Tensor, Tensor]:
    """Fashion-MNIST the way the reward sees generated images: 28 -> 64 bilinear (the demo model's data path),
    then the MLP's own area pooling to 28."""
    from qsilk.models.demo.data import load_fashion_mnist, to_model_images

    images, labels = load_fashion_mnist(split, root)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    model = FashionMLP()
    out = [model.prepare(to_model_images(images[i : i + 2000])) for i in range(0, len(images), 2000)]
    return torch.cat(out), torch.as_tensor(labels)


def train_reward_classifier(
    out: str | Path = ASSET_DIR,
    *,
    epochs: int = 8,
    batch_size: int = 256,
    lr: float = 2e-3,
    seed: int = 1234,
    noise: float = 0.15,
    root=None,
    limit: int | None = None,
    threads: int = 1,
) -> dict:
    """Train the MLP on the train split (last 5,000 images held out for validation); report test accuracy."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    start = time.time()
    x, y = _prepared_split("train", root, limit)
    n_val = min(5000, len(x) // 10)
    x_train, y_train, x_val, y_val = x[:-n_val], y[:-n_val], x[-n_val:], y[-n_val:]
    model = FashionMLP()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * -(-len(x_train) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    side = model.config.input_size
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(x_train), generator=g)
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            xb = x_train[idx].view(-1, 1, side, side)
            shift = torch.randint(-2, 3, (2,), generator=g).tolist()
            xb = torch.roll(xb, shifts=shift, dims=(2, 3))  # robustness: small translations and noise
            xb = xb + noise * torch.randn(xb.shape, generator=g)
            loss = F.cross_entropy(model.net(xb.flatten(1)), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()

    def accuracy(xs, ys):
        with torch.no_grad():
            return float((model.net(xs).argmax(1) == ys).float().mean())

    x_test, y_test = _prepared_split("test", root, limit)
    metadata = {
        "seed": seed,
        "epochs": epochs,
        "train_images": len(x_train),
        "val_accuracy": accuracy(x_val, y_val),
        "test_accuracy": accuracy(x_test, y_test),
        "train_seconds": round(time.time() - start, 1),
        "params": sum(p.numel() for p in model.parameters()),
        "data": "Fashion-MNIST train split only (last 5k held out for validation)",
        "note": "QRM's training reward; not the held-out judge (qsilk.eval.classifier)",
    }
    save_mlp(model, out, metadata)
    return metadata


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train QRM's Fashion-MNIST reward MLP (train split only).")
    parser.add_argument("--out", default=str(ASSET_DIR))
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    print(
        json.dumps(
            train_reward_classifier(args.out, epochs=args.epochs, seed=args.seed, threads=args.threads),
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
