"""Paired same-seed evaluation of a QRM on the demo model, judged by models QRM never saw in training.

    python -m qsilk.qrm.evaluate sample  --out runs/qrm/eval --arm base --n 1000
    python -m qsilk.qrm.evaluate sample  --out runs/qrm/eval --arm light --qrm runs/qrm/light/qrm --n 1000
    python -m qsilk.qrm.evaluate inception --out runs/qrm/eval --arms base light --n-ref 1000
    python -m qsilk.qrm.evaluate report  --out runs/qrm/eval --arms base light

Image i uses seed ``seed_start + i`` (default 1,000,000: the trainer draws its noise from one generator seeded with
its own seed, never from these per-image seeds) and class ``i mod 10``; both arms get the same initial noise.
Images are stored as uint8 chunks (resumable, atomic). ``report`` scores each arm with the held-out judge
(``qsilk.eval.classifier``: accuracy and log p(requested class)), Inception FID and the in-domain Frechet distance
(against the first ``n_ref`` Fashion-MNIST test images), and gives each arm-minus-base difference with a 95 %
paired bootstrap CI over seeds (the same resampled seeds for both arms).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from qsilk.files import atomic_save_tensors, atomic_write_bytes

CHUNK = 50


def _chunk_path(out: Path, arm: str, index: int) -> Path:
    return out / arm / f"images_{index:05d}.safetensors"


def sample_arm(
    out: Path, arm: str, qrm_path: str | None, n: int, seed_start: int, steps: int, cfg: float, model=None
) -> None:
    from qsilk.models.demo import load_demo_pipeline

    from .hooks import attach
    from .io import load_qrm

    pipe = load_demo_pipeline(path=model)
    pipe.set_progress_bar_config(disable=True)
    if qrm_path:
        attach(pipe, load_qrm(qrm_path, pipe.transformer))
    (out / arm).mkdir(parents=True, exist_ok=True)
    record = {"arm": arm, "qrm": qrm_path, "n": n, "seed_start": seed_start, "steps": steps, "cfg": cfg}
    atomic_write_bytes(out / arm / "arm.json", json.dumps(record, indent=2).encode())
    t0 = time.time()
    for c in range(math.ceil(n / CHUNK)):
        path = _chunk_path(out, arm, c)
        if path.exists():
            continue
        idx = list(range(c * CHUNK, min((c + 1) * CHUNK, n)))
        gens = [torch.Generator().manual_seed(seed_start + i) for i in idx]
        labels = [i % 10 for i in idx]
        images = pipe(
            labels, num_inference_steps=steps, guidance_scale=cfg, generator=gens, output_type="pt"
        ).images
        grey = (images[:, :1] * 255).round().to(torch.uint8)
        atomic_save_tensors(
            {
                "images": grey,
                "labels": torch.tensor(labels),
                "seeds": torch.tensor([seed_start + i for i in idx]),
            },
            path,
        )
        print(f"{arm}: {idx[-1] + 1}/{n} images, {time.time() - t0:.0f} s", flush=True)


def load_arm(out: Path, arm: str) -> tuple[torch.Tensor, torch.Tensor]:
    chunks = sorted((out / arm).glob("images_*.safetensors"))
    if not chunks:
        raise FileNotFoundError(f"no images for arm {arm!r} in {out}")
    parts = [load_file(str(p)) for p in chunks]
    return torch.cat([p["images"] for p in parts]), torch.cat([p["labels"] for p in parts])


def _as_float(images_u8: torch.Tensor) -> torch.Tensor:
    return images_u8.float().div(255.0).repeat(1, 3, 1, 1)


def load_judge(judge: str | None = None):
    """The held-out judge: ``qsilk.eval.classifier.load_fmnist_classifier()``, or (``judge``) a folder holding its
    weights or a training checkpoint of the same network."""
    from qsilk.eval import classifier as clf

    if judge is None:
        return clf.load_fmnist_classifier()
    path = Path(judge)
    if path.is_dir():
        return clf.load_classifier(path)
    model = clf.FashionCNN(clf.ClassifierConfig())
    state = load_file(str(path))
    model.load_state_dict(
        {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith("model.")} or state
    )
    return model.eval().requires_grad_(False)


def _cached(path: Path, n: int | None, compute) -> dict[str, torch.Tensor]:
    if path.exists():
        feats = load_file(str(path))
        if n is None or len(next(iter(feats.values()))) == n:
            return feats
    feats = compute()
    atomic_save_tensors(feats, path)
    return feats


def arm_features(
    out: Path, arm: str, judge: str | None = None, batch: int = 100, inception: bool = True
) -> dict[str, torch.Tensor]:
    """Inception features, and the judge's log-probs / correctness / in-domain features, per image (cached)."""
    images, labels = load_arm(out, arm)

    def inception_features():
        from qsilk.eval.metrics import InceptionFID

        metric = InceptionFID()
        return {
            "inception": torch.cat(
                [metric.features(_as_float(images[i : i + batch])) for i in range(0, len(images), batch)]
            )
        }

    def judged():
        from qsilk.eval.metrics import ClassifierFD

        net = load_judge(judge)
        metric = ClassifierFD(network=net)
        logp, fm = [], []
        for i in range(0, len(images), batch):
            x = _as_float(images[i : i + batch])
            with torch.no_grad():
                logp.append(torch.log_softmax(net(x).float(), dim=1))
            fm.append(metric.features(x))
        logp_all = torch.cat(logp)
        return {
            "labels": labels,
            "judge_logp": logp_all.gather(1, labels.long()[:, None]).squeeze(1).double(),
            "judge_correct": (logp_all.argmax(1) == labels).double(),
            "fmnist": torch.cat(fm),
        }

    feats = (
        dict(_cached(out / arm / "inception.safetensors", len(images), inception_features))
        if inception
        else {}
    )
    feats.update(_cached(out / arm / f"judge_{_judge_tag(judge)}.safetensors", len(images), judged))
    return feats


