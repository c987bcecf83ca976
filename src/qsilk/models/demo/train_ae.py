"""Train the demo autoencoder, then measure test PSNR and cache normalised latents for the DiT.

    python -m qsilk.models.demo.train_ae --run-dir runs/demo/ae

Resumes from ``<run-dir>/ckpt`` automatically. When ``--steps`` are done it writes ``<run-dir>/final/``
(diffusers ``AutoencoderKL`` with the measured ``scaling_factor`` / ``shift_factor``), ``metrics.json``, and
``<run-dir>/latents.safetensors`` (train latents, fp16, normalised, with labels).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from qsilk.files import atomic_save_tensors

from .autoencoder import build_autoencoder, encode_mean
from .checkpoint import latest_checkpoint, load_checkpoint, load_optimizer_tensors, save_checkpoint
from .data import load_fashion_mnist, to_model_images
from .loop import Progress, StopFlag, append_jsonl, warmup_cosine


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", type=Path, default=Path("runs/demo/ae"))
    p.add_argument("--preset", default="narrow")
    p.add_argument("--steps", type=int, default=2400)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--kl-weight", type=float, default=1e-6, help="per-pixel-normalised KL weight (SD-like)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ckpt-minutes", type=float, default=10.0)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--eval-images", type=int, default=2000)
    p.add_argument("--encode-batch", type=int, default=500)
    p.add_argument("--max-minutes", type=float, default=None, help="end training early (then finalise)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N train images (smoke tests)")
    return p.parse_args(argv)


def batch_generator(seed: int, step: int) -> torch.Generator:
    # One generator per step: the data order and noise do not depend on where a run was resumed.
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


@torch.no_grad()
def psnr_on(vae: AutoencoderKL, images, batch: int, device: str) -> float:
    """Mean PSNR (dB, images in [0, 1] at model resolution) of mean-latent reconstructions."""
    values = []
    for i in range(0, len(images), batch):
        x = to_model_images(images[i : i + batch]).to(device)
        recon = vae.decode(encode_mean(vae, x)).sample.clamp(-1, 1)
        mse = ((recon - x) / 2).pow(2).flatten(1).mean(1)
        values.append(10 * torch.log10(1.0 / mse.clamp_min(1e-12)))
    return float(torch.cat(values).mean())


@torch.no_grad()
def finalize(vae: AutoencoderKL, args: argparse.Namespace, train, train_labels, test) -> dict:
    vae.eval()
    t0 = time.time()
    psnr = psnr_on(vae, test[: args.eval_images], args.encode_batch, args.device)
    raw = torch.cat(
        [
            encode_mean(vae, to_model_images(train[i : i + args.encode_batch]).to(args.device)).cpu()
            for i in range(0, len(train), args.encode_batch)
        ]
    )
    shift, std = float(raw.mean()), float(raw.std())
    vae.register_to_config(scaling_factor=1.0 / std, shift_factor=shift)
    latents = ((raw - shift) / std).half()
    final_dir = args.run_dir / "final"
    vae.save_pretrained(final_dir, safe_serialization=True)
    latents_file = {"latents": latents, "labels": torch.as_tensor(train_labels)}
    atomic_save_tensors(latents_file, args.run_dir / "latents.safetensors")
    metrics = {
        "test_psnr_db": psnr,
        "eval_images": int(min(args.eval_images, len(test))),
        "scaling_factor": 1.0 / std,
        "shift_factor": shift,
        "latent_shape": list(latents.shape[1:]),
        "per_channel_std": [float(s) for s in ((raw - shift) / std).transpose(0, 1).flatten(1).std(1)],
        "finalize_seconds": time.time() - t0,
        "params": sum(p.numel() for p in vae.parameters()),
    }
    (args.run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"[ae] final: test PSNR {psnr:.2f} dB, scaling_factor {1 / std:.4f}, shift {shift:.4f}", flush=True)
    return metrics


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    args.run_dir.mkdir(parents=True, exist_ok=True)
    if (args.run_dir / "latents.safetensors").exists() and (args.run_dir / "final").exists():
        print(f"[ae] {args.run_dir} already finalised; nothing to do", flush=True)
        return
    train, train_labels = load_fashion_mnist("train")
    train, train_labels = train[: args.limit], train_labels[: args.limit]
    test, _ = load_fashion_mnist("test")
    if (args.run_dir / "final" / "config.json").exists():
        # Trained elsewhere (e.g. unpacked from another machine): only the latent cache is missing.
        print("[ae] final weights exist; re-creating the latent cache", flush=True)
        finalize(AutoencoderKL.from_pretrained(args.run_dir / "final").to(args.device), args, train, train_labels, test)
        return
    torch.manual_seed(args.seed)
    vae = build_autoencoder(args.preset).to(args.device)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    start, elapsed = 0, 0.0
    ckpt = latest_checkpoint(args.run_dir)
    if ckpt is not None:
        tensors, state = load_checkpoint(ckpt)
        vae.load_state_dict(tensors["model"])
        if "optim" in tensors:
            load_optimizer_tensors(opt, vae, tensors["optim"])
        start, elapsed = state["step"], state.get("elapsed_s", 0.0)
        print(f"[ae] resumed from {ckpt} (step {start})", flush=True)
    n_params = sum(p.numel() for p in vae.parameters())
    print(f"[ae] preset {args.preset}: {n_params / 1e6:.3f} M params, {args.steps} steps, bs {args.batch_size}")

    stop = StopFlag()
    log = args.run_dir / "log.jsonl"
    progress = Progress(start, args.steps, args.log_every, "ae")
    last_ckpt, t_start = time.time(), time.time() - elapsed
    vae.train()
    # Upsample the whole train set once (1 GB in fp32): cheaper than per batch, on any device.
    train_images = to_model_images(train).to(args.device)
    session_start = time.time()

    def checkpoint(step: int) -> None:
        state = {"elapsed_s": time.time() - t_start, "args": {k: str(v) for k, v in vars(args).items()}}
        save_checkpoint(args.run_dir, step, {"model": vae}, opt, vae, state)

    step = start
    while step < args.steps:
        gen = batch_generator(args.seed, step)
        idx = torch.randint(len(train), (args.batch_size,), generator=gen)
        x = train_images[idx.to(args.device)]
        for group in opt.param_groups:
            group["lr"] = args.lr * warmup_cosine(step, args.warmup, args.steps)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen).to(args.device)
        recon = vae.decode(z).sample
        l1 = (recon - x).abs().mean()
        kl = posterior.kl().mean() / x[0].numel()
        loss = l1 + args.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"non-finite AE loss at step {step}")
        mse = float(((recon.detach().clamp(-1, 1) - x) / 2).pow(2).mean())
        metrics = {"loss": loss.item(), "l1": l1.item(), "psnr": 10 * math.log10(1 / max(mse, 1e-12))}
        progress.update(step, metrics)
        if step % args.log_every == 0:
            append_jsonl(log, {"step": step, "time_s": time.time() - t_start, **metrics})
        if stop.requested or time.time() - last_ckpt > args.ckpt_minutes * 60:
            checkpoint(step)
            last_ckpt = time.time()
            if stop.requested:
                print(f"[ae] stopped at step {step}; resume by running the same command", flush=True)
                raise SystemExit(143)
        if args.max_minutes is not None and time.time() - session_start > args.max_minutes * 60:
            print(f"[ae] --max-minutes reached at step {step}", flush=True)
            break
    progress.close()
    del train_images
    checkpoint(step)
    print(f"[ae] training done at step {step} ({(time.time() - t_start) / 60:.1f} min); finalising", flush=True)
    finalize(vae, args, train, train_labels, test)


if __name__ == "__main__":
    main()
