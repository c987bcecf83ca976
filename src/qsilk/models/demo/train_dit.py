"""Train the class-conditional DiT on cached AE latents (v-prediction, cosine schedule, min-SNR weighting, EMA).

    python -m qsilk.models.demo.train_dit --run-dir runs/demo/dit --ae-dir runs/demo/ae

Runs until ``--max-steps`` / ``--max-minutes`` or SIGTERM, checkpointing every ``--ckpt-minutes`` (atomic) and
resuming from the latest checkpoint. The learning rate is constant after warm-up, so a run can be continued
indefinitely. ``--init-from`` starts a new run from another run's latest checkpoint (e.g. GPU -> CPU).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
from diffusers import DDPMScheduler, DiTTransformer2DModel
from safetensors.torch import load_file

from .checkpoint import latest_checkpoint, load_checkpoint, load_optimizer_tensors, save_checkpoint
from .dit import SCHEDULE_CONFIG, build_dit, disable_label_dropout, drop_labels, null_class_id
from .loop import Progress, StopFlag, append_jsonl, warmup_cosine


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", type=Path, default=Path("runs/demo/dit"))
    p.add_argument("--ae-dir", type=Path, default=Path("runs/demo/ae"))
    p.add_argument("--preset", default="h256")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--max-steps", type=int, default=10_000_000)
    p.add_argument("--max-minutes", type=float, default=None, help="stop (with a checkpoint) after this long")
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--p-uncond", type=float, default=0.1)
    p.add_argument("--min-snr-gamma", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ckpt-minutes", type=float, default=10.0)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--init-from", type=Path, default=None,
        help="start from another DiT run dir's latest checkpoint, or from an exported pipeline folder",
    )
    return p.parse_args(argv)


def v_loss(
    model: DiTTransformer2DModel,
    x0: torch.Tensor,
    labels: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    min_snr_gamma: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-SNR-weighted v-prediction loss; returns (weighted loss, unweighted v MSE)."""
    ab = alphas_cumprod[t].view(-1, 1, 1, 1)
    xt = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    target = ab.sqrt() * noise - (1 - ab).sqrt() * x0
    pred = model(xt, timestep=t, class_labels=labels).sample
    mse = (pred.float() - target).pow(2).flatten(1).mean(1)
    snr = ab.flatten() / (1 - ab.flatten())
    weight = snr.clamp(max=min_snr_gamma) / (snr + 1)  # min-SNR-gamma for v-prediction
    return (weight * mse).mean(), mse.mean()


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = True
    args.run_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    data = load_file(str(args.ae_dir / "latents.safetensors"))
    latents, labels = data["latents"].to(device), data["labels"].long().to(device)
    num_classes = int(labels.max()) + 1

    torch.manual_seed(args.seed)
    model = build_dit(num_classes, args.preset, sample_size=latents.shape[-1], latent_channels=latents.shape[1])
    model.to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    start, elapsed = 0, 0.0
    ckpt = latest_checkpoint(args.run_dir)
    if ckpt is None and args.init_from is not None and (args.init_from / "transformer" / "config.json").exists():
        # An exported pipeline folder (e.g. the shipped demo weights): its EMA weights start model and EMA.
        shipped = DiTTransformer2DModel.from_pretrained(args.init_from / "transformer", torch_dtype=torch.float32)
        model.load_state_dict(shipped.state_dict())
        ema.load_state_dict(shipped.state_dict())
        info_path = args.init_from / "export.json"
        info = json.loads(info_path.read_text()) if info_path.exists() else {}
        start, elapsed = int(info.get("dit_step", 0)), float(info.get("dit_train_seconds") or 0.0)
        print(f"[dit] initialised from the exported folder {args.init_from} (step {start})", flush=True)
    elif ckpt is None and args.init_from is not None:
        ckpt = latest_checkpoint(args.init_from)
        print(f"[dit] initialising from {ckpt}", flush=True)
    if ckpt is not None:
        tensors, state = load_checkpoint(ckpt)
        model.load_state_dict(tensors["model"])
        ema.load_state_dict(tensors["ema"])
        if "optim" in tensors:  # absent in packed (transfer) checkpoints: Adam moments restart
            load_optimizer_tensors(opt, model, tensors["optim"])
        start, elapsed = state["step"], state.get("elapsed_s", 0.0)
        print(f"[dit] resumed from {ckpt} (step {start})", flush=True)
    disable_label_dropout(model)
    disable_label_dropout(ema)
    null_id = null_class_id(model)
    alphas_cumprod = DDPMScheduler(**SCHEDULE_CONFIG).alphas_cumprod.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"[dit] preset {args.preset}: {n_params / 1e6:.3f} M params, {len(latents)} latents "
        f"{tuple(latents.shape[1:])}, bs {args.batch_size}, null id {null_id}, device {device}",
        flush=True,
    )
    (args.run_dir / "model_config.json").write_text(json.dumps(dict(model.config), indent=2, default=list) + "\n")

    stop = StopFlag()
    log = args.run_dir / "log.jsonl"
    progress = Progress(start, args.max_steps, args.log_every, "dit")
    last_ckpt, t_start = time.time(), time.time() - elapsed
    session_start = time.time()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    model.train()

    def checkpoint(step: int) -> None:
        state = {"elapsed_s": time.time() - t_start, "args": {k: str(v) for k, v in vars(args).items()}}
        (args.run_dir / "ckpt").mkdir(exist_ok=True)
        path = save_checkpoint(args.run_dir, step, {"model": model, "ema": ema}, opt, model, state)
        (path / "config.json").write_text(json.dumps(dict(model.config), indent=2, default=list) + "\n")

    step, window = start, []
    while step < args.max_steps:
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        idx = torch.randint(len(latents), (args.batch_size,), generator=gen).to(device)
        x0 = latents[idx].float()
        noise = torch.randn(x0.shape, generator=gen).to(device)
        t = torch.randint(0, len(alphas_cumprod), (args.batch_size,), generator=gen).to(device)
        y = drop_labels(labels[idx], args.p_uncond, null_id, generator=gen)
        for group in opt.param_groups:
            group["lr"] = args.lr * warmup_cosine(step, args.warmup, None)
        with autocast:
            loss, mse = v_loss(model, x0, y, noise, t, alphas_cumprod, args.min_snr_gamma)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.parameters(), strict=True):
                e.lerp_(p, 1 - decay)
        step += 1
        window.append((loss.item(), mse.item(), grad_norm.item()))
        if step % args.log_every == 0:
            w = torch.tensor(window)
            window = []
            if not math.isfinite(float(w[:, 0].mean())):
                raise FloatingPointError(f"non-finite DiT loss near step {step}")
            metrics = {"loss": float(w[:, 0].mean()), "v_mse": float(w[:, 1].mean()), "grad": float(w[:, 2].mean())}
            append_jsonl(log, {"step": step, "time_s": time.time() - t_start, **metrics})
            progress.update(step, metrics)
        out_of_time = args.max_minutes is not None and time.time() - session_start > args.max_minutes * 60
        if stop.requested or out_of_time or time.time() - last_ckpt > args.ckpt_minutes * 60:
            checkpoint(step)
            last_ckpt = time.time()
            if stop.requested or out_of_time:
                print(f"[dit] stopped at step {step}; resume by running the same command", flush=True)
                raise SystemExit(143 if stop.requested else 0)
    checkpoint(step)
    progress.close()


if __name__ == "__main__":
    main()