def _judge_tag(judge: str | None) -> str:
    return "shipped" if judge is None else Path(judge).stem


def _reference_images(n_ref: int):
    from qsilk.models.demo.data import load_fashion_mnist, to_model_images

    images, _ = load_fashion_mnist("test")
    x = ((to_model_images(images[:n_ref]) + 1) / 2).clamp(0, 1)
    return ((x * 255).round() / 255).repeat(1, 3, 1, 1)  # the same uint8 quantisation as the generated images


def reference_features(
    out: Path, n_ref: int, judge: str | None = None, batch: int = 100
) -> dict[str, torch.Tensor]:
    out.mkdir(parents=True, exist_ok=True)

    def inception():
        from qsilk.eval.metrics import InceptionFID

        x, metric = _reference_images(n_ref), InceptionFID()
        return {"inception": torch.cat([metric.features(x[i : i + batch]) for i in range(0, len(x), batch)])}

    def judged():
        from qsilk.eval.metrics import ClassifierFD

        x, metric = _reference_images(n_ref), ClassifierFD(network=load_judge(judge))
        return {"fmnist": torch.cat([metric.features(x[i : i + batch]) for i in range(0, len(x), batch)])}

    feats = dict(_cached(out / f"reference_{n_ref}_inception.safetensors", n_ref, inception))
    feats.update(_cached(out / f"reference_{n_ref}_judge_{_judge_tag(judge)}.safetensors", n_ref, judged))
    return feats


def inception_only(out: Path, arms: list[str], n_ref: int, batch: int = 100, reference: bool = True) -> None:
    """The judge-independent part (Inception features of the reference and the arms), to run ahead."""
    from qsilk.eval.metrics import InceptionFID

    def ref():
        x, metric = _reference_images(n_ref), InceptionFID()
        return {"inception": torch.cat([metric.features(x[i : i + batch]) for i in range(0, len(x), batch)])}

    out.mkdir(parents=True, exist_ok=True)
    if reference:
        _cached(out / f"reference_{n_ref}_inception.safetensors", n_ref, ref)
        print("reference inception done", flush=True)
    for arm in arms:
        images, _ = load_arm(out, arm)
        metric = InceptionFID()
        _cached(
            out / arm / "inception.safetensors",
            len(images),
            lambda images=images, metric=metric: {
                "inception": torch.cat(
                    [metric.features(_as_float(images[i : i + batch])) for i in range(0, len(images), batch)]
                )
            },
        )
        print(f"{arm} inception done", flush=True)


def frechet_stat(key: str, reference: torch.Tensor):
    """``stat(features, idx)`` for :func:`paired_bootstrap`: the Frechet distance of ``features[key][idx]`` to the
    reference, through one :class:`~qsilk.eval.metrics.FrechetReplicates` per feature set (built on first use), so
    a resample only re-indexes a precomputed Gram matrix."""
    from qsilk.eval.metrics import FrechetReplicates

    built: dict[int, tuple[torch.Tensor, FrechetReplicates]] = {}

    def stat(features: dict, idx: torch.Tensor) -> float:
        values = features[key]
        entry = built.get(id(values))
        if entry is None or entry[0] is not values:
            entry = built[id(values)] = (values, FrechetReplicates(values, reference, kid_key=None))
        return entry[1](idx)["fd"]

    return stat


