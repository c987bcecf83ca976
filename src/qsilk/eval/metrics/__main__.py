"""``python -m qsilk.eval.metrics``: the orientation table of docs/metrics.md (real, autoencoder, two sampled cells).

Needs Fashion-MNIST (``QSILK_FASHION_MNIST``) and the shipped demo model; CPU, a few minutes at n = 200.
"""

from __future__ import annotations

import argparse
import json

import torch


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="images per set")
    parser.add_argument("--ref-n", type=int, default=1000, help="reference images (Fashion-MNIST test split)")
    parser.add_argument("--metrics", default="fmnist,spectral,saturation,artifacts")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from qsilk.eval.demo_fid import dataset_images, generated_images, reconstructed_images
    from qsilk.eval.metrics import compute_features, make_metrics, score_all
    from qsilk.models.demo import load_demo_pipeline

    metrics = make_metrics(args.metrics.split(","))
    reference = compute_features(metrics, dataset_images("test")(0, args.ref_n))
    pipe = load_demo_pipeline()
    pipe.set_progress_bar_config(disable=True)
    sets = {
        "real train images": lambda: dataset_images("train")(0, args.n),
        "autoencoder reconstructions": lambda: reconstructed_images(pipe.vae)(0, args.n),
    }
    for steps, cfg in ((4, 9.0), (16, 3.0)):
        make = generated_images(pipe, steps, cfg, 10)
        sets[f"{steps} steps, CFG {cfg:g}"] = lambda make=make: torch.cat(
            [make(s, min(25, args.n - s)) for s in range(0, args.n, 25)]
        )
    for name, images in sets.items():
        scores = score_all(metrics, compute_features(metrics, images()), reference)
        print(json.dumps({"set": name, "n": args.n, "ref_n": args.ref_n, **scores}), flush=True)


if __name__ == "__main__":
    main()