def paired_bootstrap(stat, base: dict, arm: dict, n: int, reps: int, seed: int = 0) -> dict:
    """stat(features_dict, index) -> float. Returns base, arm, diff and the 95 % percentile CI of the diff."""
    g = torch.Generator().manual_seed(seed)
    full = torch.arange(n)
    b, a = stat(base, full), stat(arm, full)
    diffs = []
    for _ in range(reps):
        idx = torch.randint(0, n, (n,), generator=g)
        diffs.append(stat(arm, idx) - stat(base, idx))
    diffs_t = torch.tensor(diffs)
    lo, hi = torch.quantile(diffs_t, torch.tensor([0.025, 0.975], dtype=diffs_t.dtype)).tolist()
    return {
        "base": b,
        "arm": a,
        "diff": a - b,
        "ci95": [lo, hi],
        "excludes_zero": bool(lo > 0 or hi < 0),
        "reps": reps,
    }


def report(
    out: Path,
    arms: list[str],
    n_ref: int,
    reps: int,
    reps_frechet: int,
    judge: str | None = None,
    judge_only: tuple[str, ...] = (),
) -> dict:
    ref = reference_features(out, n_ref, judge)
    base_name, others = arms[0], arms[1:]
    base = arm_features(out, base_name, judge)
    fid = frechet_stat("inception", ref["inception"])
    fd = frechet_stat("fmnist", ref["fmnist"])
    result = {
        "n": len(base["labels"]),
        "n_ref": n_ref,
        "judge": judge or "qsilk.eval.classifier (shipped)",
        "base_arm": base_name,
        "arms": {},
    }
    for name in others:
        arm = arm_features(out, name, judge, inception=name not in judge_only)
        if not torch.equal(arm["labels"], base["labels"]):
            raise ValueError(f"arms {base_name} and {name} do not hold the same seeds/classes")
        n = len(base["labels"])
        result["arms"][name] = {
            "judge_accuracy": paired_bootstrap(
                lambda f, i: float(f["judge_correct"][i].mean()), base, arm, n, reps
            ),
            "judge_logp": paired_bootstrap(lambda f, i: float(f["judge_logp"][i].mean()), base, arm, n, reps),
            "fd_fmnist": paired_bootstrap(fd, base, arm, n, reps_frechet),
        }
        if name not in judge_only:
            result["arms"][name]["fid_inception"] = paired_bootstrap(fid, base, arm, n, reps_frechet)
    atomic_write_bytes(out / "report.json", json.dumps(result, indent=2).encode())
    return result


def figure(out: Path, arms: list[str], path: Path, count: int = 10) -> Path:
    """Rows: each arm's first ``count`` images (same seeds and classes), then |last arm - first arm| x4."""
    from PIL import Image

    rows = [load_arm(out, arm)[0][:count, 0] for arm in arms]
    diff = ((rows[-1].int() - rows[0].int()).abs() * 4).clamp(0, 255).to(torch.uint8)
    grid = torch.cat([torch.cat(list(r), dim=1) for r in [*rows, diff]], dim=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.numpy()).save(path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m qsilk.qrm.evaluate", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("stage", choices=["sample", "inception", "report", "figure"])
    parser.add_argument("--figure", default="docs/images/qrm-demo.png")
    parser.add_argument("--skip-reference", action="store_true", help="inception stage: the arms only")
    parser.add_argument(
        "--judge-only", nargs="*", default=[], help="report: arms scored without Inception FID"
    )
    parser.add_argument(
        "--judge", default=None, help="judge weights folder or checkpoint (default: the shipped one)"
    )
    parser.add_argument("--out", required=True)
    parser.add_argument("--arm", default="base")
    parser.add_argument("--arms", nargs="+", default=["base", "light"])
    parser.add_argument("--qrm", default=None, help="QRM checkpoint (omit for the base arm)")
    parser.add_argument("--model", default=None)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--n-ref", type=int, default=1000)
    parser.add_argument("--seed-start", type=int, default=1_000_000)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--cfg", type=float, default=4.0)
    parser.add_argument("--reps", type=int, default=2000)
    parser.add_argument("--reps-frechet", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.stage == "sample":
        sample_arm(out, args.arm, args.qrm, args.n, args.seed_start, args.steps, args.cfg, args.model)
    elif args.stage == "figure":
        print(figure(out, args.arms, Path(args.figure)))
    elif args.stage == "inception":
        inception_only(out, args.arms, args.n_ref, reference=not args.skip_reference)
    else:
        print(
            json.dumps(
                report(
                    out,
                    args.arms,
                    args.n_ref,
                    args.reps,
                    args.reps_frechet,
                    args.judge,
                    tuple(args.judge_only),
                ),
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    raise SystemExit(main())
